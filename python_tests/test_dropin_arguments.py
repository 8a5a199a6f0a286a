"""Drop-in without surprises, items 6 and 7: vSAM's warm-up sized to the run and made visible;
every option of ours in the signatures and docstrings, typos named against our class, the
window/slices conflict explained, ``zero_grad(set_to_none=True)`` as documented."""
import inspect
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx
from vsam_ext.controller import VSAMController

HERE = os.path.abspath(__file__)
CLASSES = {"SAM": vx.SAM, "PeriodicSAM": vx.PeriodicSAM, "VSAM": vx.VSAM, "LookSAM": vx.LookSAM,
           "AESAM": vx.AESAM, "ESAM": vx.ESAM, "AUSAM": vx.AUSAM}
REQUIRED = {"AESAM": {"total_steps": 10}, "AUSAM": {"num_samples": 10}}
SHARED = ("rho", "adaptive", "eta", "adaptive_params", "model", "backend", "fused_base", "perturbation")


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def closure_for(model, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def build(owner, model=None, **kw):
    model = model or mlp()
    return CLASSES[owner](model.parameters(), torch.optim.SGD, **dict(dict(lr=0.1, **REQUIRED.get(owner, {})), **kw))


# -- item 6: vSAM's warm-up --------------------------------------------------------------------

def test_total_steps_sizes_warmup_and_window_with_the_training_tools_rule():
    from vsam_ext.controller import vsam_schedule
    from vsam_ext.train.loop import vsam_schedule as tool_schedule
    assert tool_schedule is vsam_schedule                       # one rule, one place
    for total in (40, 200, 600, 7800):
        warmup, window, _ = vsam_schedule(total)
        c = build("VSAM", total_steps=total).controller
        assert (c.warmup_steps, c.window, c.total_steps) == (warmup, window, total)
    c = build("VSAM", total_steps=600).controller
    assert (c.warmup_steps, c.window) == (60, 50)
    c = build("VSAM", total_steps=200).controller
    assert (c.warmup_steps, c.window) == (20, 18)


def test_explicit_warmup_and_window_win_over_total_steps():
    c = build("VSAM", total_steps=600, warmup_steps=30).controller
    assert c.warmup_steps == 30 and c.window == 50
    c = build("VSAM", total_steps=600, window=20, slices=2).controller
    assert c.warmup_steps == 60 and c.window == 20
    # without total_steps the authors' CIFAR values stay the defaults
    c = build("VSAM").controller
    assert (c.warmup_steps, c.window, c.slices, c.total_steps) == (1173, 50, 5, None)
    c = VSAMController(total_steps=200)
    assert (c.warmup_steps, c.window) == (20, 18)


def test_a_short_run_sized_with_total_steps_samples_after_its_warmup():
    model = mlp()
    opt = build("VSAM", model, total_steps=60)          # warm-up 6, window 10
    seen = []
    for t in range(60):
        opt.step(closure_for(model, t))
        seen.append(opt.stats["last_step_sam"])
    assert all(seen[:6]) and not all(seen[6:])
    assert opt.stats["sam_steps"] < 60


def test_stats_show_the_warmup():
    model = mlp()
    opt = build("VSAM", model, total_steps=100)          # warm-up 10
    st = opt.stats
    assert (st["warmup_steps"], st["warmup_steps_left"], st["in_warmup"], st["total_steps"]) == (10, 10, True, 100)
    for t in range(4):
        opt.step(closure_for(model, t))
    assert opt.stats["warmup_steps_left"] == 6 and opt.stats["in_warmup"]
    for t in range(4, 12):
        opt.step(closure_for(model, t))
    assert opt.stats["warmup_steps_left"] == 0 and not opt.stats["in_warmup"]


def test_default_warmup_warns_once_at_the_first_step_pointing_at_the_caller():
    model = mlp()
    opt = build("VSAM", model)
    with pytest.warns(UserWarning, match=r"1173.*total_steps=") as caught:
        opt.step(closure_for(model, 0))
    assert [w.filename for w in caught if "1173" in str(w.message)] == [HERE]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(model, 1))                   # once only
    # the two-call form points at the caller too
    model = mlp()
    opt = build("VSAM", model)
    closure_for(model, 0)()
    with pytest.warns(UserWarning, match="1173") as caught:
        if opt.first_step():
            closure_for(model, 0)()
    opt.second_step()
    assert [w.filename for w in caught if "1173" in str(w.message)] == [HERE]


@pytest.mark.parametrize("kw", [dict(total_steps=600), dict(warmup_steps=1173), dict(warmup_steps=10)])
def test_a_sized_warmup_does_not_warn(kw):
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = build("VSAM", model, **kw)
        for t in range(3):
            opt.step(closure_for(model, t))


def test_a_run_that_is_all_warmup_by_its_own_numbers_warns_at_construction():
    with pytest.warns(UserWarning, match=r"warmup_steps=100.*total_steps=80") as caught:
        build("VSAM", total_steps=80, warmup_steps=100)
    assert [w.filename for w in caught] == [HERE]


