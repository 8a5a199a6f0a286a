"""The ``scalars`` device tensor of ``reuse``, ``sgd_step`` and ``adamw_step`` (flat and list
forms) in the Triton kernels (under the interpreter on CPU tensors when there is no GPU) and, with
a GPU, the CUDA kernels (vsam_ext/ops/scalars.py: what a captured CUDA-graph step reads).

* A call with ``scalars`` holding the host doubles (``reuse_scalars``, ``sgd_scalars``,
  ``adamw_scalars``) writes the same bits, statistics included, as the call with the floats: the
  kernels round each double to the maths dtype once, as they round the host values.
* With the same ``scalars`` and other float arguments (coeff, lr, weight decay, step) the result
  is still the tensor's: the values come from device memory, not from the arguments. (The float
  ``coeff`` still picks the mode, so it stays non-zero where the reuse mode is meant.)
* A bad ``scalars`` (float32, wrong length, 2-D, not contiguous, another device) raises an error
  naming ``scalars`` before anything is written.

Four dtypes, every mode (plain, reuse, restore, restore + PSF) and SGD/AdamW configurations
spread over the dtypes and forms (each mode sees every configuration), sizes 1, 7 and 1003
(two programs under the interpreter, whose block is patched to 512 elements; a fast and a masked
one). Kept small: the interpreter costs ~30-90 ms a call.
"""
import pytest
import torch

from vsam_ext.ops import available_backends, backend_module
from vsam_ext.ops.scalars import adamw_scalars, reuse_scalars, sgd_scalars
from helpers import TRITON_INTERPRETED, device_for

BACKENDS = [b for b in ("triton", "cuda") if b in available_backends() and (b != "cuda" or torch.cuda.is_available())]
BACKEND_PARAMS = [pytest.param(b, id=b) for b in BACKENDS] or [
    pytest.param("none", marks=pytest.mark.skip(reason="no triton or cuda backend"))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]
FORMS = ["flat", "list"]
MODES = ["plain", "reuse", "restore", "restore_psf"]
SIZES = [1, 7, 1003]
LIST_SHAPES = [(7,), (0,), (1003,), (2, 3)]
INTERPRETER_BLOCK = 512

SGD_CONFIGS = [
    dict(weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False, first=False),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False, first=False),
    dict(weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=True, maximize=False, first=False),
    dict(weight_decay=1e-2, momentum=0.8, dampening=0.1, nesterov=False, maximize=True, first=False),
    dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=True, maximize=False, first=True),
    dict(weight_decay=3e-2, momentum=0.0, dampening=0.0, nesterov=False, maximize=True, first=False),
]
ADAMW_CONFIGS = [
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=1, maximize=False),
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=7, maximize=True),
    dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, step=1000, maximize=False),
    dict(beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=1e-2, step=3, maximize=False),
]
# the values of the tensor (not exact in fp32), and other float arguments for the same tensor
COEFF, LR = 0.37, 0.051
OTHER_COEFF, OTHER_LR = 1.9, 0.35


@pytest.fixture(autouse=True)
def small_block():
    """Under the interpreter: 512-element blocks, so that 1003 elements take two programs."""
    if not TRITON_INTERPRETED:
        yield
        return
    T = backend_module("triton")
    old = T.BLOCK
    T.BLOCK = INTERPRETER_BLOCK
    try:
        yield
    finally:
        T.BLOCK = old


def _rand(shape, dtype, device, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return (x.abs() + 0.1 if positive else x).to(dtype).to(device)


def _state(names, form, dtype, device, size, seed, positive=()):
    """name -> a tensor of ``size`` elements (flat) or a list of LIST_SHAPES tensors."""
    shapes = [(size,)] if form == "flat" else LIST_SHAPES
    out = {}
    for k, name in enumerate(names):
        ts = [_rand(sh, dtype, device, seed + 31 * k + 7 * i, name in positive) for i, sh in enumerate(shapes)]
        out[name] = ts[0] if form == "flat" else ts
    return out


def _clone(state):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v]) for k, v in state.items()}


