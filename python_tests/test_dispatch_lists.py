"""``ops.lists.Dispatch``: the ops as the optimizers call them, over tensor lists (FSDP2's local
shards) or flat buffers, on every backend (its native list ops or the per-tensor loop).

The list form must give the flat form's bits element-wise (weights, PSF, saved weights, state,
gradients) when the optimizer's own buffers are flat and the parameters are lists, and the same
sums to rounding; element bounds that do not fall on tensor boundaries are refused.
"""
import pytest
import torch

from vsam_ext.ops import backend_module, lists, reference as R, resolve_dispatch
from helpers import FUSED_BACKENDS, device_for

BACKENDS = ["reference"] + FUSED_BACKENDS
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(3, 5), (0,), (1,), (7,), (33, 1001), (2, 3, 4)]     # an empty local shard included


def _rand(shape, dtype, device, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return (x.abs() + 0.1 if positive else x).to(dtype).to(device)


class Case:
    """One set of operands twice: as lists of tensors and as flat buffers (the concatenation)."""

    def __init__(self, dtype, device, seed=0):
        def make(k, positive=False):
            ts = [_rand(s, dtype, device, 100 * k + i + seed, positive) for i, s in enumerate(SHAPES)]
            return ts, torch.cat([t.reshape(-1) for t in ts])
        self.sizes = [int(torch.Size(s).numel()) for s in SHAPES]
        self.n = sum(self.sizes)
        self.param, self.param_flat = make(1)
        self.grad, self.grad_flat = make(2)
        self.state, self.state_flat = make(3)
        self.state2, self.state2_flat = make(4, positive=True)
        self.psf = _rand(self.n, dtype, device, 5 + seed)      # ours: flat in both forms
        self.psf_copy = self.psf.clone()
        self.backup = _rand(self.n, dtype, device, 6 + seed)
        self.backup_copy = self.backup.clone()
        self.stat_start = sum(self.sizes[:3])                  # a tensor boundary

    def check_same(self):
        for ts, flat in ((self.param, self.param_flat), (self.grad, self.grad_flat), (self.state, self.state_flat),
                         (self.state2, self.state2_flat)):
            assert torch.equal(torch.cat([t.reshape(-1) for t in ts]).cpu(), flat.cpu())
        assert torch.equal(self.psf.cpu(), self.psf_copy.cpu())
        assert torch.equal(self.backup.cpu(), self.backup_copy.cpu())


def _sums_close(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    tol = 1e-12 if a.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=tol, atol=tol)


@pytest.fixture(params=BACKENDS)
def dispatch(request):
    backend = request.param
    device = device_for(backend)
    return Case, device, lists.Dispatch({device.type: backend_module(backend)})


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_op_lists_equal_flat(dispatch, dtype):
    make, device, ops = dispatch
    c = make(dtype, device)
    md = R.maths_dtype(dtype)
    bounds = [0] + [sum(c.sizes[:i + 1]) for i in range(len(c.sizes))]
    for weight_l, weight_f in ((None, None), (c.param, c.param_flat)):
        _sums_close(ops.segment_sumsq(c.grad, [0, c.n], weight_l, 0.01),
                    ops.segment_sumsq(c.grad_flat, [0, c.n], weight_f, 0.01))
    _sums_close(ops.segment_sumsq(c.grad, bounds), ops.segment_sumsq(c.grad_flat, bounds))
    _sums_close(ops.segment_gram(c.psf, c.grad, bounds), ops.segment_gram(c.psf_copy, c.grad_flat, bounds))
    alpha = torch.linspace(0.5, 1.5, len(c.sizes), dtype=md, device=device)
    beta = torch.linspace(-1.0, 1.0, len(c.sizes), dtype=md, device=device)
    _sums_close(ops.segment_axpby(c.psf, c.grad, alpha, beta, bounds),
                ops.segment_axpby(c.psf_copy, c.grad_flat, alpha, beta, bounds))
    _sums_close(ops.segment_axpby(c.grad, c.psf, alpha, beta, bounds),
                ops.segment_axpby(c.grad_flat, c.psf_copy, alpha, beta, bounds))
    c.check_same()
    scale = torch.tensor(0.37, dtype=md, device=device)
    for adaptive in (False, True):
        ops.perturb(c.param, c.grad, scale, c.backup, adaptive, c.psf, 0.01)
        ops.perturb(c.param_flat, c.grad_flat, scale, c.backup_copy, adaptive, c.psf_copy, 0.01)
        c.check_same()
    _sums_close(ops.restore_psf_stats(c.param, c.backup, c.grad, c.psf, c.stat_start),
                ops.restore_psf_stats(c.param_flat, c.backup_copy, c.grad_flat, c.psf_copy, c.stat_start))
    ops.reuse(c.grad, c.psf, 0.7)
    ops.reuse(c.grad_flat, c.psf_copy, 0.7)
    c.check_same()
    sgd = (0.1, 1e-3, 0.9, 0.1, True, False)
    for first, psf, backup, coeff in ((True, None, None, 0.0), (False, True, None, 0.49), (False, True, True, 0.0)):
        got = ops.sgd_step(c.param, c.grad, c.state, c.psf if psf else None, c.backup if backup else None,
                           coeff, c.stat_start, *sgd, first)
        want = ops.sgd_step(c.param_flat, c.grad_flat, c.state_flat, c.psf_copy if psf else None,
                            c.backup_copy if backup else None, coeff, c.stat_start, *sgd, first)
        _sums_close(got, want)
        c.check_same()
    for step, psf, backup, coeff in ((1, None, None, 0.0), (2, True, None, 0.3), (3, True, True, 0.0)):
        args = (1e-2, 0.9, 0.999, 1e-8, 1e-2, step, False)
        got = ops.adamw_step(c.param, c.grad, c.state, c.state2, c.psf if psf else None,
                             c.backup if backup else None, coeff, c.stat_start, *args)
        want = ops.adamw_step(c.param_flat, c.grad_flat, c.state_flat, c.state2_flat, c.psf_copy if psf else None,
                              c.backup_copy if backup else None, coeff, c.stat_start, *args)
        _sums_close(got, want)
        c.check_same()


def test_per_tensor_loop_equals_native_list_ops():
    """The per-tensor loop (every backend without list kernels) and the cpu backend's native
    list ops: the same bits."""
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the cpu backend is not built")
    native = lists.list_ops(backend_module("cpu"), "cpu")
    loop = lists.per_tensor(backend_module("cpu"))
    assert native is backend_module("cpu") and native is not loop
    a, b = Case(torch.float32, torch.device("cpu")), Case(torch.float32, torch.device("cpu"))
    psf_a, psf_b = list(a.psf.split(a.sizes)), list(b.psf.split(b.sizes))
    bk_a, bk_b = list(a.backup.split(a.sizes)), list(b.backup.split(b.sizes))
    _sums_close(native.sgd_step_list(a.param, a.grad, a.state, psf_a, bk_a, 0.0, 2, 0.1, 0.0, 0.9, 0.0, False, False,
                                     False),
                loop.sgd_step_list(b.param, b.grad, b.state, psf_b, bk_b, 0.0, 2, 0.1, 0.0, 0.9, 0.0, False, False,
                                   False))
    for x, y in zip(a.param + a.state + psf_a, b.param + b.state + psf_b):
        assert torch.equal(x, y)


def test_bounds_off_tensor_boundaries_are_refused():
    ops = lists.Dispatch({"cpu": backend_module("reference")})
    ts = [torch.ones(3), torch.ones(4)]
    with pytest.raises(ValueError, match="tensor boundaries"):
        ops.segment_sumsq(ts, [0, 2, 7])


def test_backend_per_device_type():
    label, ops = resolve_dispatch(None, [torch.device("cpu")])
    assert label == ("cpu" if "cpu" in FUSED_BACKENDS else "reference")
    label, ops = resolve_dispatch("reference", [torch.device("cpu"), torch.device("meta")])
    assert label == "reference" and set(ops.backends) == {"cpu", "meta"}
