"""The Triton backend: every fused op as one Triton kernel pass over the flat buffers.

Same functions, signatures and results as ``reference`` (the oracle). Runs on CUDA tensors, and
on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before this module is
imported), which is how it is tested on machines without a GPU.

Conventions shared by every kernel (each ``@triton.jit`` kernel sits beside its host wrapper):

* Loads and stores in the buffers' dtype; maths in fp32 registers (fp64 for fp64 buffers); one
  rounding when a result is stored (``_rounded``: to nearest even, also for bf16 under the
  interpreter, whose own fp32->bf16 cast truncates).
* Element offsets are int64 (``program_id`` is widened before it is multiplied by ``BLOCK``).
* No host-device synchronisation: device scalars (``scale``) are read by pointer inside the
  kernel; host scalars (lr, betas, coeff, bias corrections computed here in Python floats) are
  plain kernel arguments, each passed as three fp32 values (``_split``) and rebuilt in the
  kernel as ``hi + mid + lo`` in the compute dtype: fp64 buffers get the exact double although
  Triton passes Python floats as fp32; fp32 maths gets ``hi``, as torch does.
  (Written inline rather than in a helper: the interpreter re-patches ``tl`` on every call of a
  jit helper, ~2 ms each.)
* Statistics and sums of squares are deterministic: each program writes its partial sums to a
  scratch tensor, which is then reduced in a fixed order (torch ``.sum`` on the device, or the
  per-segment reduction kernel). No float atomics.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch

from .reference import check_scale

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001  (a broken install raises more than ImportError)
    raise ImportError(f"triton is not importable: {exc}") from exc

__all__ = ["usable", "segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse", "sgd_step", "adamw_step"]

# Decided once, when the kernels are decorated: the interpreter reads this variable then too.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per program (see ``_block``). On a GPU 2048 elements over 4 warps (16 per thread,
# 128-bit accesses); not tuned on hardware yet. The interpreter pays a fixed cost per program
# instance and per op, plus the block's full width even where masked, so there the block is up
# to 65536 elements but no wider than the buffer needs (278011 elements: 5 programs, the last
# one partial).
BLOCK = 65536 if _INTERPRET else 2048
NUM_WARPS = 4
# Launch options of every kernel. No FMA contraction: each operation rounds as in the eager
# reference (torch runs them one by one), and Triton 3.10 changes the default to this anyway.
_LAUNCH = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
# Partial sums per step of the per-segment reduction kernel.
RBLOCK = 1024


def usable() -> bool:
    """True when the kernels can run: a CUDA device, or the Triton interpreter."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _rounded(x, ptr):
    """``x`` (fp32/fp64 registers) converted to ``ptr``'s element type, rounded once to nearest
    even. bf16 is rounded by hand on the fp32 bit pattern (the interpreter's cast truncates; on a
    GPU the final cast is then exact and the integer ops are free in a memory-bound kernel)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536       # -65536 == 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _div_rn(a, b):
    """``a / b`` correctly rounded: in fp32 ``/`` is the fast, approximate division on a GPU."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    return a / b            # fp64: IEEE division


