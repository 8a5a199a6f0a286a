"""Every fused op on every available backend against the reference (eager torch) backend.

Backends run on the tensors they serve (``helpers.device_for``): ``cpu`` on CPU tensors,
``cuda`` on CUDA tensors, ``triton`` on CUDA tensors or, without a GPU, on CPU tensors under
TRITON_INTERPRET=1. The reference always runs on CPU tensors: it defines the bits.

Element-wise results (weights, PSF, optimizer state, gradients) must be bit-identical to the
reference in all four dtypes (ALGORITHMS.md, "Precision of the scalars": fp32/fp64 maths, one
rounding per stored result, no fused multiply-add), over consecutive calls that each start from
the same state on both sides. Sums (norms, Gram sums, statistics) are reductions in another
order: they agree to rounding, fp64 ones to ~1e-12.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vsam_ext.ops import available_backends, backend_module, reference as R
from helpers import FUSED_PARAMS as BACKENDS, device_for as _device_for

SIZES = [0, 1, 3, 1023, 278011]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _maths(dtype):
    return R.maths_dtype(dtype)


def assert_same(got, want):
    """Bit-identical (same dtype, shape and bits); on failure, how many elements differ and by
    how much."""
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if not torch.equal(got, want):
        diff = got.double() != want.double()
        worst = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{int(diff.sum())} of {got.numel()} elements differ from the reference, "
                             f"up to {worst:.3g} (first at index {int(diff.nonzero()[0, 0])})")


def assert_sums(got, want):
    """Sums agree to rounding: fp64 sums to ~1e-12, fp32 ones to ~1e-5; same dtype and shape."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    tol = 1e-12 if want.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def _rand(n, dtype, device, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x = x.abs() + 0.1 if positive else x
    return x.to(dtype).to(device)


def _pair(n, dtype, device, seed=0, **kw):
    x = _rand(n, dtype, device, seed, **kw)
    return x, x.clone().cpu()


def _ops(backend):
    return backend_module(backend)


