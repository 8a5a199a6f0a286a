"""Issue 15: the norm pass (segment_sumsq) and the statistics keep their bits while their kernels
change how they load and launch.

* cuda: the segment ops launch once for any number of segments (a table in device memory when
  the spans do not fit one kernel argument, 78 for segment_sumsq): over 1024 segments (flat) or
  203 tensors (list) the sums equal those of the same segments cut into calls of at most 78,
  which take the kernel-argument path, bit for bit. (GPU only; the host side and the functors
  are checked without a GPU by test_cuda_emulated.py.)
* triton: a block wholly inside its segment loads 128 bits at a time (the PTX is checked by
  test_triton_ptx.py); the fast and the masked path have one layout, so a flat buffer cut at
  every tensor (segments at unaligned offsets included) and the list of those tensors give the
  same bits, and a list of one gives the flat op's statistics. The segment-table cache finds a
  fresh list of the same bounds (the optimizer passes a new list every step) without converting
  every value first.
Under the Triton interpreter (no GPU) the sums are numpy's and the checks are cheap; on a GPU
they compare the compiled kernels' fast and masked paths.
"""
import pytest
import torch

from vsam_ext.ops import available_backends, backend_module, reference as R
from helpers import TRITON_INTERPRETED, device_for
from test_ops import assert_same, assert_sums

CUDA_EXT = "cuda" in available_backends() and torch.cuda.is_available()
TRITON = "triton" in available_backends()
MAX_SPANS = 78            # Table<SumsqF::Ptrs>::kMax: spans in one kernel argument


def _bounds(sizes):
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _split_calls(op, bounds, step=50):
    """``op(sub_bounds)`` over consecutive groups of at most ``step`` segments, concatenated."""
    parts = [op(bounds[i:i + step + 1]) for i in range(0, len(bounds) - 1, step)]
    return torch.cat(parts)


@pytest.mark.skipif(not CUDA_EXT, reason="needs the CUDA extension and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cuda_one_launch_equals_kernel_argument_tables(dtype):
    E = backend_module("cuda")
    g = torch.Generator().manual_seed(15)
    # 1024 segments of uneven sizes, some empty, several chunks long, offsets not multiples of 4
    sizes = [((i * 7919) % 9000) * (i % 9 != 4) + (i % 3) for i in range(1024)]
    bounds = _bounds(sizes)
    n = bounds[-1]
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).cuda()
    w = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).cuda()
    md = R.maths_dtype(dtype)
    got = E.segment_sumsq(x, bounds)
    assert len(bounds) - 1 > MAX_SPANS
    assert_same(got, _split_calls(lambda b: E.segment_sumsq(x, b), bounds))
    assert_same(E.segment_sumsq(x, bounds, w, 0.01), _split_calls(lambda b: E.segment_sumsq(x, b, w, 0.01), bounds))
    assert_same(E.segment_gram(x, w, bounds), _split_calls(lambda b: E.segment_gram(x, w, b), bounds))
    assert_sums(got, R.segment_sumsq(x.cpu(), bounds))
    alpha = torch.linspace(0.5, 1.5, len(sizes), dtype=md).cuda()
    beta = torch.linspace(-1.0, 1.0, len(sizes), dtype=md).cuda()
    y1, y2 = w.clone(), w.clone()
    s1 = E.segment_axpby(y1, x, alpha, beta, bounds)
    s2 = torch.cat([E.segment_axpby(y2, x, alpha[i:i + 50], beta[i:i + 50], bounds[i:i + 51])
                    for i in range(0, len(sizes), 50)])
    assert_same(s1, s2)
    assert_same(y1, y2)
    # lists: 1024 tensors in one launch, each equal to the flat op on that tensor
    xs = [x[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]
    got = E.segment_sumsq_list(xs)
    for i, t in enumerate(xs):
        assert torch.equal(got[i], E.segment_sumsq(t, [0, t.numel()])[0]), i


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_flat_segments_equal_the_list_bit_for_bit(dtype):
    T = backend_module("triton")
    dev = device_for("triton")
    # a 3-element tensor early on: every later segment of the flat buffer is at an unaligned
    # offset (masked path on a GPU), while the list's tensors are separate, aligned allocations
    sizes = [3, 4096 + 5, 0, 2048, 7, 6000, 1, 2049] if not TRITON_INTERPRETED else [3, 300, 0, 128, 7, 129, 1]
    bounds = _bounds(sizes)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(bounds[-1], generator=g, dtype=torch.float64).to(dtype).to(dev)
    w = torch.randn(bounds[-1], generator=g, dtype=torch.float64).to(dtype).to(dev)
    xs = [x[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]
    ws = [w[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]
    assert_same(T.segment_sumsq(x, bounds), T.segment_sumsq_list(xs))
    assert_same(T.segment_sumsq(x, bounds, w, 0.01), T.segment_sumsq_list(xs, ws, 0.01))
    assert_same(T.segment_gram(x, w, bounds), T.segment_gram_list(xs, ws))
    assert_sums(T.segment_sumsq(x, bounds), R.segment_sumsq(x.cpu(), bounds))


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
def test_triton_statistics_of_a_list_of_one_equal_the_flat_op():
    """Whole blocks and a partial one: the fast and the masked path in the flat kernel and in the
    list kernel give one tree of additions."""
    T = backend_module("triton")
    dev = device_for("triton")
    n = 3 * 2048 + 77 if not TRITON_INTERPRETED else 3 * 128 + 77
    g = torch.Generator().manual_seed(6)
    mk = lambda: torch.randn(n, generator=g).to(dev)      # noqa: E731
    p, bk, gs, psf = mk(), mk(), mk(), mk()
    m = mk()
    lst = [t.clone() for t in (p, bk, gs, psf, m)]
    flat = T.sgd_step(p, gs, m, psf, bk, 0.0, 0, 0.1, 5e-4, 0.9, 0.0, False, False, False)
    one = T.sgd_step_list([lst[0]], [lst[2]], [lst[4]], [lst[3]], [lst[1]], 0.0, 0, 0.1, 5e-4, 0.9, 0.0, False,
                          False, False)
    assert_same(flat, one)
    for a, b in ((p, lst[0]), (psf, lst[3]), (m, lst[4])):
        assert_same(a, b)


@pytest.mark.skipif(not TRITON or not TRITON_INTERPRETED, reason="the table cache is checked on CPU tensors")
def test_triton_segment_table_cache_takes_a_fresh_list_of_the_same_bounds():
    import numpy as np
    T = backend_module("triton")
    x = torch.randn(1000)
    bounds = list(range(0, 1001, 10))
    first = T._flat_table((x, x), bounds)
    assert T._flat_table((x, x), list(bounds))[0] is first[0]
    assert T._flat_table((x, x), tuple(bounds))[0] is first[0]
    assert T._flat_table((x, x), [np.int64(v) for v in bounds])[0] is first[0]
    other = T._flat_table((x, x), bounds[:-1] + [999])
    assert other[0] is not first[0]
    assert_same(T.segment_sumsq(x, [np.int64(v) for v in bounds]), T.segment_sumsq(x, bounds))
