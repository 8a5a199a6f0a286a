"""Property tests (hypothesis): every fused op of every available backend against the reference.

For each op of ``vsam_ext.ops.reference`` and each backend other than the reference, random
sizes (0, sizes around the backends' block/chunk sizes, up to a few thousand, now and then past
the CPU chunk and the interpreter's block), random segment layouts (gaps before/after the
segments, empty segments, no segment at all), random dtypes, random hyper-parameters and several
consecutive calls with the backend's state carried from call to call. After every call:

* results within the tolerances of test_ops.py (fp32 maths: a few ulps; 16-bit results: one
  rounding; fp64: tight), and the returned sums/statistics to 1e-5 relative;
* what must be bit-exact (backup copies, grad_keep copies, restored weights, elements outside
  every segment) compared with ``torch.equal``;
* every input that must not be written (grad, backup, x, weight, alpha/beta, scale, psf outside
  the restore modes, the momentum buffer without momentum) unchanged, bit for bit.

Before each call the reference's copies of the buffers are set to the backend's current ones, so
every call is compared from identical inputs (no drift of 16-bit state across calls) while the
backend's own state is carried.

Under the Triton interpreter (no GPU) the Triton backend's block is as wide as a buffer needs,
so one program would cover most examples; there the block is also drawn (16 to 1024 elements,
``triton_backend.BLOCK`` patched for the call) so that the multi-program paths (masks, partial
sums, the per-segment block tables) are exercised as on a GPU.
"""
import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from vsam_ext.ops import available_backends, backend_module, reference as R

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Sizes around the blocks: Triton 2048 on a GPU, 16 (minimum) .. 65536 under the interpreter;
# CPU chunks of 2^15; CUDA vectors of 2-8 elements.
EDGE_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
              1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097]
BIG_SIZES = [32767, 32768, 32769, 65535, 65536, 65537]
SIZES = st.one_of(st.integers(0, 3000), st.sampled_from(EDGE_SIZES + BIG_SIZES))
SEG_LENGTHS = st.one_of(st.integers(0, 700), st.sampled_from([0, 0, 0, 1, 2, 15, 16, 17, 255, 256, 257,
                                                              1023, 1024, 1025, 2047, 2048, 2049]))

# Examples per (backend, dtype), and per (backend, dtype, first mode) for the fused steps; fixed
# (derandomized) so that CI runs the same cases every time.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None, suppress_health_check=_HEALTH)
STEP_PROPERTY = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                         suppress_health_check=_HEALTH)


def _device_for(name):
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


BACKENDS = [pytest.param(b, id=b) for b in available_backends() if b != "reference"]
if not BACKENDS:
    BACKENDS = [pytest.param("none", marks=pytest.mark.skip(reason="only the reference backend is built"))]

_TRITON_INTERPRETED = "triton" in available_backends() and bool(getattr(backend_module("triton"), "_INTERPRET", False))


def _tol(dtype):
    # as test_ops.py: fp32 maths in both; a 16-bit result may differ by one rounding
    return {torch.float32: (2e-6, 1e-6), torch.float64: (1e-12, 1e-13),
            torch.bfloat16: (2 ** -7, 1e-6), torch.float16: (2 ** -10, 1e-6)}[dtype]


def assert_close(got, want, msg=""):
    rtol, atol = _tol(want.dtype)
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    # equal_nan: an overflow to inf (and inf * 0 in the next call) is part of the semantics too
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{msg}: {m}")


def assert_sums_close(got, want, msg=""):
    """fp32 per-segment sums / statistics: 1e-5 relative (different summation orders)."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, (msg, got, want)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{msg}: {m}")


def assert_equal(got, want, msg=""):
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    assert torch.equal(got.cpu(), want.cpu()), f"{msg}: not bit-exact"


def _data(n, dtype, seed, scale=1.0, positive=False, zeros=0.0, fill=None):
    """A random CPU buffer (normal * scale; |.| when positive; a fraction of exact zeros)."""
    if fill is not None:
        return torch.full((n,), fill, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if positive:
        x = x.abs()
    if zeros:
        x[torch.rand(n, generator=g, dtype=torch.float64) < zeros] = 0.0
    return x.to(dtype)


class Buf:
    """One buffer on the backend's device (``dev``) and its reference copy (``ref``, CPU)."""

    def __init__(self, cpu_tensor, device):
        self.dev = cpu_tensor.to(device)
        self.ref = cpu_tensor.clone()

    def sync(self):
        """The reference copy := the backend's current values (compare each call from equal inputs)."""
        self.ref.copy_(self.dev.cpu())

    def snapshot(self):
        return self.dev.cpu().clone()