@triton.jit
def _sqrt_rn(x):
    """The correctly rounded square root: in fp32 ``tl.sqrt`` is the fast, approximate one."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)       # fp64: IEEE square root


def _f32(v: float) -> float:
    """``v`` rounded to the nearest fp32 (as a Python float); +-inf beyond the fp32 range."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _split(v: float, fp64: bool) -> Tuple[float, float, float]:
    """A host scalar as three fp32 kernel arguments ``(hi, mid, lo)``. ``hi`` is ``v`` rounded to
    fp32, what torch uses with an fp32 (or 16-bit) tensor, and all that fp32 maths gets. For fp64
    buffers ``mid`` and ``lo`` are the fp32 roundings of what is left, so that
    ``hi + mid + lo == v`` exactly (3 x 24 bits >= 53) for a normal double."""
    v = float(v)
    hi = _f32(v)
    if not fp64 or not math.isfinite(hi):
        return hi, 0.0, 0.0
    mid = _f32(v - hi)
    return hi, mid, _f32(v - hi - mid)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """Host-side checks only (no sync): one dtype, one device, contiguous, same length."""
    if ref.dtype not in _FLOATS:
        raise ValueError(f"triton backend: unsupported dtype {ref.dtype}")
    if not ref.is_contiguous():
        raise ValueError("triton backend: buffers must be contiguous")
    if not _INTERPRET and ref.device.type != "cuda":
        raise ValueError(f"triton backend: needs CUDA tensors (or TRITON_INTERPRET=1), got {ref.device}")
    for name, t in others.items():
        if t is None:
            continue
        if (t.dtype != ref.dtype or t.device != ref.device or t.numel() != ref.numel()
                or not t.is_contiguous()):
            raise ValueError(f"triton backend: {name} must be a contiguous {ref.dtype} buffer of "
                             f"{ref.numel()} elements on {ref.device}, got {t.dtype}, {t.numel()} "
                             f"elements on {t.device}")


def _device_ctx(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _block(n: int) -> int:
    """Elements per program for a buffer of ``n``: ``BLOCK`` on a GPU (one compiled variant);
    under the interpreter no larger than ``n`` needs (a program costs its block's width there)."""
    return min(BLOCK, max(16, triton.next_power_of_2(n))) if _INTERPRET else BLOCK


def _grid(n: int, block: int) -> Tuple[int]:
    return (triton.cdiv(n, block),)


def _stat_start(stat_start: int, n: int) -> int:
    """The first element of the statistics, with Python's slice meaning (``x[stat_start:]``)."""
    stat_start = int(stat_start)
    return max(n + stat_start, 0) if stat_start < 0 else stat_start


# --------------------------------------------------------------------------------------------
# segment_sumsq / segment_gram / segment_axpby: one program per (segment, block) writes its
# partial sums, then a per-segment reduction kernel sums them in a fixed order
# --------------------------------------------------------------------------------------------

_TABLES: "OrderedDict[tuple, Tuple[torch.Tensor, int]]" = OrderedDict()
_TABLES_MAX = 32


def _segment_table(bounds: Tuple[int, ...], n: int, block: int,
                   device: torch.device) -> Tuple[torch.Tensor, int]:
    """The block->segment table on ``device`` and the number of blocks, built on the host from
    the bounds list and copied without blocking; cached, since the layout rarely changes.

    Table (int64): first block of each segment [nseg + 1] | segment starts [nseg] |
    segment ends [nseg] | segment of each block [nblocks]."""
    key = (bounds, n, block, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    nseg = len(bounds) - 1
    # Python's slice meaning for x[bounds[i]:bounds[i+1]]: negative from the end, clamped to [0, n]
    b = torch.tensor([min(max(v + n if v < 0 else v, 0), n) for v in bounds], dtype=torch.int64)
    lengths = (b[1:] - b[:-1]).clamp_(min=0)          # a decreasing pair is an empty slice
    blocks = (lengths + (block - 1)) // block
    first = torch.zeros(nseg + 1, dtype=torch.int64)
    torch.cumsum(blocks, 0, out=first[1:])
    nblocks = int(first[-1])                           # host tensor: no device sync
    seg_of_block = torch.repeat_interleave(torch.arange(nseg, dtype=torch.int64), blocks)
    ends = torch.maximum(b[1:], b[:-1])                # a decreasing pair stays empty
    table_host = torch.cat([first, b[:-1], ends, seg_of_block])
    table = table_host.to(device, non_blocking=True)
    _TABLES[key] = (table, nblocks)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table, nblocks


def _segments(x: torch.Tensor, bounds: Sequence[int]) -> Tuple[int, Optional[torch.Tensor], int, int]:
    """(segments, table, blocks, block) of a segmented op on ``x``; no table when nothing is
    to be launched (no segment, or every segment empty)."""
    nseg = max(len(bounds) - 1, 0)
    if nseg == 0:
        return 0, None, 0, 0
    block = _block(x.numel())
    table, nblocks = _segment_table(tuple(int(v) for v in bounds), x.numel(), block, x.device)
    return nseg, (table if nblocks else None), nblocks, block


# what the partials kernel sums (constexpr KIND)
_SUMSQ, _SUMSQ_T, _GRAM = 0, 1, 2


@triton.jit
def _segment_partials_kernel(a_ptr, b_ptr, eta_hi, eta_mid, eta_lo, table_ptr, part_ptr, nseg, nblocks,
                             KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Partials (rows of ``nblocks``) of this program's (segment, block): sum a^2 (_SUMSQ);
    sum ((|b| + eta) a)^2 (_SUMSQ_T: ASAM's T g); sum a^2 | sum a b | sum b^2 (_GRAM)."""
    pid = tl.program_id(0)
    seg = tl.load(table_ptr + 3 * nseg + 1 + pid)
    first = tl.load(table_ptr + seg)
    start = tl.load(table_ptr + nseg + 1 + seg)
    end = tl.load(table_ptr + 2 * nseg + 1 + seg)
    offs = start + (pid - first) * BLOCK + tl.arange(0, BLOCK)     # int64: start is int64
    mask = offs < end
    a = tl.load(a_ptr + offs, mask=mask, other=0).to(ACC)
    if KIND == 2:
        b = tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)
        tl.store(part_ptr + pid, tl.sum(a * a, axis=0))
        tl.store(part_ptr + nblocks + pid, tl.sum(a * b, axis=0))
        tl.store(part_ptr + 2 * nblocks + pid, tl.sum(b * b, axis=0))
    else:
        if KIND == 1:
            eta = tl.cast(eta_hi, ACC) + tl.cast(eta_mid, ACC) + tl.cast(eta_lo, ACC)
            a = (tl.abs(tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)) + eta) * a
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, a * a, 0.0), axis=0))


