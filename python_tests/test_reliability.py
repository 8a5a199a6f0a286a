"""Reliability: checkpoints taken at awkward moments (vSAM's warm-up, mid-window, mid-reuse)
resumed into fresh models/optimizers, across backends and through bytes; and odd parameter
sets (frozen, intermittently gradient-less, unfrozen later, 0-dim, empty, tied, duplicated,
several groups, groups added later, re-pointed, non-contiguous, channels_last).

Everything runs in float64 where a tolerance is involved; "same backend" checks are bit for bit
(torch.equal). A backend runs on the device it serves (helpers.device_for): the checkpoints move
across backends and devices; the odd parameter sets run on CPU tensors (reference and the
default backend for them)."""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx
from vsam_ext import AESAM, AUSAM, SAM, VSAM, LookSAM
from helpers import TRITON_INTERPRETED, batch, closure_for, device_for, device_of, make_mlp

D = torch.float64
SGD = torch.optim.SGD
N_SAMPLES = 48


# -- helpers --------------------------------------------------------------------------------------
def mlp(h1=16, h2=8, seed=0, bn=True):
    """make_mlp with chosen hidden widths (make_mlp's are 16 and 8)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, h1)] + ([torch.nn.BatchNorm1d(h1)] if bn else [])
    layers += [torch.nn.Tanh(), torch.nn.Linear(h1, h2), torch.nn.Tanh(), torch.nn.Linear(h2, 3)]
    return torch.nn.Sequential(*layers).to(D)


def per_sample_closure(model, step):
    x, y = batch(step, D, device=device_of(model))

    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    return closure


def ids_for(step, n=24):
    per_epoch = N_SAMPLES // n
    perm = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(step // per_epoch))
    return perm.view(per_epoch, n)[step % per_epoch]


# VSAM with a short warm-up and window and strong gains, so that the window statistics move
# the quota within the run: a wrongly restored history would change the decisions.
VSAM_KW = dict(window=8, slices=2, warmup_steps=6, stat_tensors=2, lambdas=(2.0, 2.0))
BUILDERS = {
    "vsam": lambda ps, seed=0, **kw: VSAM(ps, SGD, lr=0.05, momentum=0.9, weight_decay=1e-3, seed=seed,
                                          **VSAM_KW, **kw),
    "sam": lambda ps, seed=0, **kw: SAM(ps, SGD, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "looksam": lambda ps, seed=0, **kw: LookSAM(ps, SGD, k=4, lr=0.05, momentum=0.9, **kw),
    "aesam": lambda ps, seed=0, **kw: AESAM(ps, SGD, total_steps=40, lr=0.05, momentum=0.9, **kw),
    "ausam": lambda ps, seed=0, **kw: AUSAM(ps, torch.optim.AdamW, num_samples=N_SAMPLES, ramp_epochs=3,
                                            lr=3e-3, seed=seed, **kw),
}


def build(name, backend=None, model_seed=0, opt_seed=0):
    model = mlp(seed=model_seed).to(device_for(backend))
    return model, BUILDERS[name](model.parameters(), seed=opt_seed, model=model, backend=backend)


def take_step(name, model, opt, t):
    if name == "ausam":
        return opt.step(per_sample_closure(model, t), ids_for(t))
    return opt.step(closure_for(model, opt, t, D))


def run_steps(name, model, opt, start, steps):
    decisions = []
    for t in range(start, start + steps):
        take_step(name, model, opt, t)
        decisions.append(opt.stats["last_step_sam"])
    return decisions


def save_bytes(model, opt) -> bytes:
    f = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
    return f.getvalue()


def load_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def state_of(model):
    """A copy of the model's state on the CPU (runs on different devices compare there)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_states_close(a, b, tol=1e-9):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


# -- 1. checkpoints ----------------------------------------------------------------------------------
# (name, cut, total): cut = steps taken before the checkpoint.
CUTS = {
    ("vsam", "warmup"): (3, 45),        # inside the 6 warm-up steps (all SAM)
    ("vsam", "mid_window"): (27, 45),   # j = 21: between the boundaries j = 16 and j = 24
    ("vsam", "mid_reuse"): (17, 45),    # three cheap steps after the SAM step 13: psf_age = 3
    ("sam", "mid_run"): (7, 14),
    ("looksam", "mid_reuse"): (7, 14),  # refresh at step 4, cheap steps 5, 6 reuse g_v
    ("aesam", "mid_run"): (9, 20),
    ("ausam", "mid_run"): (5, 10),      # past the first epoch: subsets are drawn
}


