"""The step behaves as torch.optim's in the ways people train (issue "Drop-in without
surprises", items 1, 2, 3, 5): the two-call form's first step, torch.compile, the base
optimizer's step hooks / profiling record / LR-scheduler contract on the fused path, and
closures that break the contract."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx
from helpers import batch, closure_for, make_mlp

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)


class TwoHeads(torch.nn.Module):
    """A body and two heads; ``head_b`` is used only when asked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)
        self.head_a = torch.nn.Linear(8, 3)
        self.head_b = torch.nn.Linear(8, 3)

    def forward(self, x, use_b=False):
        h = torch.tanh(self.body(x))
        return self.head_a(h) + (self.head_b(h) if use_b else 0)


def _two_call(opt, loss_fn):
    """The README's two-call loop: zero_grad only after the step."""
    loss_fn().backward()
    if opt.first_step():
        loss_fn().backward()
    opt.second_step(zero_grad=True)


def _two_call_step(model, opt, t, use_b=False):
    x, y = batch(t, torch.float64)
    _two_call(opt, lambda: F.cross_entropy(model(x, use_b) if use_b else model(x), y))


def _torch_sgd_run(steps, use_b_on):
    model = TwoHeads().double()
    opt = torch.optim.SGD(model.parameters(), **SGD_KW)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = batch(t, torch.float64)
        F.cross_entropy(model(x, use_b_on(t)), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("fused_base", [True, False])
def test_two_call_form_leaves_a_parameter_without_gradient_alone_from_the_first_step(fused_base):
    model = TwoHeads().double()
    head_b = [p.detach().clone() for p in model.head_b.parameters()]
    opt = vx.SAM(model.parameters(), torch.optim.SGD, rho=0.0, fused_base=fused_base, **SGD_KW)
    _two_call_step(model, opt, 0, use_b=False)
    for p, q in zip(model.head_b.parameters(), head_b):
        assert torch.equal(p.detach(), q)          # was moved 2.6e-4 (weight decay + momentum start)


@pytest.mark.parametrize("fused_base", [True, False])
def test_two_call_form_with_a_branch_on_odd_steps_equals_torch_sgd(fused_base):
    """rho = 0: SAM is its base optimizer, so the run must be torch.optim.SGD's, where a
    parameter without gradient is skipped (its momentum starts when it first gets one)."""
    model = TwoHeads().double()
    opt = vx.SAM(model.parameters(), torch.optim.SGD, rho=0.0, fused_base=fused_base, **SGD_KW)
    for t in range(9):
        _two_call_step(model, opt, t, use_b=t % 2 == 1)
    want = _torch_sgd_run(9, lambda t: t % 2 == 1)
    for p, q in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)   # was 1.5e-3 off


def test_two_call_form_a_group_added_between_steps_starts_without_gradient():
    model = TwoHeads().double()
    opt = vx.SAM(list(model.body.parameters()) + list(model.head_a.parameters()), torch.optim.SGD, rho=0.0,
                 **SGD_KW)
    _two_call_step(model, opt, 0, use_b=False)
    opt.add_param_group({"params": list(model.head_b.parameters())})
    head_b = [p.detach().clone() for p in model.head_b.parameters()]
    _two_call_step(model, opt, 1, use_b=False)
    for p, q in zip(model.head_b.parameters(), head_b):
        assert torch.equal(p.detach(), q)