@triton.jit
def _segment_reduce_kernel(part_ptr, table_ptr, out_ptr, nblocks, K: tl.constexpr, RBLOCK: tl.constexpr):
    """``out[seg, k]`` (``K`` per segment, in out's dtype) = the sum, in a fixed order, of row
    ``k`` of the partials (``K`` rows of ``nblocks``) over the segment's blocks."""
    seg = tl.program_id(0)
    lo = tl.load(table_ptr + seg)
    hi = tl.load(table_ptr + seg + 1)
    for k in tl.static_range(K):
        acc = tl.zeros([RBLOCK], dtype=part_ptr.dtype.element_ty)
        for s in range(lo, hi, RBLOCK):
            idx = s + tl.arange(0, RBLOCK)
            acc += tl.load(part_ptr + k * nblocks + idx, mask=idx < hi, other=0)
        tl.store(out_ptr + seg * K + k, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def _segment_sums(kernel, args, x: torch.Tensor, table: torch.Tensor, nseg: int, nblocks: int,
                  k: int, out_dtype: torch.dtype, **meta) -> torch.Tensor:
    """Launch ``kernel(*args, table, partials, nseg, nblocks)`` on every (segment, block), then the
    fixed-order reduction: the ``(nseg, k)`` sums in ``out_dtype``."""
    partials = torch.empty((k, nblocks), dtype=_acc_torch(x.dtype), device=x.device)
    out = torch.empty((nseg, k), dtype=out_dtype, device=x.device)
    with _device_ctx(x):
        kernel[(nblocks,)](*args, table, partials, nseg, nblocks, ACC=_acc(x.dtype), **meta, **_LAUNCH)
        _segment_reduce_kernel[(nseg,)](partials, table, out, nblocks, K=k, RBLOCK=RBLOCK, **_LAUNCH)
    return out


def segment_sumsq(x: torch.Tensor, bounds: Sequence[int],
                  weight: Optional[torch.Tensor] = None, eta: float = 0.0) -> torch.Tensor:
    """Per-segment sums of squares of ``x`` (of ``(|weight| + eta) * x`` when ``weight`` is
    given: ASAM's ``T g``), in fp32 (fp64 for fp64 buffers)."""
    _check(x, weight=weight)
    out = _acc_torch(x.dtype)
    nseg, table, nblocks, block = _segments(x, bounds)
    if table is None:                                   # no segment, all empty, or n == 0
        return torch.zeros(nseg, dtype=out, device=x.device)
    args = (x, x if weight is None else weight, *_split(eta, x.dtype == torch.float64))
    return _segment_sums(_segment_partials_kernel, args, x, table, nseg, nblocks, 1, out_dtype=out,
                         KIND=_SUMSQ if weight is None else _SUMSQ_T, BLOCK=block).view(nseg)


def segment_gram(a: torch.Tensor, b: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Per segment, the triple (sum a^2, sum a*b, sum b^2): shape ``(segments, 3)``; fp32, fp64
    for fp64 buffers."""
    _check(a, b=b)
    out = _acc_torch(a.dtype)
    nseg, table, nblocks, block = _segments(a, bounds)
    if table is None:
        return torch.zeros((nseg, 3), dtype=out, device=a.device)
    return _segment_sums(_segment_partials_kernel, (a, b, 0.0, 0.0, 0.0), a, table, nseg, nblocks, 3,
                         out_dtype=out, KIND=_GRAM, BLOCK=block)


@triton.jit
def _axpby_kernel(y_ptr, x_ptr, alpha_ptr, beta_ptr, table_ptr, part_ptr, nseg, nblocks,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``y <- alpha[seg] * y + beta[seg] * x`` on this program's (segment, block), and its
    partial sum of squares of the stored (rounded) ``y``."""
    pid = tl.program_id(0)
    seg = tl.load(table_ptr + 3 * nseg + 1 + pid)
    first = tl.load(table_ptr + seg)
    start = tl.load(table_ptr + nseg + 1 + seg)
    end = tl.load(table_ptr + 2 * nseg + 1 + seg)
    offs = start + (pid - first) * BLOCK + tl.arange(0, BLOCK)     # int64: start is int64
    mask = offs < end
    alpha = tl.load(alpha_ptr + seg).to(ACC)
    beta = tl.load(beta_ptr + seg).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    y = _rounded(alpha * y + beta * x, y_ptr)
    tl.store(y_ptr + offs, y, mask=mask)
    y = y.to(ACC)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, y * y, 0.0), axis=0))