def test_checkpoints_keep_the_sized_warmup_and_old_ones_load():
    model = mlp()
    opt = build("VSAM", model, total_steps=100)
    for t in range(3):
        opt.step(closure_for(model, t))
    sd = opt.state_dict()
    ctrl = sd["vsam_ext"]["controller"]
    assert (ctrl["warmup_steps"], ctrl["total_steps"]) == (10, 100)
    other = build("VSAM", mlp(), total_steps=100)
    other.load_state_dict(sd)
    assert (other.controller.warmup_steps, other.controller.total_steps) == (10, 100)
    assert other.stats["warmup_steps_left"] == 7
    # a checkpoint written before these fields existed keeps the constructor's values
    old = dict(sd, vsam_ext=dict(sd["vsam_ext"], controller={k: v for k, v in ctrl.items()
                                                             if k not in ("warmup_steps", "total_steps",
                                                                          "warmup_is_default")}))
    again = build("VSAM", mlp(), total_steps=100, warmup_steps=8)
    again.load_state_dict(old)
    assert again.controller.warmup_steps == 8 and again.controller.t == 3


# -- item 7: arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("owner", list(CLASSES))
def test_every_option_is_in_the_signature_and_the_docstring(owner):
    cls = CLASSES[owner]
    sig = inspect.signature(cls.__init__).parameters
    ours = [n for n, p in sig.items() if n not in ("self", "params", "base_optimizer")
            and p.kind is not p.VAR_KEYWORD]
    for name in SHARED + (("stat_tensors", "total_steps") if owner == "VSAM" else ()):
        assert name in sig, (owner, name)
    for name in ours:
        assert f"``{name}``" in cls.__doc__, (owner, name)     # documented, by name
    for name in ("eta", "adaptive_params", "fused_base", "perturbation", "param_storage", "total_steps"):  # keyword-only
        if name in sig and not (owner == "AESAM" and name == "total_steps"):
            assert sig[name].kind is inspect.Parameter.KEYWORD_ONLY, (owner, name)


@pytest.mark.parametrize("owner,typo,meant", [("VSAM", "warmup_step", "warmup_steps"),
                                               ("SAM", "adaptve", "adaptive"),
                                               ("LookSAM", "fused", None),     # SGD's own: accepted
                                               ("PeriodicSAM", "momentun", "momentum"),
                                               ("AESAM", "total_step", "total_steps"),
                                               ("ESAM", "betta", "beta"),
                                               ("AUSAM", "perturbaton", "perturbation")])
def test_a_typo_names_our_class_and_the_close_match(owner, typo, meant):
    if meant is None:
        build(owner, **{typo: False})
        return
    with pytest.raises(TypeError) as info:
        build(owner, **{typo: 1})
    msg = str(info.value)
    assert owner in msg and repr(typo) in msg and repr(meant) in msg, msg
    assert "torch.optim.SGD" in msg and "SGD.__init__" not in msg, msg


def test_a_typo_with_a_base_instance_or_a_permissive_base():
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"VSAM.*'warmup_step'.*'warmup_steps'"):
        vx.VSAM(model.parameters(), base, warmup_step=5)

    class Permissive(torch.optim.SGD):
        def __init__(self, params, lr=0.1, **extra):
            self.extra = extra
            super().__init__(params, lr=lr)
    opt = vx.SAM(mlp().parameters(), Permissive, lr=0.1, anything=3)     # the base may take anything
    assert opt.base_optimizer.extra == {"anything": 3}


def test_window_below_the_default_slices_says_which_default_and_the_fix():
    with pytest.raises(ValueError) as info:
        build("VSAM", window=4)
    msg = str(info.value)
    assert "slices=5" in msg and "default" in msg and "window=4" in msg and "slices=2" in msg, msg
    build("VSAM", window=4, slices=2)
    with pytest.raises(ValueError) as info:          # given, not defaulted: no "default" blamed
        build("VSAM", window=4, slices=7)
    assert "slices" in str(info.value) and "7" in str(info.value) and "default" not in str(info.value)


@pytest.mark.parametrize("owner", list(CLASSES))
def test_zero_grad_set_to_none_is_documented_and_warns_once(owner):
    model = mlp()
    opt = build(owner, model)
    assert inspect.signature(opt.zero_grad).parameters["set_to_none"].default is False
    assert "set_to_none" in type(opt).zero_grad.__doc__
    for p in model.parameters():
        p.grad.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()                                   # the documented default: in place, silent
    with pytest.warns(UserWarning, match="set_to_none") as caught:
        opt.zero_grad(set_to_none=True)
    assert [w.filename for w in caught] == [HERE]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad(set_to_none=True)                   # once per optimizer
    buf = opt.flat.buffers[0].grad
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()
        assert buf.data_ptr() <= p.grad.data_ptr() < buf.data_ptr() + buf.numel() * buf.element_size()