def _layouts(n):
    if n == 0:
        return [[0, 0], [0, 0, 0]]
    cuts = [[0, n], [0, 0, n, n], sorted([0, 1, 1, n // 2, n // 2, n])]
    if n > 3:
        cuts.append([0] + sorted({(i * 7919) % n for i in range(1, 17)}) + [n])
    return cuts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_segment_sumsq(backend, dtype, n):
    dev = _device_for(backend)
    x = _rand(n, dtype, dev, 1)
    w = _rand(n, dtype, dev, 2)
    for bounds in _layouts(n):
        for weight, eta in ((None, 0.0), (w, 0.0), (w, 0.01), (w, 0.5)):
            got = _ops(backend).segment_sumsq(x, bounds, weight, eta)
            want = R.segment_sumsq(x.cpu(), bounds, None if weight is None else weight.cpu(), eta)
            assert want.dtype == _maths(dtype) and want.shape == (len(bounds) - 1,)
            assert_sums(got, want)


def test_segment_sumsq_eta_is_asam_t():
    """The oracle: with a weight, the sums are of ``(|w| + eta) * x``; eta defaults to 0."""
    x, w = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    want = ((w.abs() + 0.25) * x).pow(2)
    torch.testing.assert_close(R.segment_sumsq(x, [0, 20, 50], w, 0.25),
                               torch.stack([want[:20].sum(), want[20:].sum()]), rtol=1e-14, atol=0)
    assert torch.equal(R.segment_sumsq(x, [0, 50], w), R.segment_sumsq(x, [0, 50], w, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_segment_gram(backend, dtype, n):
    dev = _device_for(backend)
    a, b = _rand(n, dtype, dev, 31), _rand(n, dtype, dev, 32)
    for bounds in _layouts(n):
        got = _ops(backend).segment_gram(a, b, bounds)
        want = R.segment_gram(a.cpu(), b.cpu(), bounds)
        assert want.dtype == _maths(dtype) and want.shape == (len(bounds) - 1, 3)
        assert_sums(got, want)
        assert torch.equal(a.cpu(), _rand(n, dtype, "cpu", 31))        # inputs are not written


def test_segment_gram_oracle():
    a, b = torch.randn(30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    got = R.segment_gram(a, b, [0, 0, 10, 30])
    assert got.shape == (3, 3) and torch.equal(got[0], torch.zeros(3))
    torch.testing.assert_close(got[2].double(), torch.stack([a[10:] @ a[10:], a[10:] @ b[10:], b[10:] @ b[10:]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_segment_axpby(backend, dtype, n):
    dev = _device_for(backend)
    for bounds in _layouts(n):
        nseg = len(bounds) - 1
        y, y_ref = _pair(n, dtype, dev, 33)
        x, x_ref = _pair(n, dtype, dev, 34)
        for call in range(2):                    # the second call starts from the first's result
            coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            alpha = _rand(nseg, coeff_dtype, "cpu", 35 + call)
            beta = _rand(nseg, coeff_dtype, "cpu", 37 + call)
            if nseg:
                alpha[0] = 1.0                   # LookSAM's reuse form: y + beta * x
            got = _ops(backend).segment_axpby(y, x, alpha.to(dev), beta.to(dev), bounds)
            want = R.segment_axpby(y_ref, x_ref, alpha, beta, bounds)
            assert_same(y, y_ref)
            assert torch.equal(x.cpu(), x_ref)
            assert want.dtype == _maths(dtype) and want.shape == (nseg,)
            assert_sums(got, want)


def test_segment_axpby_oracle():
    y, x = torch.randn(30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    want = torch.cat([-0.5 * y[:10] + 2.0 * x[:10], y[10:] + 0.25 * x[10:]])
    sums = R.segment_axpby(y, x, torch.tensor([-0.5, 1.0]), torch.tensor([2.0, 0.25]), [0, 10, 30])
    torch.testing.assert_close(y, want)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, torch.stack([want[:10] @ want[:10], want[10:] @ want[10:]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_perturb(backend, dtype, n, adaptive, eta):
    dev = _device_for(backend)
    p, p_ref = _pair(n, dtype, dev, 3)
    g, g_ref = _pair(n, dtype, dev, 4)
    scale = torch.tensor(0.037, dtype=_maths(dtype), device=dev)
    backup, backup_ref = torch.empty_like(p), torch.empty_like(p_ref)
    keep, keep_ref = torch.empty_like(p), torch.empty_like(p_ref)
    for _ in range(2):             # twice in a row: the second call starts from the first's result
        _ops(backend).perturb(p, g, scale, backup, adaptive, keep, eta)
        R.perturb(p_ref, g_ref, scale.cpu(), backup_ref, adaptive, keep_ref, eta)
        assert_same(p, p_ref)
        assert torch.equal(backup.cpu(), backup_ref) and torch.equal(keep.cpu(), g_ref)
    _ops(backend).perturb(p, g, scale, backup, adaptive, None, eta)      # grad_keep is optional
    R.perturb(p_ref, g_ref, scale.cpu(), backup_ref, adaptive, None, eta)
    assert_same(p, p_ref)


@pytest.mark.parametrize("backend", ["reference"] + [b.values[0] for b in BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_refuses_a_scale_not_in_the_maths_dtype(backend, dtype):
    """An fp32 scale for an fp64 buffer would cut rho / (norm + eps) to 24 bits (and an fp64 one
    for an fp32 buffer is a caller's mix-up): a clear error naming scale, nothing written."""
    if backend == "none":
        pytest.skip("only the reference backend is built")
    dev = _device_for(backend)
    wrong = torch.float32 if dtype == torch.float64 else torch.float64
    p = _rand(5, dtype, dev, 3)
    before = p.clone()
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        backend_module(backend).perturb(p, _rand(5, dtype, dev, 4), torch.tensor(0.5, dtype=wrong, device=dev),
                                        torch.empty_like(p), False, None, 0.0)
    assert torch.equal(p, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_restore_psf_stats(backend, dtype, n):
    dev = _device_for(backend)
    for stat_start in sorted({0, n // 3, n}):
        p, p_ref = _pair(n, dtype, dev, 5)
        backup, backup_ref = _pair(n, dtype, dev, 6)
        gs, gs_ref = _pair(n, dtype, dev, 7)
        psf, psf_ref = _pair(n, dtype, dev, 8)
        got = _ops(backend).restore_psf_stats(p, backup, gs, psf, stat_start)
        want = R.restore_psf_stats(p_ref, backup_ref, gs_ref, psf_ref, stat_start)
        assert torch.equal(p.cpu(), backup_ref)
        assert_same(psf, psf_ref)
        assert want.dtype == _maths(dtype) and want.shape == (2,)
        assert_sums(got, want)
        assert _ops(backend).restore_psf_stats(p, backup, gs, None, stat_start) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_reuse(backend, dtype, n):
    dev = _device_for(backend)
    g, g_ref = _pair(n, dtype, dev, 9)
    psf, psf_ref = _pair(n, dtype, dev, 10)
    for a in (1, 2, 3):
        _ops(backend).reuse(g, psf, 0.7 ** a)
        R.reuse(g_ref, psf_ref, 0.7 ** a)
        assert_same(g, g_ref)


SGD_CONFIGS = [
    dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=True),
    dict(lr=0.05, weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
]
MODES = ["plain", "reuse", "restore", "restore_psf"]


def _mode_args(mode, n, dtype, dev, seed):
    psf = backup = None
    if mode in ("reuse", "restore_psf"):
        psf = _pair(n, dtype, dev, seed + 1)
    if mode in ("restore", "restore_psf"):
        backup = _pair(n, dtype, dev, seed + 2)
    return psf, backup


def _split(pair, i):
    return None if pair is None else pair[i]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 3, 1023, 278011])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", range(len(SGD_CONFIGS)))
def test_sgd_step(backend, dtype, n, mode, cfg):
    dev, hp = _device_for(backend), SGD_CONFIGS[cfg]
    p, p_ref = _pair(n, dtype, dev, 11)
    buf, buf_ref = (torch.zeros_like(p), torch.zeros_like(p_ref)) if hp["momentum"] else (None, None)
    for step in range(3):          # state carried from call to call; `first` on the first
        g, g_ref = _pair(n, dtype, dev, 20 + step)
        psf, backup = _mode_args(mode, n, dtype, dev, 30 + 3 * step)
        args = (0.7 ** (step + 1), n // 2, hp["lr"], hp["weight_decay"], hp["momentum"], hp["dampening"],
                hp["nesterov"], hp["maximize"], step == 0)
        got = _ops(backend).sgd_step(p, g, buf, _split(psf, 0), _split(backup, 0), *args)
        want = R.sgd_step(p_ref, g_ref, buf_ref, _split(psf, 1), _split(backup, 1), *args)
        assert_same(p, p_ref)
        if buf is not None:
            assert_same(buf, buf_ref)
        if psf is not None:
            assert_same(psf[0], psf[1])
        assert torch.equal(g.cpu(), g_ref)          # the grad buffer is not written
        assert (got is None) == (want is None)
        if want is not None:
            assert_sums(got, want)


ADAMW_CONFIGS = [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
    dict(lr=3e-4, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 3, 1023, 278011])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", range(len(ADAMW_CONFIGS)))
def test_adamw_step(backend, dtype, n, mode, cfg):
    dev, hp = _device_for(backend), ADAMW_CONFIGS[cfg]
    p, p_ref = _pair(n, dtype, dev, 12)
    m, m_ref = torch.zeros_like(p), torch.zeros_like(p_ref)
    v, v_ref = torch.zeros_like(p), torch.zeros_like(p_ref)
    for step in range(1, 4):
        g, g_ref = _pair(n, dtype, dev, 40 + step)
        psf, backup = _mode_args(mode, n, dtype, dev, 50 + 3 * step)
        args = (0.7 ** step, n // 2, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], step,
                hp["maximize"])
        got = _ops(backend).adamw_step(p, g, m, v, _split(psf, 0), _split(backup, 0), *args)
        want = R.adamw_step(p_ref, g_ref, m_ref, v_ref, _split(psf, 1), _split(backup, 1), *args)
        assert_same(p, p_ref)
        assert_same(m, m_ref)
        assert_same(v, v_ref)
        assert (got is None) == (want is None)
        if want is not None:
            assert_sums(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_random_layouts(backend, data):
    dev = _device_for(backend)
    dtype = data.draw(st.sampled_from(DTYPES))
    sizes = data.draw(st.lists(st.integers(0, 3000), min_size=1, max_size=6))
    n = sum(sizes)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    seed = data.draw(st.integers(0, 2 ** 16))
    x, x_ref = _pair(n, dtype, dev, seed)
    w, w_ref = _pair(n, dtype, dev, seed + 1)
    assert_sums(_ops(backend).segment_sumsq(x, bounds, w, 0.01), R.segment_sumsq(x_ref, bounds, w_ref, 0.01))
    assert_sums(_ops(backend).segment_gram(x, w, bounds), R.segment_gram(x_ref, w_ref, bounds))
    coeffs = [_rand(len(sizes), torch.float64 if dtype == torch.float64 else torch.float32, "cpu", seed + k)
              for k in (4, 5)]
    y, y_ref = _pair(n, dtype, dev, seed + 6)
    assert_sums(_ops(backend).segment_axpby(y, x, *[c.to(dev) for c in coeffs], bounds),
                R.segment_axpby(y_ref, x_ref, *coeffs, bounds))
    assert_same(y, y_ref)
    stat_start = data.draw(st.sampled_from(bounds))
    p, p_ref = _pair(n, dtype, dev, seed + 2)
    gs, gs_ref = _pair(n, dtype, dev, seed + 3)
    got = _ops(backend).sgd_step(p, gs, None, x, w, 0.0, stat_start, 0.1, 0.0, 0.0, 0.0, False, False, True)
    want = R.sgd_step(p_ref, gs_ref, None, x_ref, w_ref, 0.0, stat_start, 0.1, 0.0, 0.0, 0.0, False, False, True)
    assert_same(p, p_ref)
    assert_same(x, x_ref)
    assert_sums(got, want)


def test_reference_matches_torch_optimizers_in_float64():
    """The oracle itself: its fused SGD/AdamW steps are torch.optim's maths."""
    torch.manual_seed(0)
    for cls, kw in [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
                    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
                    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.95)))]:
        p = torch.randn(1000, dtype=torch.float64, requires_grad=True)
        q = p.detach().clone()
        opt = cls([p], **kw)
        m, v = torch.zeros_like(q), torch.zeros_like(q)
        for t in range(1, 6):
            g = torch.randn(1000, dtype=torch.float64)
            p.grad = g.clone()
            opt.step()
            if cls is torch.optim.SGD:
                R.sgd_step(q, g, m, None, None, 0.0, 0, kw["lr"], kw["weight_decay"], kw["momentum"],
                           kw.get("dampening", 0.0), kw.get("nesterov", False), kw.get("maximize", False), t == 1)
            else:
                R.adamw_step(q, g, m, v, None, None, 0.0, 0, kw["lr"], 0.8, 0.95, 1e-8, kw["weight_decay"], t, False)
        torch.testing.assert_close(p.detach(), q, rtol=1e-13, atol=1e-14)


@pytest.mark.skipif("cpu" not in available_backends(), reason="cpu extension not built")
def test_cpu_results_do_not_depend_on_the_thread_count():
    """Fixed chunks and ordered partial sums: 1 thread and 2 threads give identical bits."""
    ops = backend_module("cpu")
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = _rand(1_000_003, torch.float32, "cpu", 1)
            p, g, backup, psf = (_rand(1_000_003, torch.float32, "cpu", s) for s in (2, 3, 4, 5))
            m = torch.zeros_like(p)
            bounds = [0, 17, 500_000, 1_000_003]
            sums = torch.stack([ops.segment_sumsq(x, bounds), ops.segment_sumsq(x, bounds, p, 0.01)])
            gram = ops.segment_gram(x, g, bounds)
            axpby = ops.segment_axpby(backup, x, torch.tensor([0.5, 1.0, -2.0]), torch.tensor([1.5, 0.25, 3.0]), bounds)
            stats = ops.sgd_step(p, g, m, psf, backup, 0.0, 1000, 0.1, 1e-4, 0.9, 0.0, False, False, True)
            results.append((sums, gram, axpby, stats, p, m, psf, backup))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)