def segment_axpby(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                  bounds: Sequence[int]) -> torch.Tensor:
    """Per segment s: ``y <- alpha[s] * y + beta[s] * x`` (``alpha``, ``beta``: one value per
    segment on the buffers' device, in the maths dtype — fp32, fp64 for fp64 buffers — read by
    the kernel). Returns the per-segment sums of squares of the new ``y`` as stored, in the maths
    dtype.
    Segments must not overlap."""
    _check(y, x=x)
    nseg = max(len(bounds) - 1, 0)
    want = _acc_torch(y.dtype)
    for name, t in (("alpha", alpha), ("beta", beta)):
        if t.dtype != want or t.device != y.device or t.numel() != nseg:
            raise ValueError(f"segment_axpby: {name} must be {nseg} {want} values on {y.device}, got "
                             f"{t.numel()} {t.dtype} values on {t.device}")
    nseg, table, nblocks, block = _segments(y, bounds)
    if table is None:
        return torch.zeros(nseg, dtype=want, device=y.device)
    return _segment_sums(_axpby_kernel, (y, x, alpha.contiguous(), beta.contiguous()), y, table, nseg,
                         nblocks, 1, out_dtype=want, BLOCK=block).view(nseg)


# --------------------------------------------------------------------------------------------
# perturb: backup <- p; grad_keep <- g; p <- p + scale * T^2 * g, T = |p| + eta (adaptive)
# --------------------------------------------------------------------------------------------