def _check_cut(name, moment, opt):
    """The checkpoint is really taken at the moment it names."""
    st = opt.stats
    if name == "vsam":
        c = opt.controller
        if moment == "warmup":
            assert st["in_warmup"] and st["steps"] < VSAM_KW["warmup_steps"]
        elif moment == "mid_window":
            assert not st["in_warmup"] and c.j % c.window not in (0, c.window - 1)
            assert len(c.H) > 0                 # window statistics exist that must survive
        elif moment == "mid_reuse":
            assert st["psf_age"] > 0 and opt.has_psf and not st["last_step_sam"]
    elif name == "looksam":
        assert not st["last_step_sam"] and st["steps"] % opt.k != 0
    elif name == "ausam":
        assert st["epoch"] >= 1 and st["sample_fraction"] < 1.0


@pytest.mark.parametrize("name,moment", list(CUTS))
def test_checkpoint_resumes_bit_identically_in_a_fresh_model_and_optimizer(name, moment):
    cut, total = CUTS[(name, moment)]
    m_ref, o_ref = build(name)
    ref_dec = run_steps(name, m_ref, o_ref, 0, total)
    ref_state = state_of(m_ref)

    m1, o1 = build(name)
    dec = run_steps(name, m1, o1, 0, cut)
    _check_cut(name, moment, o1)
    at_cut = dict(o1.stats)
    data = save_bytes(m1, o1)
    # taking the checkpoint does not disturb the run that took it
    dec1 = dec + run_steps(name, m1, o1, cut, total - cut)
    assert dec1 == ref_dec
    assert_states_equal(state_of(m1), ref_state)

    # a fresh model (other init) and a fresh optimizer (other seed) from the bytes
    m2, o2 = build(name, model_seed=11, opt_seed=5)
    assert not torch.equal(m2[0].weight, m_ref[0].weight)
    ck = load_bytes(data)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    for key in ("steps", "sam_steps", "last_step_sam", "psf_age", "quota", "epoch"):
        assert o2.stats.get(key) == at_cut.get(key), key
    dec2 = dec + run_steps(name, m2, o2, cut, total - cut)
    assert dec2 == ref_dec
    assert_states_equal(state_of(m2), ref_state)
    assert o2.stats["steps"] == o_ref.stats["steps"] and o2.stats["sam_steps"] == o_ref.stats["sam_steps"]
    if name == "vsam" and moment != "warmup":
        assert o2.stats["quota"] != at_cut["quota"]   # a window boundary after the cut read the statistics


def test_vsam_mid_reuse_checkpoint_carries_the_psf_and_its_age():
    model, opt = build("vsam")
    run_steps("vsam", model, opt, 0, 17)
    assert opt.stats["psf_age"] == 3
    ck = load_bytes(save_bytes(model, opt))
    m2, o2 = build("vsam", model_seed=3)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    assert o2.stats["psf_age"] == 3 and o2.has_psf
    for a, b in zip(opt.flat.buffers, o2.flat.buffers):
        assert torch.equal(a.psf, b.psf)
    # the next step is cheap and reuses the PSF with weight 0.7 ** 4 in both
    assert run_steps("vsam", model, opt, 17, 1) == run_steps("vsam", m2, o2, 17, 1) == [False]
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def _cross_backend_pairs():
    """Every other backend to and from the cpu backend (the reference when cpu is not built),
    each on the device it serves: with a GPU the checkpoint also moves between devices."""
    anchor = "cpu" if "cpu" in vx.available_backends() else "reference"
    return [pair for b in vx.available_backends() if b != anchor for pair in ((anchor, b), (b, anchor))]


@pytest.mark.parametrize("src,dst", _cross_backend_pairs())
@pytest.mark.parametrize("name,moment", [("vsam", "mid_window"), ("vsam", "mid_reuse"), ("looksam", "mid_reuse")])
def test_checkpoint_resumes_across_backends(src, dst, name, moment):
    cut, total = CUTS[(name, moment)]
    if TRITON_INTERPRETED and "triton" in (src, dst):   # the interpreter is slow: a shorter run past a boundary
        total = min(total, cut + 8)
    m_ref, o_ref = build(name, backend=src)
    ref_dec = run_steps(name, m_ref, o_ref, 0, total)
    m1, o1 = build(name, backend=src)
    dec = run_steps(name, m1, o1, 0, cut)
    _check_cut(name, moment, o1)
    ck = load_bytes(save_bytes(m1, o1))
    m2, o2 = build(name, backend=dst, model_seed=11, opt_seed=5)
    assert o2.backend == dst and device_of(m2) == device_for(dst) and device_of(m1) == device_for(src)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    dec += run_steps(name, m2, o2, cut, total - cut)
    assert dec == ref_dec
    assert_states_close(state_of(m2), state_of(m_ref), tol=1e-9)