def _bits(t):
    """The bit pattern (NaN-aware, -0 != +0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_bits(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_bits(x, y, f"{what}[{i}]")
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), f"{what}: not bit-identical"


def _assert_same_state(sa, sb, what):
    for k in sa:
        _assert_same_bits(sa[k], sb[k], f"{what}: {k}")


def _dev(backend):
    return device_for(backend)


def _f64(values, device):
    return torch.tensor(values, dtype=torch.float64, device=device)


def _stat(form, size):
    return size // 3 if form == "flat" else 1


# --- the calls ---------------------------------------------------------------------------------

def _reuse(mod, form, s, coeff, scalars=None):
    fn = mod.reuse if form == "flat" else mod.reuse_list
    args = (s["grad"], s["psf"], coeff)
    return fn(*args) if scalars is None else fn(*args, scalars=scalars)


def _sgd(mod, form, s, mode, cfg, stat, coeff, lr, scalars=None):
    psf = s["psf"] if mode in ("reuse", "restore_psf") else None
    backup = s["backup"] if mode in ("restore", "restore_psf") else None
    buf = s["buf"] if cfg["momentum"] != 0.0 else None
    fn = mod.sgd_step if form == "flat" else mod.sgd_step_list
    args = (s["param"], s["grad"], buf, psf, backup, coeff, stat, lr, cfg["weight_decay"], cfg["momentum"],
            cfg["dampening"], cfg["nesterov"], cfg["maximize"], cfg["first"])
    return fn(*args) if scalars is None else fn(*args, scalars=scalars)


def _adamw(mod, form, s, mode, cfg, stat, coeff, lr, weight_decay, step, scalars=None):
    psf = s["psf"] if mode in ("reuse", "restore_psf") else None
    backup = s["backup"] if mode in ("restore", "restore_psf") else None
    fn = mod.adamw_step if form == "flat" else mod.adamw_step_list
    args = (s["param"], s["grad"], s["m"], s["v"], psf, backup, coeff, stat, lr, cfg["beta1"], cfg["beta2"],
            cfg["eps"], weight_decay, step, cfg["maximize"])
    return fn(*args) if scalars is None else fn(*args, scalars=scalars)


# --- same bits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_reuse_scalars_same_bits(backend, dtype, form):
    mod, dev = backend_module(backend), _dev(backend)
    for size in (SIZES if form == "flat" else SIZES[:1]):
        state = _state(("grad", "psf"), form, dtype, dev, size, seed=size)
        want = _clone(state)
        _reuse(mod, form, want, COEFF)
        sc = _f64(reuse_scalars(COEFF), dev)
        for coeff in (COEFF, OTHER_COEFF):
            got = _clone(state)
            _reuse(mod, form, got, coeff, sc)
            _assert_same_state(want, got, f"reuse {form} n={size} coeff={coeff}")
            assert torch.equal(sc, _f64(reuse_scalars(COEFF), dev))          # read, never written


def _sgd_case(dtype_i, form_i):
    """The configuration and size of a test: over the 8 (dtype, form) of a mode, every SGD
    configuration, every size."""
    k = 2 * dtype_i + form_i
    return SGD_CONFIGS[k % len(SGD_CONFIGS)], SIZES[k % len(SIZES)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form_i", range(len(FORMS)), ids=FORMS)
@pytest.mark.parametrize("dtype_i", range(len(DTYPES)), ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_sgd_step_scalars_same_bits(backend, dtype_i, form_i, mode):
    mod, dev, dtype, form = backend_module(backend), _dev(backend), DTYPES[dtype_i], FORMS[form_i]
    cfg, size = _sgd_case(dtype_i, form_i)
    stat = _stat(form, size)
    state = _state(("param", "grad", "buf", "psf", "backup"), form, dtype, dev, size, seed=100 * dtype_i + size)
    want = _clone(state)
    want_stats = _sgd(mod, form, want, mode, cfg, stat, COEFF, LR)
    sc = _f64(sgd_scalars(COEFF, LR), dev)
    for coeff, lr in ((COEFF, LR), (OTHER_COEFF, OTHER_LR)):
        got = _clone(state)
        got_stats = _sgd(mod, form, got, mode, cfg, stat, coeff, lr, sc)
        what = f"sgd_step {form} {mode} n={size} {cfg} floats coeff={coeff} lr={lr}"
        _assert_same_state(want, got, what)
        _assert_same_bits(want_stats, got_stats, what + ": statistics")
    assert (want_stats is not None) == (mode == "restore_psf")


def _adamw_case(dtype_i, form_i):
    k = 2 * dtype_i + form_i
    return ADAMW_CONFIGS[k % len(ADAMW_CONFIGS)], SIZES[(k + 1) % len(SIZES)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form_i", range(len(FORMS)), ids=FORMS)
@pytest.mark.parametrize("dtype_i", range(len(DTYPES)), ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_adamw_step_scalars_same_bits(backend, dtype_i, form_i, mode):
    mod, dev, dtype, form = backend_module(backend), _dev(backend), DTYPES[dtype_i], FORMS[form_i]
    cfg, size = _adamw_case(dtype_i, form_i)
    stat = _stat(form, size)
    state = _state(("param", "grad", "m", "v", "psf", "backup"), form, dtype, dev, size, seed=200 * dtype_i + size,
                   positive=("v",))
    wd, step = cfg["weight_decay"], cfg["step"]
    want = _clone(state)
    want_stats = _adamw(mod, form, want, mode, cfg, stat, COEFF, LR, wd, step)
    sc = _f64(adamw_scalars(COEFF, LR, cfg["beta1"], cfg["beta2"], wd, step), dev)
    for coeff, lr, wd_arg, step_arg in ((COEFF, LR, wd, step), (OTHER_COEFF, OTHER_LR, wd + 0.25, step + 5)):
        got = _clone(state)
        got_stats = _adamw(mod, form, got, mode, cfg, stat, coeff, lr, wd_arg, step_arg, sc)
        what = f"adamw_step {form} {mode} n={size} {cfg} floats coeff={coeff} lr={lr} wd={wd_arg} step={step_arg}"
        _assert_same_state(want, got, what)
        _assert_same_bits(want_stats, got_stats, what + ": statistics")


# --- bad scalars ---------------------------------------------------------------------------------

def _bad_scalars(values, device):
    """(name, tensor) of scalars that must be refused, for the good ``values``."""
    n = len(values)
    bad = [("float32", torch.tensor(values, dtype=torch.float32, device=device)),
           ("too many", _f64(values + [0.5], device)),
           ("2-D", _f64(values, device).view(1, n)),
           ("0-d" if n == 1 else "too few", _f64(values[0], device) if n == 1 else _f64(values[:-1], device))]
    if n > 1:
        bad.append(("not contiguous", _f64([v for v in values for _ in (0, 1)], device)[::2]))
    # another device: the CPU for CUDA tensors; under the interpreter (CPU tensors) the meta device
    other = torch.device("cpu") if torch.device(device).type == "cuda" else torch.device("meta")
    bad.append((f"on {other}", torch.tensor(values, dtype=torch.float64, device=other)))
    return bad


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("op", ["reuse", "sgd_step", "adamw_step"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bad_scalars_raise_before_writing(backend, op, form):
    mod, dev = backend_module(backend), _dev(backend)
    size, stat = 7, 1
    state = _state(("param", "grad", "buf", "m", "v", "psf", "backup"), form, torch.float32, dev, size, seed=5,
                   positive=("v",))
    cfg_sgd, cfg_adamw = SGD_CONFIGS[3], ADAMW_CONFIGS[0]
    if op == "reuse":
        values, call = reuse_scalars(COEFF), lambda s, sc: _reuse(mod, form, s, COEFF, sc)
    elif op == "sgd_step":
        values = sgd_scalars(COEFF, LR)
        call = lambda s, sc: _sgd(mod, form, s, "restore_psf", cfg_sgd, stat, COEFF, LR, sc)   # noqa: E731
    else:
        c = cfg_adamw
        values = adamw_scalars(COEFF, LR, c["beta1"], c["beta2"], c["weight_decay"], c["step"])
        call = lambda s, sc: _adamw(mod, form, s, "restore_psf", c, stat, COEFF, LR,   # noqa: E731
                                    c["weight_decay"], c["step"], sc)
    for name, sc in _bad_scalars(values, dev):
        got = _clone(state)
        with pytest.raises((ValueError, RuntimeError), match="scalars"):
            call(got, sc)
        _assert_same_state(state, got, f"{op} {form} with scalars {name}: written before the error")
    # and the good one is taken
    got = _clone(state)
    call(got, _f64(values, dev))
    key = "grad" if op == "reuse" else "param"
    first = (lambda s: s[key]) if form == "flat" else (lambda s: s[key][0])    # noqa: E731
    assert not torch.equal(_bits(first(got)), _bits(first(state)))