@triton.jit
def _perturb_kernel(p_ptr, g_ptr, scale_ptr, backup_ptr, keep_ptr, n, eta_hi, eta_mid, eta_lo,
                    ADAPTIVE: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0)
    g_raw = tl.load(g_ptr + offs, mask=mask, other=0)
    tl.store(backup_ptr + offs, p_raw, mask=mask)                   # bit-exact copies
    if HAS_KEEP:
        tl.store(keep_ptr + offs, g_raw, mask=mask)
    w = p_raw.to(ACC)
    step = g_raw.to(ACC) * tl.load(scale_ptr).to(ACC)
    if ADAPTIVE:
        t = tl.abs(w) + (tl.cast(eta_hi, ACC) + tl.cast(eta_mid, ACC) + tl.cast(eta_lo, ACC))
        step = step * t
        step = step * t
    tl.store(p_ptr + offs, _rounded(w + step, p_ptr), mask=mask)


def perturb(param: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, backup: torch.Tensor,
            adaptive: bool, grad_keep: Optional[torch.Tensor] = None, eta: float = 0.0) -> None:
    """SAM/ASAM ascent (see ``reference.perturb``); ``scale`` (the maths dtype) is read on the
    device."""
    _check(param, grad=grad, backup=backup, grad_keep=grad_keep)
    check_scale(scale, param)
    n = param.numel()
    if n == 0:
        return
    block = _block(n)
    with _device_ctx(param):
        _perturb_kernel[_grid(n, block)](param, grad, scale, backup,
                                         backup if grad_keep is None else grad_keep, n,
                                         *_split(eta, param.dtype == torch.float64),
                                         ADAPTIVE=bool(adaptive), HAS_KEEP=grad_keep is not None,
                                         ACC=_acc(param.dtype), BLOCK=block, **_LAUNCH)


# --------------------------------------------------------------------------------------------
# restore_psf_stats: p <- backup; psf <- grad_sam - psf; partial (sum g^2, sum PSF^2) per block
# --------------------------------------------------------------------------------------------

@triton.jit
def _psf_and_stats(offs, mask, g_sam, psf_ptr, stat_start, ACC: tl.constexpr):
    """``psf <- g_sam - psf`` (psf held g) and this block's partial (sum g^2, sum PSF^2) over the
    elements at or after ``stat_start``; PSF^2 is taken of the stored (rounded) PSF."""
    g = tl.load(psf_ptr + offs, mask=mask, other=0).to(ACC)
    psf = _rounded(g_sam - g, psf_ptr)
    tl.store(psf_ptr + offs, psf, mask=mask)
    psf = psf.to(ACC)
    in_stats = mask & (offs >= stat_start)
    s_g = tl.sum(tl.where(in_stats, g * g, 0.0), axis=0)
    s_psf = tl.sum(tl.where(in_stats, psf * psf, 0.0), axis=0)
    return s_g, s_psf