def test_a_gradient_made_after_model_zero_grad_does_not_leak_into_the_next_step():
    """model.zero_grad() sets .grad to None (Lightning calls it at every fit start); a backward
    then makes new .grad tensors outside the flat buffer. step(closure) zeroes before its closure,
    so that gradient must not be added to the step's (it was: up to 2.5e-4 off)."""
    def run(stray):
        model = make_mlp(dtype=torch.float64)
        opt = vx.SAM(model.parameters(), torch.optim.SGD, **SGD_KW)
        opt.step(closure_for(model, opt, 0, torch.float64))
        if stray:
            model.zero_grad(set_to_none=True)
            x, y = batch(5, torch.float64)
            F.cross_entropy(model(x), y).backward()
        opt.step(closure_for(model, opt, 1, torch.float64))
        return [p.detach().clone() for p in model.parameters()]
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["sam", "vsam", "sam5"])
def test_two_call_form_with_model_zero_grad_leaves_an_unused_parameter_alone(name):
    """model.zero_grad() (grads set to None) between two-call steps: a parameter used on step 0
    only must not be stepped on step 1 (it was: momentum and weight decay moved it by 0.04)."""
    a, b = torch.nn.Linear(2, 1).double(), torch.nn.Linear(2, 1).double()
    params = list(a.parameters()) + list(b.parameters())
    opt = {"sam": lambda: vx.SAM(params, torch.optim.SGD, **SGD_KW),
           "vsam": lambda: vx.VSAM(params, torch.optim.SGD, window=4, slices=1, warmup_steps=2, **SGD_KW),
           "sam5": lambda: vx.PeriodicSAM(params, torch.optim.SGD, period=5, **SGD_KW)}[name]()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        def loss():
            return (a(x) + (b(x) if step == 0 else 0)).pow(2).mean()
        loss().backward()
        if opt.first_step():
            loss().backward()
        opt.second_step()                      # no zero_grad here: the model's zero_grad instead
        a.zero_grad(), b.zero_grad()
        if step == 0:
            b0 = [p.detach().clone() for p in b.parameters()]
    for p, q in zip(b.parameters(), b0):
        assert torch.equal(p.detach(), q)


def test_shared_memory_parameters_are_refused():
    """Hogwild: the optimizer would copy shared parameters into its own buffer and the processes
    would silently stop sharing them."""
    model = make_mlp().share_memory()
    with pytest.raises(ValueError, match="shared memory"):
        vx.SAM(model.parameters(), torch.optim.SGD, lr=0.1)


def test_parameters_replaced_after_construction_are_named_in_the_error():
    model = make_mlp(dtype=torch.float64)
    opt = vx.SAM(model.parameters(), torch.optim.SGD, **SGD_KW)
    model.load_state_dict(make_mlp(seed=3, dtype=torch.float64).state_dict(), assign=True)
    with pytest.raises(RuntimeError, match="assign=True"):
        opt.step(closure_for(model, opt, 0, torch.float64))


# -- torch.compile --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled frames and their fake tensors do not outlive a test."""
    yield
    torch._dynamo.reset()

def _vsam(model):
    return vx.VSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, window=4, slices=1,
                   warmup_steps=2, stat_tensors=2)