def _dev(buf):
    return None if buf is None else buf.dev


def _ref(buf):
    return None if buf is None else buf.ref


@contextlib.contextmanager
def _block(backend, block):
    """Under the interpreter: run the Triton backend with ``BLOCK = block`` (a power of 2)."""
    if backend != "triton" or block is None:
        yield
        return
    mod = backend_module("triton")
    old = mod.BLOCK
    mod.BLOCK = block
    try:
        yield
    finally:
        mod.BLOCK = old


def _draw_block(data, backend, n):
    if backend != "triton" or not _TRITON_INTERPRETED:
        return None
    # at most ~24 programs per launch: the interpreter pays per program
    choices = [b for b in (16, 64, 256, 1024) if b < n and -(-n // b) <= 24]
    block = data.draw(st.sampled_from([None] + choices), label="triton BLOCK")
    event(f"triton BLOCK {block or 'default'}")
    return block


def _common(data):
    seed = data.draw(st.integers(0, 2 ** 20), label="seed")
    scale = data.draw(st.sampled_from([1.0, 1.0, 1e-2, 10.0]), label="data scale")
    zeros = data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="fraction of zeros")
    return seed, scale, zeros


def _draw_layout(data):
    """Segment bounds (non-decreasing, in [0, n]) and n: a gap before the first segment and after
    the last, empty segments, sometimes none at all, now and then one past a CPU chunk."""
    lead = data.draw(st.sampled_from([0, 0, 0, 1, 7, 100]), label="lead")
    lengths = data.draw(st.lists(SEG_LENGTHS, min_size=0, max_size=6), label="segment lengths")
    big = data.draw(st.sampled_from([None] * 8 + [32767, 32768, 32769, 65537]), label="big segment")
    if big is not None:
        lengths.insert(data.draw(st.integers(0, len(lengths)), label="big at"), big)
    tail = data.draw(st.sampled_from([0, 0, 0, 1, 3, 100]), label="tail")
    bounds = [lead]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    _size_event(bounds[-1] + tail)
    event(f"segments {len(lengths)}, empty {sum(1 for k in lengths if k == 0)}")
    return bounds, bounds[-1] + tail


def _size_event(n):
    event("n = 0" if n == 0 else "n <= 64" if n <= 64 else "n <= 4097" if n <= 4097 else "n > 4097")


def _draw_n(data):
    n = data.draw(SIZES, label="n")
    _size_event(n)
    return n


def _maths(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _outside(bounds, n):
    """Mask of the elements in no segment."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[bounds[0]:bounds[-1]] = False
    return mask


# ------------------------------------------------------------------------------------------------
# the segment ops
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_segment_sumsq_property(backend, dtype, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    x = _data(0, dtype, 0)          # replaced on the first call
    n = None
    for call in range(data.draw(st.integers(1, 3), label="calls")):
        bounds, n_new = _draw_layout(data)
        if n is None or n_new != n:  # a new buffer; else the same one, another layout of it
            n = n_new
            x = _data(n, dtype, seed + call, scale, zeros=zeros).to(dev)
            w = _data(n, dtype, seed + 100 + call, scale).to(dev)
        use_w = data.draw(st.booleans(), label="weight")
        eta = data.draw(st.sampled_from([0.0, 0.01, 0.5]) | st.floats(0.0, 2.0), label="eta") if use_w else 0.0
        block = _draw_block(data, backend, n)
        x0, w0 = x.cpu().clone(), w.cpu().clone()
        with _block(backend, block):
            got = ops.segment_sumsq(x, bounds, w if use_w else None, eta) if (use_w or eta) else \
                ops.segment_sumsq(x, bounds)
        want = R.segment_sumsq(x0, bounds, w0 if use_w else None, eta)
        assert got.device.type == torch.device(dev).type
        assert_sums_close(got, want, f"segment_sumsq call {call}")
        assert_equal(x, x0, "x written")
        assert_equal(w, w0, "weight written")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_segment_gram_property(backend, dtype, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    for call in range(data.draw(st.integers(1, 2), label="calls")):
        bounds, n = _draw_layout(data)
        a0 = _data(n, dtype, seed + call, scale, zeros=zeros)
        # b: independent, or correlated with a (LookSAM's projection: the cross term cancels less)
        b0 = _data(n, dtype, seed + 50 + call, scale)
        if data.draw(st.booleans(), label="b ~ a"):
            b0 = (a0.double() * 0.7 + b0.double() * 0.1).to(dtype)
        a, b = a0.to(dev), b0.to(dev)
        block = _draw_block(data, backend, n)
        with _block(backend, block):
            got = ops.segment_gram(a, b, bounds)
        want = R.segment_gram(a0, b0, bounds)
        wide = dtype == torch.float64
        assert got.dtype == (torch.float64 if wide else torch.float32) and got.shape == (len(bounds) - 1, 3)
        got = got.cpu()
        # sum a^2 and sum b^2 relative; the cross term relative to sqrt(sum a^2 * sum b^2)
        # (Cauchy-Schwarz: its rounding error is a fraction of that, whatever the cancellation)
        rtol = 1e-12 if wide else 1e-5
        torch.testing.assert_close(got[:, [0, 2]], want[:, [0, 2]], rtol=rtol, atol=rtol)
        bound = rtol * (want[:, 0] * want[:, 2]).sqrt() + rtol
        assert ((got[:, 1] - want[:, 1]).abs() <= bound).all(), (got[:, 1], want[:, 1])
        assert_equal(a, a0, "a written")
        assert_equal(b, b0, "b written")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_segment_axpby_property(backend, dtype, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    bounds, n = _draw_layout(data)
    nseg = len(bounds) - 1
    y = Buf(_data(n, dtype, seed, scale, zeros=zeros), dev)
    x = Buf(_data(n, dtype, seed + 1, scale), dev)
    outside = _outside(bounds, n)
    coeff = st.sampled_from([0.0, 1.0, -1.0, 0.5]) | st.floats(-3.0, 3.0, allow_subnormal=False)
    for call in range(data.draw(st.integers(1, 3), label="calls")):
        alpha = torch.tensor(data.draw(st.lists(coeff, min_size=nseg, max_size=nseg), label="alpha"),
                             dtype=_maths(dtype))
        beta = torch.tensor(data.draw(st.lists(coeff, min_size=nseg, max_size=nseg), label="beta"),
                            dtype=_maths(dtype))
        if call and data.draw(st.booleans(), label="new x"):
            x = Buf(_data(n, dtype, seed + 10 + call, scale), dev)
        y.sync()
        y0, x0 = y.snapshot(), x.snapshot()
        alpha_dev, beta_dev = alpha.to(dev), beta.to(dev)
        block = _draw_block(data, backend, n)
        with _block(backend, block):
            got = ops.segment_axpby(y.dev, x.dev, alpha_dev, beta_dev, bounds)
        want = R.segment_axpby(y.ref, x.ref, alpha, beta, bounds)
        assert_close(y.dev, y.ref, f"y, call {call}")
        assert_equal(y.dev[outside.to(dev)], y0[outside], "y outside every segment written")
        assert_sums_close(got, want, f"sums, call {call}")
        assert_equal(x.dev, x0, "x written")
        assert_equal(alpha_dev, alpha, "alpha written")
        assert_equal(beta_dev, beta, "beta written")


# ------------------------------------------------------------------------------------------------
# perturb, restore_psf_stats, reuse
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_perturb_property(backend, dtype, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    n = _draw_n(data)
    adaptive = data.draw(st.booleans(), label="adaptive")
    eta = data.draw(st.sampled_from([0.0, 0.01, 1.0]) | st.floats(0.0, 2.0), label="eta") if adaptive else 0.0
    p = Buf(_data(n, dtype, seed, scale, zeros=zeros), dev)
    # backup and grad_keep start as NaN: every element must be overwritten
    backup = Buf(_data(n, dtype, 0, fill=float("nan")), dev)
    keep = Buf(_data(n, dtype, 0, fill=float("nan")), dev)
    for call in range(data.draw(st.integers(1, 3), label="calls")):
        g = Buf(_data(n, dtype, seed + 1 + call, scale, zeros=zeros), dev)
        s = data.draw(st.sampled_from([0.0, 0.05]) | st.floats(-1.0, 1.0, allow_subnormal=False), label="scale")
        sc = torch.tensor(s, dtype=torch.float32)
        sc_dev = sc.to(dev)
        use_keep = data.draw(st.booleans(), label="grad_keep")
        block = _draw_block(data, backend, n)
        p.sync()
        p0, g0, keep0 = p.snapshot(), g.snapshot(), keep.snapshot()
        with _block(backend, block):
            if adaptive or eta or use_keep or data.draw(st.booleans(), label="all arguments"):
                ops.perturb(p.dev, g.dev, sc_dev, backup.dev, adaptive, keep.dev if use_keep else None, eta)
            else:
                ops.perturb(p.dev, g.dev, sc_dev, backup.dev, adaptive)
        R.perturb(p.ref, g.ref, sc, backup.ref, adaptive, keep.ref if use_keep else None, eta)
        assert_close(p.dev, p.ref, f"param, call {call}")
        assert_equal(backup.dev, p0, "backup is not the weights before the call")
        if use_keep:
            assert_equal(keep.dev, g0, "grad_keep is not the gradient")
            keep.sync()
        elif n:
            assert torch.equal(keep.dev.cpu().isnan(), keep0.isnan()) and torch.equal(
                keep.dev.cpu().nan_to_num(), keep0.nan_to_num()), "grad_keep written though not given"
        assert_equal(g.dev, g0, "grad written")
        assert_equal(sc_dev, sc, "scale written")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_restore_psf_stats_property(backend, dtype, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    n = _draw_n(data)
    p = Buf(_data(n, dtype, seed, scale), dev)
    psf = Buf(_data(n, dtype, seed + 1, scale, zeros=zeros), dev)
    for call in range(data.draw(st.integers(1, 3), label="calls")):
        backup = Buf(_data(n, dtype, seed + 10 + call, scale, zeros=zeros), dev)
        gs = Buf(_data(n, dtype, seed + 20 + call, scale, zeros=zeros), dev)
        if call:   # the weights were perturbed again (or are garbage: they must not be read)
            p = Buf(_data(n, dtype, seed + 30 + call, scale,
                          fill=float("nan") if data.draw(st.booleans(), label="NaN weights") else None), dev)
        use_psf = data.draw(st.booleans() | st.just(True), label="psf")
        if use_psf and call and data.draw(st.booleans(), label="fresh g in psf"):
            psf = Buf(_data(n, dtype, seed + 40 + call, scale, zeros=zeros), dev)
        stat_start = data.draw(st.integers(0, n + 3) | st.sampled_from([0, n]), label="stat_start")
        block = _draw_block(data, backend, n)
        psf.sync()
        backup0, gs0, psf0 = backup.snapshot(), gs.snapshot(), psf.snapshot()
        with _block(backend, block):
            got = ops.restore_psf_stats(p.dev, backup.dev, gs.dev, psf.dev if use_psf else None, stat_start)
        want = R.restore_psf_stats(p.ref, backup.ref, gs.ref, psf.ref if use_psf else None, stat_start)
        assert_equal(p.dev, backup0, "restored weights are not the backup")
        assert_equal(backup.dev, backup0, "backup written")
        assert_equal(gs.dev, gs0, "grad_sam written")
        if use_psf:
            assert_close(psf.dev, psf.ref, f"psf, call {call}")
            assert got is not None
            assert_sums_close(got, want, f"statistics, call {call}")
        else:
            assert got is None
            assert_equal(psf.dev, psf0, "psf written though not given")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data())
def test_reuse_property(backend, dtype, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    n = _draw_n(data)
    g = Buf(_data(n, dtype, seed, scale, zeros=zeros), dev)
    psf = Buf(_data(n, dtype, seed + 1, scale, zeros=zeros), dev)
    for call in range(data.draw(st.integers(1, 3), label="calls")):
        coeff = data.draw(st.sampled_from([0.0, 1.0, 0.5]) | st.floats(-3.0, 3.0, allow_subnormal=False),
                          label="coeff")
        block = _draw_block(data, backend, n)
        g.sync()
        psf0 = psf.snapshot()
        with _block(backend, block):
            ops.reuse(g.dev, psf.dev, coeff)
        R.reuse(g.ref, psf.ref, coeff)
        assert_close(g.dev, g.ref, f"grad, call {call}")
        assert_equal(psf.dev, psf0, "psf written")


# ------------------------------------------------------------------------------------------------
# the fused base steps, in every mode; the mode may change from call to call (vSAM alternates
# restore + PSF on SAM steps with reuse on the others)
# ------------------------------------------------------------------------------------------------

MODES = ["plain", "reuse", "restore", "restore_psf"]


def _step_inputs(data, mode, n, dtype, dev, seed, scale, zeros, p):
    """(grad, psf, backup, coeff, stat_start) of one call in ``mode``; in the restore modes the
    current weights are replaced by perturbed ones or by NaN (they must not be read)."""
    g = Buf(_data(n, dtype, seed, scale, zeros=zeros), dev)
    psf = backup = None
    if mode in ("reuse", "restore_psf"):
        psf = Buf(_data(n, dtype, seed + 1, scale, zeros=zeros), dev)
    if mode in ("restore", "restore_psf"):
        backup = Buf(p.snapshot(), dev)
        fill = float("nan") if data.draw(st.booleans(), label="NaN perturbed weights") else None
        p.dev.copy_(_data(n, dtype, seed + 2, scale, fill=fill).to(dev))
    coeff = data.draw(st.sampled_from([0.0, 1.0]) | st.floats(-3.0, 3.0, allow_subnormal=False), label="coeff")
    stat_start = data.draw(st.integers(0, n + 3) | st.sampled_from([0, n]), label="stat_start")
    return g, psf, backup, coeff, stat_start


def _check_step_common(got, want, p, g, g0, psf, psf0, backup, backup0, mode, call):
    assert_close(p.dev, p.ref, f"param, call {call} ({mode})")
    assert_equal(g.dev, g0, "grad written")
    if backup is not None:
        assert_equal(backup.dev, backup0, "backup written")
    if mode == "restore_psf":
        assert_close(psf.dev, psf.ref, f"psf, call {call}")
        assert got is not None and want is not None
        assert_sums_close(got, want, f"statistics, call {call}")
    else:
        assert got is None and want is None, (got, want)
        if psf is not None:
            assert_equal(psf.dev, psf0, "psf written outside the restore mode")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first_mode", MODES)
@STEP_PROPERTY
@given(data=st.data())
def test_sgd_step_property(backend, dtype, first_mode, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    n = _draw_n(data)
    lr = data.draw(st.sampled_from([0.1, 1e-3]) | st.floats(1e-5, 1.0), label="lr")
    weight_decay = data.draw(st.sampled_from([0.0, 0.0, 5e-4]) | st.floats(0.0, 0.5), label="weight_decay")
    momentum = data.draw(st.sampled_from([0.0, 0.0, 0.9]) | st.floats(0.0, 0.99), label="momentum")
    dampening = data.draw(st.sampled_from([0.0, 0.0, 0.1]) | st.floats(0.0, 1.0), label="dampening")
    nesterov = data.draw(st.booleans(), label="nesterov")
    maximize = data.draw(st.booleans(), label="maximize")
    p = Buf(_data(n, dtype, seed, 1.0), dev)
    # the momentum buffer: NaN when the first call initialises it (must not be read); without
    # momentum None, or a buffer that must stay as it is
    first = data.draw(st.booleans() | st.just(True), label="first on the first call")
    event(f"momentum {'on' if momentum else 'off'}, nesterov {nesterov}, first {first}")
    if momentum:
        buf = Buf(_data(n, dtype, seed + 1, scale, fill=float("nan") if first else None), dev)
    else:
        buf = Buf(_data(n, dtype, seed + 1, scale), dev) if data.draw(st.booleans(), label="buffer") else None
    for call in range(data.draw(st.integers(1, 4), label="calls")):
        mode = first_mode if call == 0 else data.draw(st.sampled_from(MODES), label="mode")
        event(f"calls {call + 1}")
        g, psf, backup, coeff, stat_start = _step_inputs(data, mode, n, dtype, dev, seed + 10 * (call + 1),
                                                         scale, zeros, p)
        block = _draw_block(data, backend, n)
        for b in (p, buf):
            if b is not None:
                b.sync()
        g0 = g.snapshot()
        psf0 = None if psf is None else psf.snapshot()
        backup0 = None if backup is None else backup.snapshot()
        buf0 = None if buf is None else buf.snapshot()
        args = (coeff, stat_start, lr, weight_decay, momentum, dampening, nesterov, maximize, first and call == 0)
        with _block(backend, block):
            got = ops.sgd_step(p.dev, g.dev, _dev(buf), _dev(psf), _dev(backup), *args)
        want = R.sgd_step(p.ref, g.ref, _ref(buf), _ref(psf), _ref(backup), *args)
        _check_step_common(got, want, p, g, g0, psf, psf0, backup, backup0, mode, call)
        if buf is not None:
            if momentum:
                assert_close(buf.dev, buf.ref, f"momentum buffer, call {call}")
            else:
                assert_equal(buf.dev, buf0, "momentum buffer written without momentum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first_mode", MODES)
@STEP_PROPERTY
@given(data=st.data())
def test_adamw_step_property(backend, dtype, first_mode, data):
    dev = _device_for(backend)
    ops = backend_module(backend)
    seed, scale, zeros = _common(data)
    n = _draw_n(data)
    lr = data.draw(st.sampled_from([1e-3, 0.1]) | st.floats(1e-5, 0.5), label="lr")
    beta1 = data.draw(st.sampled_from([0.9, 0.0]) | st.floats(0.0, 0.99), label="beta1")
    beta2 = data.draw(st.sampled_from([0.999, 0.95]) | st.floats(0.5, 0.9999), label="beta2")
    eps = data.draw(st.sampled_from([1e-8, 1e-6, 1e-3, 1e-12]), label="eps")
    weight_decay = data.draw(st.sampled_from([0.0, 1e-2]) | st.floats(0.0, 0.5), label="weight_decay")
    maximize = data.draw(st.booleans(), label="maximize")
    step = data.draw(st.sampled_from([1, 1, 2, 10]) | st.integers(1, 5000), label="first step count")
    p = Buf(_data(n, dtype, seed, 1.0), dev)
    fresh = step == 1 or data.draw(st.booleans(), label="zero state")
    m = Buf(_data(n, dtype, seed + 1, scale, fill=0.0 if fresh else None), dev)
    v = Buf(_data(n, dtype, seed + 2, scale * scale, positive=True, fill=0.0 if fresh else None), dev)
    for call in range(data.draw(st.integers(1, 4), label="calls")):
        mode = first_mode if call == 0 else data.draw(st.sampled_from(MODES), label="mode")
        event(f"calls {call + 1}")
        g, psf, backup, coeff, stat_start = _step_inputs(data, mode, n, dtype, dev, seed + 10 * (call + 1),
                                                         scale, zeros, p)
        block = _draw_block(data, backend, n)
        for b in (p, m, v):
            b.sync()
        g0 = g.snapshot()
        psf0 = None if psf is None else psf.snapshot()
        backup0 = None if backup is None else backup.snapshot()
        args = (coeff, stat_start, lr, beta1, beta2, eps, weight_decay, step + call, maximize)
        with _block(backend, block):
            got = ops.adamw_step(p.dev, g.dev, m.dev, v.dev, _dev(psf), _dev(backup), *args)
        want = R.adamw_step(p.ref, g.ref, m.ref, v.ref, _ref(psf), _ref(backup), *args)
        _check_step_common(got, want, p, g, g0, psf, psf0, backup, backup0, mode, call)
        assert_close(m.dev, m.ref, f"exp_avg, call {call}")
        assert_close(v.dev, v.ref, f"exp_avg_sq, call {call}")