def test_loading_a_checkpoint_of_another_optimizer_class_is_refused():
    model, opt = build("vsam")
    run_steps("vsam", model, opt, 0, 3)
    ck = load_bytes(save_bytes(model, opt))
    for other in ("sam", "looksam", "aesam", "ausam"):
        _, o2 = build(other)
        with pytest.raises(ValueError, match=f"checkpoint is of VSAM, this optimizer is {type(o2).__name__}"):
            o2.load_state_dict(ck["opt"])
    _, sam = build("sam")
    with pytest.raises(ValueError, match="checkpoint is of SAM, this optimizer is VSAM"):
        opt.load_state_dict(sam.state_dict())
    with pytest.raises(ValueError, match="not a vsam_ext optimizer checkpoint"):
        opt.load_state_dict(SGD(mlp().parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("name", ["vsam", "sam"])
def test_loading_a_checkpoint_of_a_model_with_another_width_is_refused(name):
    model, opt = build(name)
    run_steps(name, model, opt, 0, 3)
    ck = load_bytes(save_bytes(model, opt))
    wide = mlp(h1=20)
    o2 = BUILDERS[name](wide.parameters(), model=wide)
    with pytest.raises(ValueError, match="parameter layout .* does not match"):
        o2.load_state_dict(ck["opt"])
    f32 = mlp().float()                             # same shapes, another dtype
    o3 = BUILDERS[name](f32.parameters(), model=f32)
    with pytest.raises(ValueError, match="parameter layout"):
        o3.load_state_dict(ck["opt"])
    # a refused load leaves the optimizer as it was: fresh, and usable
    assert o2.stats["steps"] == 0
    run_steps(name, wide, o2, 0, 2)
    assert o2.stats["steps"] == 2


@pytest.mark.parametrize("name", ["vsam", "sam"])
def test_loading_a_checkpoint_of_a_model_with_other_shapes_but_same_size_is_refused(name):
    model = mlp(bn=False)                          # widths 16, 8: 275 elements in 6 tensors
    opt = BUILDERS[name](model.parameters())
    run_steps(name, model, opt, 0, 3)
    ck = load_bytes(save_bytes(model, opt))
    other = mlp(h1=21, h2=5, bn=False)             # 7*21 + 21*5 + 5 + 5*3 + 3 = 275 too
    assert [p.numel() for p in other.parameters()] != [p.numel() for p in model.parameters()]
    assert sum(p.numel() for p in other.parameters()) == sum(p.numel() for p in model.parameters())
    o2 = BUILDERS[name](other.parameters())
    with pytest.raises(ValueError, match="shape"):
        o2.load_state_dict(ck["opt"])


def test_checkpoint_with_a_different_vsam_window_is_refused():
    model, opt = build("vsam")
    run_steps("vsam", model, opt, 0, 3)
    m2 = mlp()
    o2 = VSAM(m2.parameters(), SGD, lr=0.05, momentum=0.9, weight_decay=1e-3, window=10, slices=2,
              warmup_steps=6, stat_tensors=2)
    with pytest.raises(ValueError, match="window"):
        o2.load_state_dict(opt.state_dict())


# -- 2. odd parameter sets ----------------------------------------------------------------------------
# The reference and the default backend (None: cpu for CPU tensors, the reference when cpu is
# not built); both serve CPU tensors (device_for), where these tests build their models.
BACKENDS = ["reference", None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_are_never_changed_and_the_rest_as_without_them(backend):
    a, b = mlp(bn=False), mlp(bn=False)
    a[0].weight.requires_grad_(False)
    a[2].bias.requires_grad_(False)
    frozen = [a[0].weight.detach().clone(), a[2].bias.detach().clone()]
    opt_a = VSAM(a.parameters(), SGD, lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend, **VSAM_KW)
    # the plain expectation: the same run with the frozen tensors not handed to the optimizer
    b[0].weight.requires_grad_(False)
    b[2].bias.requires_grad_(False)
    trainable = [p for p in b.parameters() if p.requires_grad]
    opt_b = VSAM(trainable, SGD, lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend, **VSAM_KW)
    assert run_steps("vsam", a, opt_a, 0, 30) == run_steps("vsam", b, opt_b, 0, 30)
    assert torch.equal(a[0].weight, frozen[0]) and torch.equal(a[2].bias, frozen[1])
    assert a[0].weight.grad is None and a[0].weight not in opt_a.state
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


class TwoHeads(torch.nn.Module):
    """`aux` is used on even steps only: its gradient is None on odd steps."""

    def __init__(self):
        super().__init__()
        self.body = mlp(bn=False)
        torch.manual_seed(1)
        self.aux = torch.nn.Linear(3, 3).to(D)

    def loss(self, t):
        x, y = batch(t, D)
        out = self.body(x)
        if t % 2 == 0:
            out = self.aux(out)
        return F.cross_entropy(out, y)


@pytest.mark.parametrize("fused_base", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_without_gradient_on_some_steps_is_untouched_on_those_steps(backend, fused_base):
    net, twin = TwoHeads(), TwoHeads()
    opt = VSAM(net.parameters(), SGD, lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend,
               fused_base=fused_base, **VSAM_KW)
    sam0 = SAM(twin.parameters(), SGD, rho=0.0, lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend,
               fused_base=fused_base)
    plain = TwoHeads()
    sgd = SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for t in range(24):
        before = [p.detach().clone() for p in net.aux.parameters()]
        mom = [opt.state[p]["momentum_buffer"].clone() for p in net.aux.parameters()] if t > 0 else None

        def closure(m=net, t=t):
            loss = m.loss(t)
            loss.backward()
            return loss
        opt.step(closure)
        sam0.step(lambda t=t: (lambda l: (l.backward(), l)[1])(twin.loss(t)))
        sgd.zero_grad(set_to_none=True)
        plain.loss(t).backward()
        sgd.step()
        changed = [not torch.equal(p, b) for p, b in zip(net.aux.parameters(), before)]
        if t % 2:            # no gradient: no perturbation, weight decay, momentum or PSF reuse
            assert not any(changed), t
            for p, m in zip(net.aux.parameters(), mom):
                assert torch.equal(opt.state[p]["momentum_buffer"], m)
        else:
            assert all(changed), t
    # SAM with rho = 0 is torch's SGD, which skips gradient-less parameters
    for p, q in zip(twin.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", ["sam", "vsam"])
def test_parameter_unfrozen_after_construction_is_stepped_by_the_base_without_sam(cls):
    """Documented behaviour (FlatParams.check): a parameter frozen when the optimizer was built
    stays outside the flat buffers; once it requires grad again, the optimizer warns once and
    the base optimizer steps it with the gradient of the step's *last* pass (on a SAM step:
    taken at the other parameters' perturbed point; it is not perturbed itself, and no PSF is
    reused for it on cheap steps)."""
    model = mlp(bn=False)
    b = model[0].bias
    b.requires_grad_(False)
    lr = 0.05                          # plain SGD: the expected update is -lr * grad
    if cls == "vsam":
        opt = VSAM(model.parameters(), SGD, lr=lr, backend="reference", **VSAM_KW)
    else:
        opt = SAM(model.parameters(), SGD, lr=lr, backend="reference")
    run_steps("vsam", model, opt, 0, 2)
    assert b.grad is None and all(b is not p for buf in opt.flat.buffers for p in buf.params)
    b.requires_grad_(True)
    kinds = []
    for t in range(2, 14):
        seen = []
        inner = closure_for(model, opt, t, D)

        def closure():
            loss = inner()
            seen.append(b.grad.clone())
            return loss
        old = b.detach().clone()
        if t == 2:
            with pytest.warns(UserWarning, match="frozen when the optimizer was built"):
                opt.step(closure)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")          # warned once only
                opt.step(closure)
        kinds.append(opt.stats["last_step_sam"])
        assert len(seen) == (2 if kinds[-1] else 1)
        torch.testing.assert_close(b.detach(), old - lr * seen[-1], rtol=1e-12, atol=1e-14)
        assert b.grad is not None and b.grad.data_ptr() != opt.flat.buffers[0].grad.data_ptr()
    if cls == "vsam":
        assert True in kinds and False in kinds     # SAM steps and cheap (PSF-reusing) steps


class OddShapes(torch.nn.Module):
    def __init__(self, extras=True):
        super().__init__()
        self.body = mlp(bn=False)
        self.extras = extras
        if extras:
            self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=D))       # 0-dim
            self.empty = torch.nn.Parameter(torch.empty(0, dtype=D))          # numel 0
            self.empty2 = torch.nn.Parameter(torch.empty(0, 3, dtype=D))      # numel 0, 2-d

    def forward(self, x):
        out = self.body(x)
        if self.extras:
            out = out * self.scale + self.empty.sum() + self.empty2.sum(0)
        return out

    def ordered(self):
        """The odd tensors interleaved with the normal ones; the last ones (vSAM's statistics
        range, stat_tensors=2) are the last bias and an empty tensor."""
        b = list(self.body.parameters())
        return [self.empty] + b[:3] + [self.scale] + b[3:] + [self.empty2]


def _odd_closure(model, t):
    x, y = batch(t, D)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _run_odd(model, opt, steps):
    dec = []
    for t in range(steps):
        opt.step(_odd_closure(model, t))
        dec.append(opt.stats["last_step_sam"])
    return dec


@pytest.mark.parametrize("name", ["sam", "vsam", "looksam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_parameters_change_nothing(name, backend):
    """numel-0 parameters (mixed in, and as the last tensors of the statistics range) leave
    every other tensor exactly as in the run without them."""
    with_empty, without = OddShapes(), OddShapes(extras=False)
    with torch.no_grad():
        with_empty.scale.fill_(1.0)
    with_empty.scale.requires_grad_(False)       # only the empty tensors are extra here
    b = list(with_empty.body.parameters())
    # vSAM's statistics use the last 2 *tensors*; an empty one among them would shrink the range
    ps_with = [with_empty.empty] + b[:3] + [with_empty.empty2] + b[3:]
    o1 = BUILDERS[name](ps_with, backend=backend)
    o2 = BUILDERS[name](list(without.body.parameters()), backend=backend)
    assert _run_odd(with_empty, o1, 20) == _run_odd(without, o2, 20)
    for p, q in zip(with_empty.body.parameters(), without.body.parameters()):
        assert torch.equal(p, q)
    assert with_empty.empty.shape == (0,) and with_empty.empty2.shape == (0, 3)
    assert with_empty.empty.grad.shape == (0,) and with_empty.empty2.grad.shape == (0, 3)


@pytest.mark.parametrize("name", ["sam", "vsam"])
def test_zero_dim_and_empty_parameters_mixed_with_normal_ones(name):
    runs = {}
    for backend in BACKENDS:
        model = OddShapes()
        opt = BUILDERS[name](model.ordered(), backend=backend)
        runs[backend] = (_run_odd(model, opt, 20), [p.detach().clone() for p in model.ordered()])
        assert model.scale.dim() == 0 and model.scale.grad.dim() == 0
        assert model.scale.item() != 1.5
        assert model.empty.shape == (0,) and model.empty2.shape == (0, 3)
    (d_ref, p_ref), (d_cpu, p_cpu) = runs["reference"], runs[None]
    assert d_ref == d_cpu
    for a, b in zip(p_ref, p_cpu):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_and_empty_parameters_with_rho_zero_are_plain_sgd(backend):
    a, b = OddShapes(), OddShapes()
    opt = SAM(a.ordered(), SGD, rho=0.0, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    sgd = SGD(b.ordered(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for t in range(10):
        opt.step(_odd_closure(a, t))
        sgd.zero_grad()
        _odd_closure(b, t)()
        sgd.step()
    for p, q in zip(a.ordered(), b.ordered()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _looksam_scalar_kicks(dtype, backend, steps=8):
    """LookSAM (SGD, no momentum) on a weight matrix and a 0-dim scale; on each cheap step,
    the term LookSAM added to the scale's gradient, in units of |g|."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 3, dtype=dtype))
    s = torch.nn.Parameter(torch.tensor(1.5, dtype=dtype))
    lr = 0.1
    opt = LookSAM([w, s], SGD, k=4, alpha=0.7, lr=lr, backend=backend)
    kicks = []
    for t in range(steps):
        x, y = batch(t, dtype)
        seen = []

        def closure():
            loss = F.cross_entropy((x @ w) * s, y)
            loss.backward()
            seen.append(s.grad.item())
            return loss
        old = s.item()
        opt.step(closure)
        if not opt.stats["last_step_sam"]:
            kicks.append(((old - s.item()) / lr - seen[-1]) / abs(seen[-1]))
    assert len(kicks) == 6
    return kicks


@pytest.mark.parametrize("dtype", [
    torch.float32,
    torch.float64,
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_looksam_adds_nothing_to_a_zero_dim_parameter_on_cheap_steps(backend, dtype):
    """A 1-element tensor's gradient is parallel to its SAM gradient, so its g_v (the part of
    g_s orthogonal to g, ALGORITHMS.md) is 0 and a cheap step is the base step with g alone.
    (Also why the backends agree on such a tensor only to ~1e-9 in float64: the kick's size
    depends on how an eps-sized residue rounds.)"""
    for kick in _looksam_scalar_kicks(dtype, backend):
        assert abs(kick) < 1e-3


class Tied(torch.nn.Module):
    """Tied input embedding and output projection (one Parameter used twice)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(10, 6).to(D)
        self.mid = torch.nn.Linear(6, 6).to(D)
        self.out = torch.nn.Linear(6, 10, bias=False).to(D)
        self.out.weight = self.emb.weight

    def loss(self, t):
        g = torch.Generator().manual_seed(500 + t)
        tok = torch.randint(0, 10, (16,), generator=g)
        tgt = torch.randint(0, 10, (16,), generator=g)
        return F.cross_entropy(self.out(torch.tanh(self.mid(self.emb(tok)))), tgt)


def _manual_sam_step(params_groups, loss_fn, momenta):
    """One SAM step by hand: g at w; e = rho_group g / (||g|| + 1e-12) with the norm over every
    tensor; g_s at w + e; w back; SGD (lr, momentum, weight_decay of each group) with g_s.

    The norm is taken as the package takes it (ALGORITHMS.md, "Precision of the scalars"): each
    group's (= flat buffer's) sum of squares, their sum, the sqrt and the scale
    rho / (norm + eps) in the maths dtype, fp64 for these fp64 parameters. (With an fp32 norm,
    as before fp64 scalars, the weights differ by ~1e-9.)"""
    params = [p for g in params_groups for p in g["params"]]
    for p in params:
        p.grad = None
    loss_fn().backward()
    g = [p.grad.clone() for p in params]
    sums, i = [], 0
    for grp in params_groups:
        flat = torch.cat([x.reshape(-1) for x in g[i:i + len(grp["params"])]])
        sums.append((flat * flat).sum())
        i += len(grp["params"])
    norm = torch.stack(sums).sum().sqrt()
    assert norm.dtype == D
    saved = [p.detach().clone() for p in params]
    i = 0
    with torch.no_grad():
        for grp in params_groups:
            scale = grp["rho"] / (norm + 1e-12)
            for p in grp["params"]:
                p.add_(g[i] * scale)
                i += 1
    for p in params:
        p.grad = None
    loss_fn().backward()
    i = 0
    with torch.no_grad():
        for grp in params_groups:
            for p in grp["params"]:
                gs = p.grad + grp.get("weight_decay", 0.0) * saved[i]
                mu = grp.get("momentum", 0.0)
                if mu:
                    buf = momenta.get(p)
                    buf = gs.clone() if buf is None else buf.mul_(mu).add_(gs)
                    momenta[p] = buf
                    gs = buf
                p.copy_(saved[i] - grp["lr"] * gs)
                i += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_parameters_are_one_tensor_stepped_once(backend):
    model, manual = Tied(), Tied()
    assert len(list(model.parameters())) == 3            # emb/out weight counted once
    opt = SAM(model.parameters(), SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    assert sum(len(b.params) for b in opt.flat.buffers) == 3
    groups = [{"params": list(manual.parameters()), "rho": 0.05, "lr": 0.1, "momentum": 0.9}]
    momenta = {}
    for t in range(8):
        opt.step(lambda t=t: (lambda l: (l.backward(), l)[1])(model.loss(t)))
        _manual_sam_step(groups, lambda t=t: manual.loss(t), momenta)
    assert model.out.weight is model.emb.weight
    assert model.emb.weight.grad.data_ptr() == opt.flat.buffers[0].grad.data_ptr()
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_tied_parameters_under_vsam_agree_across_backends():
    runs = []
    for backend in BACKENDS:
        model = Tied()
        opt = VSAM(model.parameters(), SGD, lr=0.1, momentum=0.9, backend=backend, **VSAM_KW)
        dec = []
        for t in range(30):
            opt.step(lambda t=t: (lambda l: (l.backward(), l)[1])(model.loss(t)))
            dec.append(opt.stats["last_step_sam"])
        assert model.out.weight is model.emb.weight
        runs.append((dec, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and False in runs[0][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _dup_run(dup, fused_base, backend, steps=6):
    """SAM(rho=0) on `w` (listed twice if dup) and a bias; on odd steps the bias gets no
    gradient, so the step goes through base.step() rather than the fused step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, dtype=D))
    bias = torch.nn.Parameter(torch.zeros(1, dtype=D))
    params = [w, w, bias] if dup else [w, bias]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch warns about the duplicate itself
        opt = SAM(params, SGD, rho=0.0, lr=0.1, momentum=0.9, fused_base=fused_base, backend=backend)
    for t in range(steps):
        def closure(t=t):
            loss = ((w - 1.0) ** 2).sum() + (bias.sum() ** 2 if t % 2 == 0 else 0.0)
            loss.backward()
            return loss
        opt.step(closure)
    return w.detach().clone(), opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_tensor_twice_in_the_params_list_is_packed_once(backend):
    _, opt = _dup_run(True, True, backend, steps=0)
    assert len(opt.flat.managed) == 2
    assert sum(len(b.params) for b in opt.flat.buffers) == 2


@pytest.mark.parametrize("fused_base", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_tensor_twice_in_the_params_list_is_not_double_stepped(backend, fused_base):
    once, _ = _dup_run(False, fused_base, backend)
    twice, _ = _dup_run(True, fused_base, backend)
    torch.testing.assert_close(twice, once, rtol=1e-12, atol=1e-12)


def test_the_same_tensor_twice_is_single_stepped_on_the_fused_path():
    """Where the fused step runs (every parameter has a gradient), the duplicate is stepped once."""
    torch.manual_seed(0)
    outs = []
    for params_of in (lambda w: [w], lambda w: [w, w]):
        w = torch.nn.Parameter(torch.ones(3, dtype=D))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = SAM(params_of(w), SGD, rho=0.0, lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.step(lambda: (lambda l: (l.backward(), l)[1])((w ** 2).sum()))
        outs.append(w.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def _groups(model, rhos=(0.02, 0.2, 0.0)):
    return [{"params": list(model[0].parameters()), "lr": 0.2, "weight_decay": 1e-2, "rho": rhos[0]},
            {"params": list(model[2].parameters()), "lr": 0.05, "rho": rhos[1]},
            {"params": list(model[4].parameters()), "lr": 0.1, "weight_decay": 5e-2, "rho": rhos[2]}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_with_their_own_lr_weight_decay_and_rho_match_a_manual_sam(backend):
    model, manual = mlp(bn=False), mlp(bn=False)
    opt = SAM(_groups(model), SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    assert [g["rho"] for g in opt.param_groups] == [0.02, 0.2, 0.0]
    groups = [dict(g, momentum=0.9) for g in _groups(manual)]
    momenta = {}
    for t in range(8):
        opt.step(closure_for(model, opt, t, D))
        x, y = batch(t, D)
        _manual_sam_step(groups, lambda: F.cross_entropy(manual(x), y), momenta)
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    # and the rho really mattered: one global rho gives other weights
    other = mlp(bn=False)
    o2 = SAM(_groups(other, (0.05, 0.05, 0.05)), SGD, lr=0.1, momentum=0.9, backend=backend)
    for t in range(8):
        o2.step(closure_for(other, o2, t, D))
    assert not torch.allclose(other[2].weight, model[2].weight, rtol=0, atol=1e-9)


def test_vsam_param_groups_agree_across_backends():
    runs = []
    for backend in BACKENDS:
        model = mlp(bn=False)
        opt = VSAM(_groups(model), SGD, lr=0.1, momentum=0.9, backend=backend, **VSAM_KW)
        runs.append((run_steps("vsam", model, opt, 0, 30), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_after_some_steps_matches_a_manual_sam(backend):
    model, manual = mlp(bn=False), mlp(bn=False)
    torch.manual_seed(4)
    head = torch.nn.Linear(3, 3).to(D)
    head_m = torch.nn.Linear(3, 3).to(D)
    head_m.load_state_dict(head.state_dict())
    opt = SAM(model.parameters(), SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    groups = [{"params": list(manual.parameters()), "rho": 0.05, "lr": 0.1, "momentum": 0.9}]
    momenta = {}
    for t in range(12):
        if t == 5:
            opt.add_param_group({"params": head.parameters(), "lr": 0.02, "rho": 0.3, "weight_decay": 1e-2})
            groups.append({"params": list(head_m.parameters()), "lr": 0.02, "rho": 0.3,
                           "weight_decay": 1e-2, "momentum": 0.9})
        x, y = batch(t, D)

        def fwd(m, h):
            out = m(x) if t < 5 else h(m(x))
            return F.cross_entropy(out, y)

        def closure():
            loss = fwd(model, head)
            loss.backward()
            return loss
        opt.step(closure)
        _manual_sam_step(groups, lambda: fwd(manual, head_m), momenta)
    assert opt.param_groups[1]["rho"] == 0.3 and len(opt.flat.buffers) == 2
    for p, q in zip(list(model.parameters()) + list(head.parameters()),
                    list(manual.parameters()) + list(head_m.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _vsam_with_late_group(backend, steps, start=0, ck=None):
    """VSAM on the MLP; a head (its own lr and rho) is added as a param group at step 9."""
    model = mlp(bn=False)
    torch.manual_seed(4)
    head = torch.nn.Linear(3, 3).to(D)
    opt = VSAM(model.parameters(), SGD, lr=0.1, momentum=0.9, backend=backend, **VSAM_KW)
    if start > 9:
        opt.add_param_group({"params": head.parameters(), "lr": 0.02, "rho": 0.3})
    if ck is not None:
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
    dec = []
    for t in range(start, start + steps):
        if t == 9:
            opt.add_param_group({"params": head.parameters(), "lr": 0.02, "rho": 0.3})
        x, y = batch(t, D)

        def closure():
            loss = F.cross_entropy(model(x) if t < 9 else head(model(x)), y)
            loss.backward()
            return loss
        opt.step(closure)
        dec.append(opt.stats["last_step_sam"])
    return dec, model, head, opt


def test_vsam_add_param_group_after_some_steps_agrees_across_backends_and_checkpoints():
    d_ref, m_ref, h_ref, _ = _vsam_with_late_group("reference", 30)
    d_cpu, m_cpu, h_cpu, _ = _vsam_with_late_group(None, 30)
    assert d_ref == d_cpu and False in d_cpu
    for a, b in zip(list(m_ref.parameters()) + list(h_ref.parameters()),
                    list(m_cpu.parameters()) + list(h_cpu.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a checkpoint taken after the group was added resumes bit for bit in a rebuilt optimizer
    d1, m1, h1, o1 = _vsam_with_late_group(None, 14)
    f = io.BytesIO()
    torch.save({"model": m1.state_dict(), "head": h1.state_dict(), "opt": o1.state_dict()}, f)
    ck = load_bytes(f.getvalue())
    d2, m2, h2, _ = _vsam_with_late_group(None, 16, start=14, ck=ck)
    assert d1 + d2 == d_cpu
    for a, b in zip(list(m2.parameters()) + list(h2.parameters()),
                    list(m_cpu.parameters()) + list(h_cpu.parameters())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recast", ["to_float64", "double", "half", "channels_last"])
def test_parameters_re_pointed_after_construction_raise_a_clear_error(recast):
    if recast == "channels_last":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
        x = torch.randn(4, 2, 4, 4)
    else:
        model = make_mlp()               # float32
        x = batch(0)[0]
    opt = SAM(model.parameters(), SGD, lr=0.1)
    {"to_float64": lambda: model.to(torch.float64), "double": model.double, "half": model.half,
     "channels_last": lambda: model.to(memory_format=torch.channels_last)}[recast]()
    if recast in ("to_float64", "double"):
        x = x.double()
    elif recast == "half":
        x = x.half()

    def closure():
        loss = model(x).float().square().mean()
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match=r"no longer lives in the optimizer's flat buffer .*model\.to\(\)"):
        opt.step(closure)


def test_a_no_op_cast_after_construction_keeps_working():
    model = mlp(bn=False)
    opt = SAM(model.parameters(), SGD, lr=0.1)
    model.to(torch.float64)              # already float64: the parameters stay where they are
    model.to("cpu")
    run_steps("sam", model, opt, 0, 2)


@pytest.mark.parametrize("name", ["sam", "vsam", "looksam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_parameter_gives_the_results_of_a_contiguous_copy(name, backend):
    """A Parameter made from a transposed tensor: the optimizer moves it into its flat buffer
    with the same strides; values, shape and results are those of a contiguous copy."""
    def model_with(weight):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = mlp(bn=False)
                self.w = torch.nn.Parameter(weight)

            def forward(self, x):
                return self.body(x) @ self.w          # [B, 3] @ [3, 3]
        return M()
    torch.manual_seed(2)
    base = torch.randn(3, 3, dtype=D)
    nc, c = model_with(base.t()), model_with(base.t().contiguous())
    assert not nc.w.is_contiguous() and torch.equal(nc.w, c.w)
    values = nc.w.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o_nc = BUILDERS[name](list(nc.parameters()), backend=backend)
    assert caught == []
    o_c = BUILDERS[name](list(c.parameters()), backend=backend)
    # the layout is kept: a transposed view of the flat buffer
    assert not nc.w.is_contiguous() and nc.w.stride() == (1, 3)
    assert torch.equal(nc.w, values) and nc.w.shape == (3, 3)
    assert _run_odd(nc, o_nc, 16) == _run_odd(c, o_c, 16)
    for p, q in zip(nc.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


model_optimizers = {}


def _conv_run(name, channels_last, backend, steps=10):
    model = ConvNet().to(D)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)        # before building the optimizer
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not model.conv.weight.is_contiguous()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = BUILDERS[name](model.parameters(), backend=backend, model=model)
    assert caught == []
    model_optimizers[id(model)] = opt
    model_optimizers[id(model)] = opt
    fmt = (model.conv.weight.is_contiguous(), model.conv.weight.is_contiguous(memory_format=torch.channels_last))
    dec = []
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 3, 6, 6, generator=g, dtype=D)
        y = torch.randint(0, 3, (8,), generator=g)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        dec.append(opt.stats["last_step_sam"])
    return dec, state_of(model), fmt, model


@pytest.mark.parametrize("name", ["sam", "vsam", "looksam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_conv_weights_keep_their_format(name, backend):
    """A channels_last model keeps channels_last weights (and gradients, and momentum buffers)
    inside the flat buffers, and trains exactly like the same run with a contiguous model and
    contiguous inputs (1e-12 in float64)."""
    d_cl, s_cl, fmt_cl, model = _conv_run(name, True, backend)
    d_c, s_c, fmt_c, _ = _conv_run(name, False, backend)
    assert fmt_c == (True, False)
    assert fmt_cl == (False, True)
    w = model.conv.weight
    assert w.grad.is_contiguous(memory_format=torch.channels_last)
    flat = next(b for b in model_optimizers[id(model)].flat.buffers if any(p is w for p in b.params))
    assert w.untyped_storage().data_ptr() == flat.param.untyped_storage().data_ptr()
    assert d_cl == d_c
    assert_states_close(s_cl, s_c, tol=1e-12)
