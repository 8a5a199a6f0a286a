"""One training run: a model, an optimizer by name, a seed; epochs of SGD/SAM-family steps with a
cosine learning rate, evaluation after every epoch, and the controller's statistics recorded.

Timing follows the vSAM paper's AIS (images per second over the whole run): the clock runs over
the training steps *including* batch gathering and augmentation, and stops for evaluation. On a
GPU the device is synchronised before every clock reading (once per epoch), so the timing is
true; the progress bar reads the loss every ``refresh`` steps (one sync each).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import AESAM, AUSAM, ESAM, MESA, SAF, SAM, VSAM, LookSAM, PeriodicSAM
from ..controller import vsam_schedule      # the library's rule (VSAM(total_steps=...)): one place
from .data import Data, batches, steps_per_epoch
from .models import build_model

__all__ = ["OPTIMIZERS", "TrainConfig", "vsam_schedule", "kl_schedule", "make_optimizer", "make_kl_loss",
           "train_run", "evaluate"]

OPTIMIZERS = ("sgd", "sam", "sam5", "vsam", "vsam-a", "asam", "looksam", "aesam", "esam", "ausam", "saf", "mesa")
VSAM_LIKE = ("vsam", "vsam-a")
PER_SAMPLE = ("esam", "ausam")       # closure(indices) -> per-sample losses
KL_LOSSES = ("saf", "mesa")          # SGD + a loss object (vsam_ext.SAF / MESA), one pass per step

# The authors' SAF/MESA schedule is for CIFAR-10, 200 epochs at batch 128 (390 steps an epoch):
# the KL term from epoch 5 on, MESA's EMA decay 0.9998 (a memory of 1 / (1 - d) = 5000 steps).
AUTHORS_EPOCHS, AUTHORS_KL_START, AUTHORS_STEPS, AUTHORS_DECAY = 200, 5, 200 * 390, 0.9998


def kl_schedule(epochs: int, total_steps: int, kl_start_epoch: Optional[int] = None,
                mesa_decay: Optional[float] = None) -> Tuple[int, float]:
    """SAF's and MESA's ``(kl_start_epoch, decay)`` scaled to the run, as vSAM's warm-up is:
    the KL term starts at the same fraction of the epochs as the authors' 5 of 200
    (``round(5 / 200 * epochs)``; it ends with the run), and the EMA's memory ``1 / (1 - d)`` is
    the same fraction of the steps as the authors' 5000 of 78 000 (``d = 1 - 0.0002 * 78000 /
    total_steps``, at least 0); a value given wins."""
    start = round(AUTHORS_KL_START / AUTHORS_EPOCHS * epochs) if kl_start_epoch is None else kl_start_epoch
    decay = max(0.0, 1.0 - (1.0 - AUTHORS_DECAY) * AUTHORS_STEPS / max(1, total_steps)) \
        if mesa_decay is None else mesa_decay
    return start, decay


@dataclass
class TrainConfig:
    model: str = "cnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.1
    rho: float = 0.05
    warmup_steps: int = 0        # vSAM warm-up (resolved by vsam_schedule)
    window: int = 50             # vSAM window K (resolved by vsam_schedule)
    period: int = 5              # SAM-k period of "sam5"
    vsam_options: Optional[dict] = None   # more VSAM arguments (lambdas, max_rate, reuse_decay, ...)
    asam_rho: float = 0.5        # ASAM's own radius (the authors' CIFAR value for the official flavour)
    looksam_k: int = 5
    looksam_alpha: float = 0.7
    esam_beta: float = 0.5
    esam_gamma: float = 0.5
    ausam_alpha: float = 0.5
    ausam_ramp_epochs: Optional[int] = None   # None: the authors' 30 of 200 epochs, scaled to the run
    saf_lam: float = 0.3
    saf_epochs_ago: int = 3
    mesa_lam: float = 0.8
    kl_temperature: float = 5.0
    kl_start_epoch: Optional[int] = None      # None: the authors' 5 of 200 epochs, scaled (kl_schedule)
    mesa_decay: Optional[float] = None        # None: the authors' 0.9998 scaled to the run's steps
    device: str = "cpu"
    backend: Optional[str] = None
    eval_batch: Optional[int] = None   # None: 1000 on CUDA, 128 on the CPU (1000 there ran 2.3x
                                       # slower on one thread: its activations overflow the caches)
    progress: bool = True
    refresh: int = 20            # progress-bar refresh (loss read-back) every this many steps
    drop_last: bool = True
    augment: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(name: str, model: nn.Module, cfg: TrainConfig, seed: int, total_steps: int = 1,
                   num_samples: int = 1) -> torch.optim.Optimizer:
    """``sgd``: torch.optim.SGD; ``sam``: SAM; ``sam5``: PeriodicSAM(period); ``vsam``: VSAM;
    ``vsam-a``: VSAM(reuse_decay=0); ``asam``: SAM(adaptive=True, rho=asam_rho); ``looksam``,
    ``aesam`` (over ``total_steps``), ``esam``, ``ausam`` (over ``num_samples``); ``saf``,
    ``mesa``: torch.optim.SGD (their loss comes from ``make_kl_loss``). All: SGD base with
    momentum, weight decay; same LR."""
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    params = model.parameters()
    if name == "sgd" or name in KL_LOSSES:
        return torch.optim.SGD(params, **base)
    common = dict(rho=cfg.rho, model=model, backend=cfg.backend)
    if name == "sam":
        return SAM(params, torch.optim.SGD, **common, **base)
    if name == "sam5":
        return PeriodicSAM(params, torch.optim.SGD, period=cfg.period, **common, **base)
    if name in VSAM_LIKE:
        extra = dict(cfg.vsam_options or {})
        if name == "vsam-a":
            extra["reuse_decay"] = 0.0        # the paper's ablation: adaptive sampling, no PSF reuse
        return VSAM(params, torch.optim.SGD, warmup_steps=cfg.warmup_steps, window=cfg.window, seed=seed,
                    **extra, **common, **base)
    if name == "asam":
        return SAM(params, torch.optim.SGD, adaptive=True, **dict(common, rho=cfg.asam_rho), **base)
    if name == "looksam":
        return LookSAM(params, torch.optim.SGD, k=cfg.looksam_k, alpha=cfg.looksam_alpha, **common, **base)
    if name == "aesam":
        return AESAM(params, torch.optim.SGD, total_steps=max(1, total_steps), **common, **base)
    if name == "esam":
        return ESAM(params, torch.optim.SGD, beta=cfg.esam_beta, gamma=cfg.esam_gamma, seed=seed, **common, **base)
    if name == "ausam":
        ramp = cfg.ausam_ramp_epochs if cfg.ausam_ramp_epochs is not None else round(30 / 200 * cfg.epochs)
        return AUSAM(params, torch.optim.SGD, num_samples=num_samples, alpha=cfg.ausam_alpha, ramp_epochs=ramp,
                     seed=seed, **common, **base)
    raise ValueError(f"unknown optimizer {name!r}; known: {list(OPTIMIZERS)}")


def make_kl_loss(name: str, model: nn.Module, cfg: TrainConfig, total_steps: int, num_samples: int,
                 num_classes: int):
    """``saf``: ``vsam_ext.SAF`` (its table on the training device), ``mesa``: ``vsam_ext.MESA``,
    with the authors' defaults and ``kl_schedule``'s start and decay; None for the others."""
    if name not in KL_LOSSES:
        return None
    start, decay = kl_schedule(cfg.epochs, total_steps, cfg.kl_start_epoch, cfg.mesa_decay)
    common = dict(epochs=cfg.epochs, temperature=cfg.kl_temperature, kl_start_epoch=start)
    if name == "saf":
        return SAF(num_samples, num_classes, lam=cfg.saf_lam, epochs_ago=cfg.saf_epochs_ago, device=cfg.device,
                   **common)
    return MESA(model, lam=cfg.mesa_lam, decay=decay, **common)


class StatsRecorder:
    """The controller's statistics over the steps of one run (host-side, no device reads).

    * every step: ``opt.stats`` -> the steps that were SAM steps, and (quota, probability) when
      they change (a window boundary); the probability recorded is the one in effect, 1 during
      vSAM's warm-up (the controller's own ``p`` is ``s / K`` there too, but unused);
    * PSF norm and PSF/gradient ratio: the VSAM controller receives them through
      ``controller.push_stats(psf_norm, grad_norm)``, lazily (once per window, from the
      optimizer's deferred queue); this recorder wraps that method on the instance to see
      every pair in order, so nothing is lost to the bounded histories ``H``/``R``. The k-th
      pair belongs to the k-th SAM step, whose step number is known from ``last_step_sam``.
      ``flush()`` (once per epoch and at the end) calls ``opt.flush_stats()`` so the pairs
      queued on the device arrive before they are read: on a GPU one sync per epoch.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.has_stats = hasattr(opt, "controller")
        self.is_vsam = isinstance(opt, VSAM)
        self.sam_at: List[int] = []          # step numbers (1-based) of the SAM steps (vSAM only)
        self.trace_step: List[int] = []
        self.trace_quota: List[Optional[float]] = []
        self.trace_prob: List[float] = []
        self.psf_step: List[int] = []
        self.psf_norm: List[float] = []
        self.grad_norm: List[float] = []
        self.sam_steps = 0
        self.sample_fraction_sum = 0.0       # ESAM/AUSAM: share of the batch the SAM passes used
        self.warmup = opt.controller.warmup_steps if self.is_vsam else 0
        if self.is_vsam:
            ctrl = opt.controller
            original = ctrl.push_stats

            def push_stats(psf_norm, grad_norm, _original=original):
                k = len(self.psf_norm)
                self.psf_step.append(self.sam_at[k] if k < len(self.sam_at) else -1)
                self.psf_norm.append(float(psf_norm))
                self.grad_norm.append(float(grad_norm))
                return _original(psf_norm, grad_norm)

            ctrl.push_stats = push_stats      # instance attribute: this optimizer only

    def after_step(self, step: int) -> None:
        if not self.has_stats:
            return
        st = self.opt.stats
        self.sam_steps = st["sam_steps"]
        self.sample_fraction_sum += st.get("sample_fraction", 1.0)
        if self.is_vsam and st["last_step_sam"]:
            self.sam_at.append(step)
        q, p = st.get("quota"), st.get("probability")
        if self.is_vsam and step <= self.warmup:
            p = 1.0                           # in effect during warm-up: every step is a SAM step
        if not self.trace_step or q != self.trace_quota[-1] or p != self.trace_prob[-1]:
            self.trace_step.append(step)
            self.trace_quota.append(q)
            self.trace_prob.append(p)

    def flush(self) -> None:
        if self.is_vsam:
            self.opt.flush_stats()

    def to_dict(self, last_step: int) -> dict:
        out: Dict[str, object] = {}
        if self.has_stats:
            out["trace"] = {"step": self.trace_step + [last_step], "quota": self.trace_quota + self.trace_quota[-1:],
                            "probability": self.trace_prob + self.trace_prob[-1:]}
        if self.is_vsam:
            out["sam_step_numbers"] = self.sam_at
            ratio = [p / g if g > 0 else float("nan") for p, g in zip(self.psf_norm, self.grad_norm)]
            out["psf"] = {"step": self.psf_step, "psf_norm": self.psf_norm, "grad_norm": self.grad_norm,
                          "ratio": ratio, "tensors": "last stat_tensors parameter tensors"}
        return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> Tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy in %, in eval mode."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += nn.functional.cross_entropy(out.float(), y[i:i + batch], reduction="sum")
        correct += (out.argmax(1) == y[i:i + batch]).sum()
    model.train(was)
    n = max(1, len(y))
    return loss.item() / n, 100.0 * correct.item() / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(opt_name: str, seed: int, data: Data, cfg: TrainConfig, position: int = 0,
              log=print) -> dict:
    """Train ``cfg.model`` with ``opt_name`` from ``seed``; returns the run's record (every epoch,
    the final numbers, the controller's statistics)."""
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    eval_batch = cfg.eval_batch or (1000 if device.type == "cuda" else 128)
    torch.manual_seed(seed)                  # same initial weights for every optimizer
    model = build_model(cfg.model, data.num_classes).to(device)
    spe = steps_per_epoch(len(data.y_train), cfg.batch_size, cfg.drop_last)
    total = spe * cfg.epochs
    opt = make_optimizer(opt_name, model, cfg, seed, total_steps=total, num_samples=len(data.y_train))
    kl_loss = make_kl_loss(opt_name, model, cfg, total, len(data.y_train), data.num_classes)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))   # per step
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    per_sample = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)                    # same batches and augmentations for every optimizer
    rec = StatsRecorder(opt)
    backend = opt.stats.get("backend") if hasattr(opt, "controller") else "torch"

    epochs: List[dict] = []
    step = 0
    images = 0
    train_time = 0.0
    cpu_time = 0.0              # process CPU time of the training steps (all threads)
    eval_time = 0.0
    diverged = False
    start = time.perf_counter()
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(total=total, desc=f"{opt_name:>6} seed {seed}", unit="step", leave=True, position=position,
               disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        c0 = time.process_time()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        scored = 0                   # samples of the first passes (AUSAM: a subset of each batch)
        for x, y, idx in batches(data, cfg.batch_size, gen, drop_last=cfg.drop_last, augment=cfg.augment):
            first: List[torch.Tensor] = []     # the first pass's outputs and labels (training accuracy)

            def closure(x=x, y=y, first=first):
                out = model(x)
                loss = criterion(out, y)
                loss.backward()
                if not first:
                    first += [out.detach(), y]
                return loss

            def sample_closure(indices=None, x=x, y=y, first=first):
                xb, yb = (x, y) if indices is None else (x[indices], y[indices])
                out = model(xb)
                if not first:
                    first += [out.detach(), yb]
                return per_sample(out, yb)

            if opt_name == "sgd":
                opt.zero_grad(set_to_none=True)
                loss = closure()
                opt.step()
            elif opt_name in KL_LOSSES:          # epochs are 1-based here, 0-based for SAF/MESA
                opt.zero_grad(set_to_none=True)
                out = model(x)
                loss = criterion(out, y) + kl_loss.kl_term(out, idx if opt_name == "saf" else x, epoch - 1)
                loss.backward()
                opt.step()
                if opt_name == "mesa":
                    kl_loss.update()
                first += [out.detach(), y]
            elif opt_name == "ausam":
                loss = opt.step(sample_closure, idx)
            elif opt_name in PER_SAMPLE:
                loss = opt.step(sample_closure)
            else:
                loss = opt.step(closure)
            sched.step()
            step += 1
            seen += len(y)
            scored += len(first[1])
            loss_sum += loss.detach() * len(first[1])
            correct += (first[0].argmax(1) == first[1]).sum()
            rec.after_step(step)
            if cfg.progress and step % cfg.refresh == 0:
                post = {"loss": f"{loss_sum.item() / scored:.3f}", "acc": f"{100.0 * correct.item() / scored:.1f}",
                        "sam": f"{rec.sam_steps / step:.2f}"}
                bar.set_postfix(post, refresh=False)
            bar.update(1)
        rec.flush()
        _sync(device)
        train_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
        images += seen
        t1 = time.perf_counter()
        train_loss = loss_sum.item() / max(1, scored)
        train_acc = 100.0 * correct.item() / max(1, scored)
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test, eval_batch)
        row = {"epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"],
               "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
               "sam_steps": rec.sam_steps if rec.has_stats else 0,
               "images": images, "train_time": train_time, "train_cpu_time": cpu_time}
        if data.y_val is not None:
            row["val_loss"], row["val_acc"] = evaluate(model, data.x_val, data.y_val, eval_batch)
        eval_time += time.perf_counter() - t1
        epochs.append(row)
        bar.set_postfix({"loss": f"{train_loss:.3f}", "acc": f"{train_acc:.1f}",
                         "sam": f"{(rec.sam_steps / step) if step else 0:.2f}", "test": f"{test_acc:.2f}"},
                        refresh=True)
        if not math.isfinite(train_loss):
            diverged = True
            log(f"{opt_name} seed {seed}: the training loss is {train_loss} at epoch {epoch}: stopping this run")
            break
    bar.close()
    last = epochs[-1]
    final = {"test_acc": last["test_acc"], "test_loss": last["test_loss"], "train_loss": last["train_loss"],
             "train_acc": last["train_acc"], "steps": step,
             "sam_steps": rec.sam_steps if rec.has_stats else 0,
             "sam_fraction": (rec.sam_steps / step) if (rec.has_stats and step) else 0.0,
             "sample_fraction": (rec.sample_fraction_sum / step) if (rec.has_stats and step) else 1.0,
             "train_time": train_time, "train_cpu_time": cpu_time, "eval_time": eval_time, "wall_time": time.perf_counter() - start,
             "images": images, "ais": images / train_time if train_time > 0 else float("nan"),
             "diverged": diverged}
    if "val_acc" in last:
        final["val_acc"] = last["val_acc"]
    run = {"optimizer": opt_name, "seed": seed, "backend": backend, "epochs": epochs, "final": final}
    if kl_loss is not None:
        run["kl_loss"] = {"lam": kl_loss.lam, "temperature": kl_loss.temperature,
                          "kl_start_epoch": kl_loss.kl_start_epoch, "kl_end_epoch": kl_loss.kl_end_epoch,
                          "epochs_numbered_from": 0, "memory_bytes": kl_loss.memory_bytes,
                          **({"epochs_ago": kl_loss.epochs_ago} if opt_name == "saf" else
                             {"decay": kl_loss.decay, "updates": kl_loss.updates})}
    run.update(rec.to_dict(step))
    return run