@triton.jit
def _restore_kernel(p_ptr, backup_ptr, gs_ptr, psf_ptr, part_ptr, n, stat_start,
                    HAS_PSF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(p_ptr + offs, tl.load(backup_ptr + offs, mask=mask, other=0), mask=mask)
    if HAS_PSF:
        g_sam = tl.load(gs_ptr + offs, mask=mask, other=0).to(ACC)
        s_g, s_psf = _psf_and_stats(offs, mask, g_sam, psf_ptr, stat_start, ACC)
        tl.store(part_ptr + pid, s_g)
        tl.store(part_ptr + tl.num_programs(0) + pid, s_psf)


def _stats_scratch(n: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty((2, triton.cdiv(n, block)), dtype=_acc_torch(dtype), device=device)


def _reduce_stats(partials: torch.Tensor) -> torch.Tensor:
    return partials.sum(dim=1)       # fixed-order device reduction, no sync; in the maths dtype


def restore_psf_stats(param: torch.Tensor, backup: torch.Tensor, grad_sam: torch.Tensor,
                      psf: Optional[torch.Tensor], stat_start: int) -> Optional[torch.Tensor]:
    """``param <- backup``; with ``psf``: ``psf <- grad_sam - psf`` and the pair (maths dtype)
    (sum g^2, sum PSF^2) over ``[stat_start:]`` (see ``reference.restore_psf_stats``)."""
    _check(param, backup=backup, grad_sam=grad_sam, psf=psf)
    n = param.numel()
    if n == 0:
        return None if psf is None else torch.zeros(2, dtype=_acc_torch(param.dtype), device=param.device)
    block = _block(n)
    partials = _stats_scratch(n, block, param.dtype, param.device) if psf is not None else param
    with _device_ctx(param):
        _restore_kernel[_grid(n, block)](param, backup, grad_sam, param if psf is None else psf, partials,
                                         n, _stat_start(stat_start, n), HAS_PSF=psf is not None,
                                         ACC=_acc(param.dtype), BLOCK=block, **_LAUNCH)
    return None if psf is None else _reduce_stats(partials)


# --------------------------------------------------------------------------------------------
# reuse: grad <- grad + coeff * psf
# --------------------------------------------------------------------------------------------

@triton.jit
def _reuse_kernel(g_ptr, psf_ptr, n, coeff_hi, coeff_mid, coeff_lo,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    coeff = tl.cast(coeff_hi, ACC) + tl.cast(coeff_mid, ACC) + tl.cast(coeff_lo, ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
    psf = tl.load(psf_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(g_ptr + offs, _rounded(g + coeff * psf, g_ptr), mask=mask)


def reuse(grad: torch.Tensor, psf: torch.Tensor, coeff: float) -> None:
    """vSAM reuse (Eq. 17): ``grad <- grad + coeff * PSF``."""
    _check(grad, psf=psf)
    n = grad.numel()
    if n == 0:
        return
    block = _block(n)
    with _device_ctx(grad):
        _reuse_kernel[_grid(n, block)](grad, psf, n, *_split(coeff, grad.dtype == torch.float64),
                                       ACC=_acc(grad.dtype), BLOCK=block, **_LAUNCH)


# --------------------------------------------------------------------------------------------
# the fused base steps: one pass = (restore + PSF + statistics | reuse | plain) + SGD/AdamW
# --------------------------------------------------------------------------------------------

# MODE (constexpr) of the fused steps, chosen on the host from which buffers are given
_PLAIN, _REUSE, _RESTORE, _RESTORE_PSF = 0, 1, 2, 3


def _mode(psf, backup, coeff: float) -> int:
    if backup is not None:
        return _RESTORE_PSF if psf is not None else _RESTORE
    return _REUSE if psf is not None and coeff != 0.0 else _PLAIN


@triton.jit
def _final_grad(offs, mask, p_ptr, g_ptr, psf_ptr, backup_ptr, coeff, stat_start,
                MODE: tl.constexpr, MAXIMIZE: tl.constexpr, ACC: tl.constexpr):
    """(weights, final gradient, partial sum g^2, partial sum PSF^2) of one block, as in
    ``reference._final_grad``: in restore modes the weights come from ``backup`` (the caller
    stores the stepped weights into ``param``) and the gradient is ``grad`` (= g_sam); in reuse
    mode it is ``grad + coeff * psf``. The grad buffer is never written."""
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
    s_g = 0.0
    s_psf = 0.0
    if MODE >= 2:                                         # _RESTORE, _RESTORE_PSF
        w = tl.load(backup_ptr + offs, mask=mask, other=0).to(ACC)
        if MODE == 3:
            s_g, s_psf = _psf_and_stats(offs, mask, g, psf_ptr, stat_start, ACC)
        d = g
    else:
        w = tl.load(p_ptr + offs, mask=mask, other=0).to(ACC)
        if MODE == 1:
            d = g + coeff * tl.load(psf_ptr + offs, mask=mask, other=0).to(ACC)
        else:
            d = g
    if MAXIMIZE:
        d = -d
    return w, d, s_g, s_psf


@triton.jit
def _sgd_kernel(p_ptr, g_ptr, buf_ptr, psf_ptr, backup_ptr, part_ptr, n, stat_start,
                coeff_hi, coeff_mid, coeff_lo, lr_hi, lr_mid, lr_lo, wd_hi, wd_mid, wd_lo,
                mom_hi, mom_mid, mom_lo, damp_hi, damp_mid, damp_lo,
                MODE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    coeff = tl.cast(coeff_hi, ACC) + tl.cast(coeff_mid, ACC) + tl.cast(coeff_lo, ACC)
    lr = tl.cast(lr_hi, ACC) + tl.cast(lr_mid, ACC) + tl.cast(lr_lo, ACC)
    weight_decay = tl.cast(wd_hi, ACC) + tl.cast(wd_mid, ACC) + tl.cast(wd_lo, ACC)
    momentum = tl.cast(mom_hi, ACC) + tl.cast(mom_mid, ACC) + tl.cast(mom_lo, ACC)
    one_minus_dampening = tl.cast(damp_hi, ACC) + tl.cast(damp_mid, ACC) + tl.cast(damp_lo, ACC)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w, d, s_g, s_psf = _final_grad(offs, mask, p_ptr, g_ptr, psf_ptr, backup_ptr, coeff, stat_start,
                                   MODE, MAXIMIZE, ACC)
    if MODE == 3:
        tl.store(part_ptr + pid, s_g)
        tl.store(part_ptr + tl.num_programs(0) + pid, s_psf)
    if WEIGHT_DECAY:
        d = d + weight_decay * w
    if MOMENTUM:
        if FIRST:
            buf = d
        else:
            buf = momentum * tl.load(buf_ptr + offs, mask=mask, other=0).to(ACC) + one_minus_dampening * d
        tl.store(buf_ptr + offs, _rounded(buf, buf_ptr), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(p_ptr + offs, _rounded(w - lr * d, p_ptr), mask=mask)


def sgd_step(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor],
             psf: Optional[torch.Tensor], backup: Optional[torch.Tensor], coeff: float, stat_start: int,
             lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first: bool) -> Optional[torch.Tensor]:
    """torch.optim.SGD's step fused with the restore or the reuse, one pass (see
    ``reference.sgd_step``). Returns the statistics pair in restore mode with ``psf``."""
    coeff, momentum = float(coeff), float(momentum)
    has_momentum = momentum != 0.0
    if has_momentum and momentum_buffer is None:
        raise ValueError("sgd_step: momentum != 0 needs a momentum_buffer")
    _check(param, grad=grad, momentum_buffer=momentum_buffer if has_momentum else None, psf=psf,
           backup=backup)
    mode = _mode(psf, backup, coeff)
    n = param.numel()
    if n == 0:
        return torch.zeros(2, dtype=_acc_torch(param.dtype), device=param.device) if mode == _RESTORE_PSF else None
    block = _block(n)
    partials = _stats_scratch(n, block, param.dtype, param.device) if mode == _RESTORE_PSF else param
    wide = param.dtype == torch.float64
    with _device_ctx(param):
        _sgd_kernel[_grid(n, block)](
            param, grad, momentum_buffer if has_momentum else param, param if psf is None else psf,
            param if backup is None else backup, partials, n, _stat_start(stat_start, n),
            *_split(coeff, wide), *_split(lr, wide), *_split(weight_decay, wide), *_split(momentum, wide),
            *_split(1.0 - float(dampening), wide),
            MODE=mode, WEIGHT_DECAY=weight_decay != 0.0, MOMENTUM=has_momentum, NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize), FIRST=bool(first), ACC=_acc(param.dtype), BLOCK=block,
            **_LAUNCH)
    return _reduce_stats(partials) if mode == _RESTORE_PSF else None


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, psf_ptr, backup_ptr, part_ptr, n, stat_start,
                  coeff_hi, coeff_mid, coeff_lo, decay_hi, decay_mid, decay_lo, b1c_hi, b1c_mid, b1c_lo,
                  beta2_hi, beta2_mid, beta2_lo, b2c_hi, b2c_mid, b2c_lo,
                  step_size_hi, step_size_mid, step_size_lo, bc2_sqrt_hi, bc2_sqrt_mid, bc2_sqrt_lo,
                  eps_hi, eps_mid, eps_lo,
                  MODE: tl.constexpr, MAXIMIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    coeff = tl.cast(coeff_hi, ACC) + tl.cast(coeff_mid, ACC) + tl.cast(coeff_lo, ACC)
    decay = tl.cast(decay_hi, ACC) + tl.cast(decay_mid, ACC) + tl.cast(decay_lo, ACC)     # 1 - lr * wd
    one_minus_beta1 = tl.cast(b1c_hi, ACC) + tl.cast(b1c_mid, ACC) + tl.cast(b1c_lo, ACC)
    beta2 = tl.cast(beta2_hi, ACC) + tl.cast(beta2_mid, ACC) + tl.cast(beta2_lo, ACC)
    one_minus_beta2 = tl.cast(b2c_hi, ACC) + tl.cast(b2c_mid, ACC) + tl.cast(b2c_lo, ACC)
    step_size = tl.cast(step_size_hi, ACC) + tl.cast(step_size_mid, ACC) + tl.cast(step_size_lo, ACC)
    bc2_sqrt = tl.cast(bc2_sqrt_hi, ACC) + tl.cast(bc2_sqrt_mid, ACC) + tl.cast(bc2_sqrt_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_mid, ACC) + tl.cast(eps_lo, ACC)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w, d, s_g, s_psf = _final_grad(offs, mask, p_ptr, g_ptr, psf_ptr, backup_ptr, coeff, stat_start,
                                   MODE, MAXIMIZE, ACC)
    if MODE == 3:
        tl.store(part_ptr + pid, s_g)
        tl.store(part_ptr + tl.num_programs(0) + pid, s_psf)
    w = w * decay                                                           # decoupled weight decay
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(ACC)
    m = m + one_minus_beta1 * (d - m)                                       # torch's lerp
    v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
    v = beta2 * v + one_minus_beta2 * d * d
    tl.store(m_ptr + offs, _rounded(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, _rounded(v, v_ptr), mask=mask)
    denom = _div_rn(_sqrt_rn(v), bc2_sqrt) + eps
    tl.store(p_ptr + offs, _rounded(w - _div_rn(step_size * m, denom), p_ptr), mask=mask)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               psf: Optional[torch.Tensor], backup: Optional[torch.Tensor], coeff: float, stat_start: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               maximize: bool) -> Optional[torch.Tensor]:
    """torch.optim.AdamW's step (no amsgrad) fused with the restore or the reuse, one pass (see
    ``reference.adamw_step``); ``step`` counts this step (1 on the first)."""
    coeff, lr, beta1, beta2 = float(coeff), float(lr), float(beta1), float(beta2)
    _check(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, psf=psf, backup=backup)
    mode = _mode(psf, backup, coeff)
    n = param.numel()
    if n == 0:
        return torch.zeros(2, dtype=_acc_torch(param.dtype), device=param.device) if mode == _RESTORE_PSF else None
    block = _block(n)
    # every scalar on the host, in Python floats, as the reference computes them
    decay = 1.0 - lr * float(weight_decay)
    step_size = lr / (1.0 - beta1 ** step)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    partials = _stats_scratch(n, block, param.dtype, param.device) if mode == _RESTORE_PSF else param
    wide = param.dtype == torch.float64
    with _device_ctx(param):
        _adamw_kernel[_grid(n, block)](
            param, grad, exp_avg, exp_avg_sq, param if psf is None else psf,
            param if backup is None else backup, partials, n, _stat_start(stat_start, n),
            *_split(coeff, wide), *_split(decay, wide), *_split(1.0 - beta1, wide), *_split(beta2, wide),
            *_split(1.0 - beta2, wide), *_split(step_size, wide), *_split(bc2_sqrt, wide), *_split(eps, wide),
            MODE=mode, MAXIMIZE=bool(maximize), ACC=_acc(param.dtype), BLOCK=block, **_LAUNCH)
    return _reduce_stats(partials) if mode == _RESTORE_PSF else None
