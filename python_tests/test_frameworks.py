"""The README's framework recipes, run with the real packages (README, "Frameworks: Lightning and
accelerate"): PyTorch Lightning's automatic and manual optimization (global_step, max_steps,
checkpoints and resume) and HF accelerate's ``prepare`` + ``accelerator.backward`` in the closure.

Every run is compared with the plain loop of the README ("A complete training loop") on the same
batches: the same closure calls, the same SAM/cheap decisions and the same parameters bit for bit.
The file skips where lightning / accelerate are not installed (CI installs them).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vsam_ext

BATCH, N_BATCHES = 8, 8          # one epoch = 8 steps


def make_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * N_BATCHES, 8, generator=g)
    y = torch.randint(0, 3, (BATCH * N_BATCHES,), generator=g)
    return x, y


def make_loader(resumable=False):
    return (ResumableLoader if resumable else DataLoader)(TensorDataset(*make_data()), batch_size=BATCH, shuffle=False)


class ResumableLoader(DataLoader):
    """A loader with ``state_dict``/``load_state_dict`` (as torchdata's StatefulDataLoader): Lightning
    saves its position in a checkpoint and a mid-epoch resume continues from the next batch. (A
    plain DataLoader restarts the epoch at its first batch: Lightning warns "You're resuming from a
    checkpoint that ended before the epoch ended and your dataloader is not resumable".)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served, self.skip = 0, 0

    def __iter__(self):
        it, skip = super().__iter__(), self.skip
        self.served, self.skip = 0, 0
        for batch in it:
            self.served += 1
            if self.served > skip:
                yield batch

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.skip = state["served"]


def make_opt(model, params=None):
    """vSAM with a short warm-up and window, so a few steps see both kinds of step."""
    return vsam_ext.VSAM(model.parameters() if params is None else params, torch.optim.SGD, lr=0.05,
                         momentum=0.9, weight_decay=5e-4, rho=0.05, warmup_steps=3, window=5, model=model)


def make_sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def fp16_scaler():
    """fp16 on the CPU stands in for fp16 on a GPU (the README's recipes say "cuda")."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)


def fp16_loss(net, xb, yb):
    with torch.autocast("cpu", dtype=torch.float16):
        return F.cross_entropy(net(xb), yb)


def plain_run(steps, clip=None, fp16=False):
    """The README's plain loop: the reference every framework run is compared with. ``clip``:
    clip_grad_norm_ after each backward; ``fp16``: autocast + GradScaler handed to the step."""
    net = make_net()
    opt = make_opt(net)
    sched = make_sched(opt)
    scaler = fp16_scaler() if fp16 else None
    x, y = make_data()
    decisions, losses, calls = [], [], 0
    for step in range(steps):
        i = step % N_BATCHES
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]

        def closure():
            nonlocal calls
            calls += 1
            if fp16:
                loss = fp16_loss(net, xb, yb)
                scaler.scale(loss).backward()
            else:
                loss = F.cross_entropy(net(xb), yb)
                loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            return loss
        losses.append(opt.step(closure, grad_scaler=scaler))
        if fp16:
            scaler.update()
        sched.step()
        decisions.append(opt.stats["last_step_sam"])
    return net, opt, decisions, calls, losses


def assert_same_tensors(a, b):
    a, b = dict(a), dict(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------

def lightning_module_class(pl, automatic=True, fp16=False):
    """The README's LightningModule: automatic optimization (configure_optimizers returns the
    optimizer; Lightning's closure runs training_step + zero_grad + backward) or manual
    optimization (opt.step(closure) through LightningOptimizer; ``fp16``: autocast + our own
    GradScaler handed to the step, the Trainer left at precision="32-true")."""
    class Module(pl.LightningModule):
        def __init__(self, seed=0):
            super().__init__()
            self.automatic_optimization = automatic
            self.net = make_net(seed)
            self.scaler = fp16_scaler() if fp16 else None
            self.forwards = 0            # training_step's forward passes
            self.backwards = 0           # backward passes (on_after_backward)
            self.decisions = {}          # global step -> was it a SAM step
            self.losses = []             # the loss each step returned (the first pass's)

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            if self.automatic_optimization:
                self.forwards += 1
                return F.cross_entropy(self.net(xb), yb)
            opt = self.optimizers()

            def closure():
                self.forwards += 1
                if self.scaler is not None:
                    loss = fp16_loss(self.net, xb, yb)
                    self.manual_backward(self.scaler.scale(loss))
                else:
                    loss = F.cross_entropy(self.net(xb), yb)
                    self.manual_backward(loss)
                return loss
            loss = opt.step(closure, grad_scaler=self.scaler)   # through LightningOptimizer: counted
            self.losses.append(loss)
            self.log("train_loss", loss)
            if self.scaler is not None:
                self.scaler.update()
            self.lr_schedulers().step()
            return loss

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
            # Automatic optimization: training_step runs twice on SAM steps; the step returns the
            # first pass's loss, which is the one to log.
            loss = optimizer.step(closure=optimizer_closure)
            self.losses.append(loss)
            self.log("train_loss", loss)

        def on_after_backward(self):
            self.backwards += 1

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.decisions[self.trainer.global_step] = self.optimizers().stats["last_step_sam"]

        def configure_optimizers(self):
            opt = make_opt(self, self.net.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": make_sched(opt), "interval": "step"}}

        def on_save_checkpoint(self, checkpoint):
            if self.scaler is not None:
                checkpoint["grad_scaler"] = self.scaler.state_dict()

        def on_load_checkpoint(self, checkpoint):
            if self.scaler is not None:
                self.scaler.load_state_dict(checkpoint["grad_scaler"])
    return Module


def make_trainer(pl, tmp_path, max_steps, callbacks=(), **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(callbacks),
                      callbacks=list(callbacks), default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


@pytest.fixture
def pl():
    pl = pytest.importorskip("lightning.pytorch")
    warnings.filterwarnings("ignore", module="lightning")
    return pl


@pytest.mark.parametrize("automatic, clip, fp16", [(True, None, False), (True, 0.1, False), (False, None, False),
                                                    (False, None, True)],
                         ids=["automatic", "automatic-clip", "manual", "manual-fp16"])
def test_lightning_counts_steps_and_matches_the_plain_loop(pl, tmp_path, automatic, clip, fp16):
    """max_steps is honoured, global_step counts optimizer steps, the closure runs once per step
    and once more per SAM step, and the run equals the plain loop bit for bit (decisions, weights,
    BatchNorm statistics). Trainer(gradient_clip_val=...) clips after every closure call, as the
    README's plain recipe clips after every backward."""
    steps = 12                                    # crosses an epoch boundary (8 batches)
    module = lightning_module_class(pl, automatic, fp16)()
    trainer = make_trainer(pl, tmp_path, steps, **({} if clip is None else {"gradient_clip_val": clip}))
    trainer.fit(module, make_loader())
    opt = module.optimizers().optimizer
    stats = opt.stats
    assert trainer.global_step == steps and stats["steps"] == steps      # max_steps honoured
    assert 0 < stats["sam_steps"] < steps and stats["skipped_steps"] == 0
    # The closure ran once per step plus once more per SAM step, forward and backward alike.
    assert module.forwards == module.backwards == steps + stats["sam_steps"]
    net, ref, decisions, calls, losses = plain_run(steps, clip=clip, fp16=fp16)
    assert [module.decisions[s] for s in range(1, steps + 1)] == decisions
    assert torch.equal(torch.stack(module.losses), torch.stack(losses))
    assert torch.equal(trainer.callback_metrics["train_loss"], losses[-1])
    assert calls == module.forwards and ref.stats == stats
    assert_same_tensors(module.net.state_dict(), net.state_dict())      # weights and BN statistics
    if clip is not None:                          # the clip did bite
        assert not torch.equal(net[0].weight, plain_run(steps)[0][0].weight)


def test_lightning_two_call_form_is_not_counted(pl, tmp_path):
    """Why the README recommends opt.step(closure) in manual optimization: Lightning counts a step
    when LightningOptimizer.step() runs, so first_step()/second_step() leave global_step at 0 and
    max_steps and step-based checkpoints never fire."""
    class TwoCall(lightning_module_class(pl, automatic=False)):
        def training_step(self, batch, batch_idx):
            xb, yb = batch
            opt = self.optimizers()
            self.manual_backward(F.cross_entropy(self.net(xb), yb))
            if opt.first_step():
                self.manual_backward(F.cross_entropy(self.net(xb), yb))
            opt.second_step()
    module = TwoCall()
    trainer = make_trainer(pl, tmp_path, max_steps=4, max_epochs=2)
    trainer.fit(module, make_loader())
    assert trainer.global_step == 0 and module.optimizers().optimizer.stats["steps"] == 2 * N_BATCHES


def test_lightning_16_mixed_refuses_at_the_first_step(pl, tmp_path):
    """precision="16-mixed" (a GPU gives it a GradScaler; here one is handed in on the CPU): Lightning
    runs the closure itself, then GradScaler.step(optimizer) without it, so no second pass can
    run: our step raises TypeError and the weights are left as they were (README: use
    manual optimization with a scaler of your own for fp16)."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    module = lightning_module_class(pl)()
    before = {k: v.detach().clone() for k, v in module.net.named_parameters()}
    trainer = make_trainer(pl, tmp_path, 4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=fp16_scaler())])
    with pytest.raises(TypeError, match="needs a closure"):
        trainer.fit(module, make_loader())
    assert module.forwards == 1 and module.optimizers().optimizer.stats["steps"] == 0
    assert_same_tensors(module.net.named_parameters(), before)    # (the forward ran: BN statistics moved)


@pytest.mark.parametrize("every, resumable, automatic", [(4, True, True), (8, False, True), (4, True, False)],
                         ids=["mid-epoch", "epoch-end", "manual-fp16-mid-epoch"])
def test_lightning_checkpoint_resume_equals_an_uninterrupted_run(pl, tmp_path, every, resumable, automatic):
    """ModelCheckpoint writes every ``every`` steps; fit(ckpt_path=...) from the first checkpoint, in a
    fresh module, continues exactly as the uninterrupted run: the optimizer's state_dict carries the
    base optimizer's state, the PSF and the controller (histories, random state); Lightning carries
    the weights, BatchNorm statistics, the LR scheduler and the step counters (and, in the manual
    fp16 recipe, the GradScaler through on_save_checkpoint / on_load_checkpoint). A mid-epoch
    checkpoint needs a resumable loader (ResumableLoader); at an epoch's end a DataLoader will do."""
    steps = 14
    Module = lightning_module_class(pl, automatic, fp16=not automatic)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=every,
                                              save_top_k=-1, filename="{step}")
    whole = Module()
    make_trainer(pl, tmp_path / "whole", steps, callbacks=[checkpoint]).fit(whole, make_loader(resumable))
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == sorted(f"step={s}.ckpt" for s in range(every, steps + 1, every))

    resumed = Module(seed=5)                     # other weights: the checkpoint must restore them
    trainer = make_trainer(pl, tmp_path / "resumed", steps)
    trainer.fit(resumed, make_loader(resumable), ckpt_path=str(tmp_path / "ckpt" / f"step={every}.ckpt"))
    assert trainer.global_step == steps
    opt, ref = resumed.optimizers().optimizer, whole.optimizers().optimizer
    assert opt.stats == ref.stats
    assert resumed.decisions == {s: whole.decisions[s] for s in range(every + 1, steps + 1)}
    assert_same_tensors(resumed.net.state_dict(), whole.net.state_dict())


# ---------------------------------------------------------------------------------------------
# HF accelerate
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    yield accelerate
    AcceleratorState._reset_state(True)          # the process-wide singletons of Accelerator()
    GradientState._reset_state()


def accelerate_run(accelerate, steps, start=0, seed=0, resume_from=None, save_at=None, save_dir=None,
                   fp16=False):
    """The README's accelerate recipe: move the model to accelerator.device, build the optimizer,
    prepare model + optimizer + loader + scheduler, closure with accelerator.backward. ``fp16``:
    the scaler and the autocast forward that mixed_precision="fp16" brings on a GPU (on the CPU
    accelerate has no fp16 scaler, so they are put in by hand), the step called as the README says."""
    accelerator = accelerate.Accelerator(cpu=True)
    if fp16:
        accelerator.scaler = fp16_scaler()
    net = make_net(seed).to(accelerator.device)
    opt = make_opt(net)
    model, popt, loader, sched = accelerator.prepare(net, opt, make_loader(), make_sched(opt))
    assert isinstance(popt, accelerate.optimizer.AcceleratedOptimizer) and popt.optimizer is opt
    if resume_from is not None:
        accelerator.load_state(resume_from)
    decisions, calls, step = {}, 0, start
    while step < steps:
        batches = loader if step % N_BATCHES == 0 else accelerator.skip_first_batches(loader, step % N_BATCHES)
        for xb, yb in batches:
            def closure():
                nonlocal calls
                calls += 1
                loss = fp16_loss(model, xb, yb) if fp16 else F.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                return loss
            if fp16:                             # the scaler goes to our step (README)
                popt.optimizer.step(closure, grad_scaler=accelerator.scaler)
                accelerator.scaler.update()
            else:
                assert popt.step(closure) is None    # AcceleratedOptimizer.step(closure) -> VSAM.step(closure)
            sched.step()
            step += 1
            decisions[step] = opt.stats["last_step_sam"]
            if step == save_at:
                accelerator.save_state(save_dir)
            if step == steps:
                break
    return net, opt, decisions, calls


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_accelerate_prepare_and_closure_match_the_plain_loop(accelerate, fp16):
    steps = 12
    net, opt, decisions, calls = accelerate_run(accelerate, steps, fp16=fp16)
    ref_net, ref, ref_decisions, ref_calls, _ = plain_run(steps, fp16=fp16)
    assert opt.stats == ref.stats and 0 < opt.stats["sam_steps"] < steps and opt.stats["skipped_steps"] == 0
    assert list(decisions.values()) == ref_decisions and calls == ref_calls == steps + opt.stats["sam_steps"]
    assert_same_tensors(net.state_dict(), ref_net.state_dict())


def test_accelerate_save_state_resume_equals_an_uninterrupted_run(accelerate, tmp_path):
    """accelerator.save_state / load_state carry our state_dict (base state, PSF, controller)."""
    steps, at = 12, 5
    whole, whole_opt, whole_decisions, _ = accelerate_run(accelerate, steps, save_at=at, save_dir=str(tmp_path))
    net, opt, decisions, _ = accelerate_run(accelerate, steps, start=at, seed=5, resume_from=str(tmp_path))
    assert decisions == {s: d for s, d in whole_decisions.items() if s > at}
    assert opt.stats == whole_opt.stats
    assert_same_tensors(net.state_dict(), whole.state_dict())


def test_accelerate_save_state_with_default_safetensors_round_trips(accelerate, tmp_path):
    """accelerate's default (safetensors) save_state keeps every parameter: each has a storage of
    its own inside the flat buffer. (When parameters were views of one storage, accelerate took
    them for tied weights, wrote only the first, and load_state failed.)"""
    safetensors = pytest.importorskip("safetensors.torch")
    accelerator = accelerate.Accelerator(cpu=True)
    net = make_net()
    model, popt = accelerator.prepare(net, make_opt(net))
    saved_state = {k: v.clone() for k, v in net.state_dict().items()}
    accelerator.save_state(str(tmp_path / "safe"))
    saved = safetensors.load_file(str(tmp_path / "safe" / "model.safetensors"))
    assert set(saved) == set(net.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    accelerator.load_state(str(tmp_path / "safe"))
    assert_same_tensors(net.state_dict(), saved_state)


def test_accelerate_fp16_wrapper_step_cannot_run_the_closure(accelerate):
    """Why the README calls opt.optimizer.step(closure, grad_scaler=...) under fp16: with a scaler,
    AcceleratedOptimizer.step(closure) calls GradScaler.step(opt, closure), which cannot run a
    closure: it fails on the first step, before anything changed."""
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = fp16_scaler()
    net = make_net()
    model, popt = accelerator.prepare(net, make_opt(net))
    x, y = make_data()

    def closure():
        loss = fp16_loss(model, x[:BATCH], y[:BATCH])
        accelerator.backward(loss)
        return loss
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises((AssertionError, RuntimeError)):
        popt.step(closure)
    assert_same_tensors(net.state_dict(), before)
    assert popt.optimizer.stats["steps"] == 0