def test_a_compiled_step_equals_the_eager_one():
    """torch.compile(opt.step) used to lose the host bookkeeping at its graph breaks (every cheap
    step reused nothing: 1.4e-2 off after 8 steps). The steps run eagerly under compile."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = make_mlp(dtype=torch.float64)
        opt = _vsam(model)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        decisions = []
        for t in range(16):
            step(closure_for(model, opt, t, torch.float64))
            decisions.append(opt.stats["last_step_sam"])
        runs.append((decisions, [p.detach().clone() for p in model.parameters()], opt.stats["reused_steps"]
                     if "reused_steps" in opt.stats else None))
    (d0, p0, _), (d1, p1, _) = runs
    assert d0 == d1 and True in d0 and False in d0
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)


def test_a_compiled_model_inside_the_closure_is_compiled_and_trains_alike():
    torch._dynamo.reset()
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    results = []
    for compiled in (False, True):
        model = make_mlp(dtype=torch.float64)
        run_model = torch.compile(model, backend=counting_backend) if compiled else model
        opt = _vsam(model)
        for t in range(10):
            x, y = batch(t, torch.float64)
            opt.step(lambda: F.cross_entropy(run_model(x), y).backward())
        results.append([p.detach().clone() for p in model.parameters()])
    assert frames, "the model passed through torch.compile's backend: it was compiled"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- the base optimizer's machinery on the fused path -----------------------------------------------

def _count_hooks(opt):
    calls = {"pre": 0, "post": 0}
    opt.register_step_pre_hook(lambda *a: calls.__setitem__("pre", calls["pre"] + 1))
    opt.register_step_post_hook(lambda *a: calls.__setitem__("post", calls["post"] + 1))
    return calls


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, dict(lr=1e-3))])
@pytest.mark.parametrize("form", ["closure", "two-call"])
def test_step_hooks_of_both_optimizers_fire_once_per_step(base, kw, form):
    model = make_mlp(dtype=torch.float64)
    opt = vx.VSAM(model.parameters(), base, window=4, slices=1, warmup_steps=2, **kw)
    assert opt._fused_base is not None                      # the fused path is what is tested
    ours, theirs = _count_hooks(opt), _count_hooks(opt.base_optimizer)
    for t in range(7):
        if form == "closure":
            opt.step(closure_for(model, opt, t, torch.float64))
        else:
            _two_call_step(model, opt, t)
    assert ours == {"pre": 7, "post": 7} and theirs == {"pre": 7, "post": 7}


@pytest.mark.parametrize("attach", ["base", "wrapper"])
@pytest.mark.parametrize("form", ["closure", "two-call"])
def test_lr_schedulers_see_the_step(attach, form):
    model = make_mlp(dtype=torch.float64)
    opt = vx.SAM(model.parameters(), torch.optim.SGD, **SGD_KW)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer if attach == "base" else opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # "lr_scheduler.step() before optimizer.step()"
        for t in range(4):
            if form == "closure":
                opt.step(closure_for(model, opt, t, torch.float64))
            else:
                _two_call_step(model, opt, t)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_the_fused_step_keeps_the_base_optimizers_profiling_record():
    model = make_mlp(dtype=torch.float64)
    opt = vx.SAM(model.parameters(), torch.optim.SGD, **SGD_KW)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure_for(model, opt, 0, torch.float64))
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#SGD.step" in names and "Optimizer.step#SAM.step" in names


# -- closures that break the contract --------------------------------------------------------------

@pytest.mark.parametrize("name", ["sam", "vsam", "looksam", "aesam"])
def test_a_closure_without_backward_is_a_clear_error_and_changes_nothing(name):
    model = make_mlp(dtype=torch.float64)
    build = {"sam": lambda ps: vx.SAM(ps, torch.optim.SGD, **SGD_KW),
             "vsam": lambda ps: _vsam(model),
             "looksam": lambda ps: vx.LookSAM(ps, torch.optim.SGD, k=2, **SGD_KW),
             "aesam": lambda ps: vx.AESAM(ps, torch.optim.SGD, total_steps=10, **SGD_KW)}[name]
    opt = build(model.parameters())
    opt.step(closure_for(model, opt, 0, torch.float64))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.base_optimizer.state[next(model.parameters())].items()}
    steps = opt.stats["steps"]
    x, y = batch(1, torch.float64)
    with pytest.raises(RuntimeError, match="no gradient reached any parameter.*loss.backward"):
        opt.step(lambda: F.cross_entropy(model(x), y))    # forgot backward()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)                   # weight decay did not move them
    after = opt.base_optimizer.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in state.items()) and opt.stats["steps"] == steps


@pytest.mark.parametrize("name", ["esam", "ausam"])
def test_a_per_sample_closure_without_indices_names_the_contract(name):
    model = make_mlp(dtype=torch.float64)
    x, y = batch(0, torch.float64)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():                                           # forgot the indices parameter
        return F.cross_entropy(model(x), y, reduction="none")
    if name == "esam":
        opt = vx.ESAM(model.parameters(), torch.optim.SGD, **SGD_KW)
        call = lambda: opt.step(closure)                     # noqa: E731
    else:
        opt = vx.AUSAM(model.parameters(), torch.optim.SGD, num_samples=24, **SGD_KW)
        call = lambda: opt.step(closure, torch.arange(24))   # noqa: E731
    with pytest.raises(TypeError, match=r"closure\(indices\).*per selected sample"):
        call()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
