"""The Triton backend: every fused op as one Triton kernel pass over the flat buffers.

Same functions, signatures and results as ``reference`` (the oracle). Runs on CUDA tensors, and
on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before this module is
imported), which is how it is tested on machines without a GPU.

Every op also has its list form (``<op>_list``, the signatures of ``lists.per_tensor``: each tensor
viewed 1-D, each tensor one segment of the segment ops, the statistics over the tensors of index
>= ``stat_first``), multi-tensor-apply style: one launch per op over all the tensors (FSDP2's
local shards, the base optimizer's state), not one per tensor. The list form is the same kernel
as the flat op (a constexpr ``LIST`` prologue, or for the segment ops the same table), so both
give the same bits. See "segment tables" below.

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
* ``scalars`` (``reuse``, ``sgd_step``, ``adamw_step`` and their list forms; see
  ``vsam_ext.ops.scalars``): an optional float64 device tensor whose values replace the host
  scalars derived from the float arguments (coeff, lr; AdamW's decay, step size and bias
  correction), for a CUDA-graph capture. The kernel (constexpr ``HAS_SCALARS``) loads them once
  per program and casts them to the maths dtype, one rounding to nearest as ``_split``'s ``hi``
  (fp32) or the exact double (fp64): the same values as from the float arguments. The float
  arguments still choose the kernel (the mode from ``coeff != 0``).
* Statistics and sums of squares are deterministic: each program writes its partial sums to a
  scratch tensor, which is then reduced in a fixed order (torch ``.sum`` on the device, or the
  per-segment reduction kernel). No float atomics. A program's partial sum is ``tl.sum`` over
  its block in the kernel's one layout (16 bytes of elements per thread, on the fast and the
  masked path, flat or list: see "The element-wise ops" below), so the same values give the
  same bits in a flat buffer and in a list of tensors.
* List ops: the tensors' addresses (``data_ptr()``) go to the kernel in an int64 device table
  with the block->tensor map, uploaded in one copy (pinned, non-blocking on CUDA) and cached by
  addresses and sizes (LRU): the same tensors come back every step. Checks of the lists (lengths,
  numels, dtype, device, contiguity) are on the host, before anything is launched.
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
from .scalars import check_scalars

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001  (a broken install raises more than ImportError)
    raise ImportError(f"triton is not importable: {exc}") from exc

__all__ = ["usable", "segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse",
           "sgd_step", "adamw_step", "segment_sumsq_list", "segment_gram_list", "segment_axpby_list",
           "perturb_list", "restore_psf_stats_list", "reuse_list", "sgd_step_list", "adamw_step_list"]

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
# segment tables: which (segment, block) each program works on, and every segment's address
# --------------------------------------------------------------------------------------------

# Layout of a table (one int64 tensor on the buffers' device, written in one host->device copy):
#   first block of each segment [nseg + 1] | numel of each segment [nseg] |
#   segment of each block [nblocks] | address of each segment, operand by operand [K x nseg]
# A segment is a tensor of a list op, or a slice of a flat buffer (the flat segment ops). A
# kernel reads the addresses as int64 and casts them to pointers of its arguments' element type
# (``tl.load(...).to(x_ptr.dtype)``: inttoptr on a GPU; under the interpreter, whose pointers
# are host addresses held as uint64, a bitcast). Empty segments get no block.
_TABLES: "OrderedDict[tuple, Tuple[Optional[torch.Tensor], int]]" = OrderedDict()
_TABLES_MAX = 64


def _table(key: tuple, layout, block: int, device: torch.device) -> Tuple[Optional[torch.Tensor], int]:
    """(table, number of blocks) for ``key``; ``layout()`` gives (numels, addresses: K x nseg
    flattened) when it is not cached. No table when there is no block. LRU-cached: the same
    tensors come back every step, so the table is built and uploaded once."""
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        _keep_if_captured(hit[0], device)
        return hit
    numels, addrs = layout()
    lengths = torch.tensor(numels, dtype=torch.int64)
    blocks = (lengths + (block - 1)) // block
    first = torch.zeros(len(numels) + 1, dtype=torch.int64)
    torch.cumsum(blocks, 0, out=first[1:])
    nblocks = int(first[-1])                           # host tensor: no device sync
    table = None
    if nblocks:
        seg_of_block = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), blocks)
        host = torch.cat([first, lengths, seg_of_block, torch.tensor(addrs, dtype=torch.int64)])
        if device.type == "cuda":                      # pinned: the copy does not block the host
            pinned = host.pin_memory()
            table = pinned.to(device, non_blocking=True)
            _keep_if_captured(pinned, device)
        else:
            table = host
    _TABLES[key] = (table, nblocks)
    _keep_if_captured(table, device)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table, nblocks


# Tables a CUDA graph capture used: the graph reads them (and copies from their pinned host side)
# at every replay, so the LRU above must not free them; kept for the process's life (captures are rare).
_CAPTURED: list = []


def _keep_if_captured(t: Optional[torch.Tensor], device: torch.device) -> None:
    if t is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED.append(t)


def _table_device(device: torch.device) -> None:
    if _INTERPRET and device.type != "cpu":
        # the interpreter runs a kernel on host copies of its tensor arguments: the addresses in
        # a table must be host memory, those of CPU tensors
        raise ValueError(f"triton backend: under TRITON_INTERPRET=1 the list ops and the segment ops need CPU "
                         f"tensors (their addresses are read on the host), got {device}")


def _list_table(operands: Sequence[Sequence[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], int, int]:
    """(table, blocks, block) of a list op over ``operands`` (K lists of one length, the first
    one's numels for all), keyed by every tensor's address and the numels."""
    ref = operands[0]
    _table_device(ref[0].device)
    numels = tuple(t.numel() for t in ref)
    addrs = tuple(t.data_ptr() for ts in operands for t in ts)
    block = _block(max(numels, default=0))
    device = ref[0].device
    table, nblocks = _table(("list", block, str(device), numels, addrs), lambda: (numels, addrs), block, device)
    return table, nblocks, block


def _flat_table(bufs: Sequence[torch.Tensor], bounds: Sequence[int]) -> Tuple[Optional[torch.Tensor], int, int]:
    """(table, blocks, block) of a flat segment op: segment i of buffer k is
    ``bufs[k][bounds[i]:bounds[i+1]]`` with Python's slice meaning (negative from the end,
    clamped, a decreasing pair empty), as in the reference."""
    x = bufs[0]
    _table_device(x.device)
    n, size = x.numel(), x.element_size()
    # The key holds the bounds as given: a new list of ints every step (the optimizer's), so the
    # tuple is built and hashed in C; converting each value first (int(v) in a generator) cost
    # ~0.1-0.2 ms per call at 1024 segments, more than the kernels at 64 M parameters. Values
    # that compare and hash equal to the ints (numpy integers) find the same entry; the layout
    # converts them.
    bounds = tuple(bounds)
    bases = tuple(b.data_ptr() for b in bufs)
    block = _block(n)

    def layout():
        cuts = [int(v) for v in bounds]
        starts, numels = [], []
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo, hi, _ = slice(a, b).indices(n)
            starts.append(lo)
            numels.append(max(hi - lo, 0))
        return numels, [base + s * size for base in bases for s in starts]

    table, nblocks = _table(("flat", block, str(x.device), n, size, bounds, bases), layout, block, x.device)
    return table, nblocks, block


# --------------------------------------------------------------------------------------------
# list arguments
# --------------------------------------------------------------------------------------------

def _as_list(name: str, ts) -> list:
    if not isinstance(ts, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in ts):
        raise TypeError(f"triton backend: {name} must be a list of tensors, got {type(ts).__name__}"
                        + ("" if not isinstance(ts, (list, tuple)) else " holding "
                           + ", ".join(sorted({type(t).__name__ for t in ts if not isinstance(t, torch.Tensor)}))))
    return list(ts)


def _check_lists(ref_name: str, ref, optional: Tuple[str, ...] = (), **others) -> Optional[torch.Tensor]:
    """Host-side checks of a list op's tensor lists (no sync, before anything is written): lists of
    tensors (None only for the names in ``optional``) of one length; every tensor contiguous, of
    one float dtype and one device (CUDA, or any under the interpreter); tensor i of each list as
    many elements as ``ref[i]``. Returns ``ref[0]`` (None for empty lists)."""
    ref = _as_list(ref_name, ref)
    lists = [(ref_name, ref)]
    for name, ts in others.items():
        if ts is None:
            if name not in optional:
                raise TypeError(f"triton backend: {name} must be a list of tensors, got None")
            continue
        ts = _as_list(name, ts)
        if len(ts) != len(ref):
            raise ValueError(f"triton backend: {name} has {len(ts)} tensors, {ref_name} has {len(ref)}")
        lists.append((name, ts))
    if not ref:
        return None
    t0 = ref[0]
    dtype, device = t0.dtype, t0.device
    if dtype not in _FLOATS:
        raise ValueError(f"triton backend: {ref_name}[0] has unsupported dtype {dtype}")
    if not _INTERPRET and device.type != "cuda":
        raise ValueError(f"triton backend: needs CUDA tensors (or TRITON_INTERPRET=1), got {ref_name}[0] on {device}")
    numels = [t.numel() for t in ref]
    for name, ts in lists:
        for i, t in enumerate(ts):
            if t.dtype != dtype or t.device != device:
                raise ValueError(f"triton backend: {name}[{i}] is {t.dtype} on {t.device}, but {ref_name}[0] is "
                                 f"{dtype} on {device}: one dtype and one device for all tensors")
            if t.numel() != numels[i]:
                raise ValueError(f"triton backend: {name}[{i}] has {t.numel()} elements, {ref_name}[{i}] has "
                                 f"{numels[i]}")
            if not t.is_contiguous():
                raise ValueError(f"triton backend: {name}[{i}] must be contiguous")
    return t0


def _check_coeffs(t0: torch.Tensor, nseg: int, op: str, **coeffs: torch.Tensor) -> None:
    want = _acc_torch(t0.dtype)
    for name, t in coeffs.items():
        if not isinstance(t, torch.Tensor) or t.dtype != want or t.device != t0.device or t.numel() != nseg:
            got = (f"{t.numel()} {t.dtype} values on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{op}: {name} must be {nseg} {want} values on {t0.device}, got {got}")


def _empty_sums(nseg: int, like: Optional[torch.Tensor], width: Optional[int] = None) -> torch.Tensor:
    """Zero sums: in ``like``'s maths dtype on its device; fp32 on the CPU for an empty list
    (``lists.per_tensor``'s answer)."""
    shape = (nseg,) if width is None else (nseg, width)
    if like is None:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.zeros(shape, dtype=_acc_torch(like.dtype), device=like.device)


# --------------------------------------------------------------------------------------------
# segment_sumsq / segment_gram / segment_axpby: one program per (segment, block) writes its
# partial sums, then a per-segment reduction kernel sums them in a fixed order. The flat ops'
# segments are slices of the buffers, the list ops' the tensors: one table layout, one kernel.
# --------------------------------------------------------------------------------------------

# what the partials kernel sums (constexpr KIND)
_SUMSQ, _SUMSQ_T, _GRAM = 0, 1, 2


@triton.jit
def _partials_tile(a_ptr, b_ptr, part_ptr, pid, nblocks, offs, mask, eta, KIND: tl.constexpr, ACC: tl.constexpr):
    """The partials of one (segment, block): every load first, the sums, their stores."""
    a = tl.load(a_ptr + offs, mask=mask, other=0).to(ACC)
    if KIND != 0:
        b = tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)
    if KIND == 2:
        tl.store(part_ptr + pid, tl.sum(a * a, axis=0))
        tl.store(part_ptr + nblocks + pid, tl.sum(a * b, axis=0))
        tl.store(part_ptr + 2 * nblocks + pid, tl.sum(b * b, axis=0))
    else:
        if KIND == 1:
            a = (tl.abs(b) + eta) * a
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, a * a, 0.0), axis=0))


@triton.jit
def _segment_partials_kernel(a_ptr, b_ptr, eta_hi, eta_mid, eta_lo, table_ptr, part_ptr, nseg, nblocks,
                             KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Partials (rows of ``nblocks``) of this program's (segment, block): sum a^2 (_SUMSQ);
    sum ((|b| + eta) a)^2 (_SUMSQ_T: ASAM's T g); sum a^2 | sum a b | sum b^2 (_GRAM).
    ``a_ptr``/``b_ptr`` give the element type; the segment's addresses come from the table.

    A block that lies wholly in its segment, at 16-byte aligned addresses, takes the fast path:
    its pointers carry that alignment (``tl.multiple_of``) and its mask is a constant true, so
    its loads are 128-bit (the table's addresses alone tell the compiler nothing, and every load
    was 32-bit). Other blocks take the masked path with the same code. Both paths share the
    offsets, so the compiler gives them one layout (16 bytes of elements per thread, as the flat
    kernels have): a block's sum is the same tree, in the same order, on either path and for a
    segment of a flat buffer or a tensor of a list."""
    pid = tl.program_id(0)
    seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
    n = tl.load(table_ptr + nseg + 1 + seg)
    start = (pid - tl.load(table_ptr + seg)) * BLOCK                   # int64: seg is int64
    offs = start + tl.arange(0, BLOCK)
    addr = table_ptr + 2 * nseg + 1 + nblocks + seg
    a_addr = tl.load(addr)
    b_addr = a_addr
    if KIND != 0:
        b_addr = tl.load(addr + nseg)
    eta = tl.cast(eta_hi, ACC) + tl.cast(eta_mid, ACC) + tl.cast(eta_lo, ACC)
    a_ptr = a_addr.to(a_ptr.dtype)
    b_ptr = b_addr.to(b_ptr.dtype)
    if (((a_addr | b_addr) & 15) == 0) & (start + BLOCK <= n):
        _partials_tile(tl.multiple_of(a_ptr, 16), tl.multiple_of(b_ptr, 16), part_ptr, pid, nblocks, offs,
                       tl.full([BLOCK], 1, tl.int1), eta, KIND, ACC)
    else:
        _partials_tile(a_ptr, b_ptr, part_ptr, pid, nblocks, offs, offs < n, eta, KIND, ACC)


@triton.jit
def _segment_reduce_kernel(part_ptr, table_ptr, out_ptr, nblocks, K: tl.constexpr, RBLOCK: tl.constexpr):
    """``out[seg, k]`` (``K`` per segment, in out's dtype) = the sum, in a fixed order, of row
    ``k`` of the partials (``K`` rows of ``nblocks``) over the segment's blocks: lane ``r`` of
    ``acc`` adds the segment's partials ``r``, ``r + RBLOCK``, ``r + 2 RBLOCK``, ... one after
    the other, then ``tl.sum(acc)``. Each step loads four rows of ``RBLOCK`` before it adds
    them, in that order (a one-segment sum of a 64 M buffer reads 32 K partials: with one row
    per step, 32 round trips to L2 one after the other); the masked loads past the end add
    +0.0, which leaves every sum as it was (``acc`` starts at +0.0 and is never -0.0)."""
    seg = tl.program_id(0)
    lo = tl.load(table_ptr + seg)
    hi = tl.load(table_ptr + seg + 1)
    for k in tl.static_range(K):
        row = part_ptr + k * nblocks
        acc = tl.zeros([RBLOCK], dtype=part_ptr.dtype.element_ty)
        for s in range(lo, hi, 4 * RBLOCK):
            i0 = s + tl.arange(0, RBLOCK)
            i1 = i0 + RBLOCK
            i2 = i1 + RBLOCK
            i3 = i2 + RBLOCK
            x0 = tl.load(row + i0, mask=i0 < hi, other=0)
            x1 = tl.load(row + i1, mask=i1 < hi, other=0)
            x2 = tl.load(row + i2, mask=i2 < hi, other=0)
            x3 = tl.load(row + i3, mask=i3 < hi, other=0)
            acc += x0
            acc += x1
            acc += x2
            acc += x3
        tl.store(out_ptr + seg * K + k, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def _segment_sums(kernel, args, x: torch.Tensor, table: torch.Tensor, nseg: int, nblocks: int,
                  k: int, **meta) -> torch.Tensor:
    """Launch ``kernel(*args, table, partials, nseg, nblocks)`` on every (segment, block), then the
    fixed-order reduction: the ``(nseg, k)`` sums in the maths dtype."""
    partials = torch.empty((k, nblocks), dtype=_acc_torch(x.dtype), device=x.device)
    out = torch.empty((nseg, k), dtype=_acc_torch(x.dtype), device=x.device)
    with _device_ctx(x):
        kernel[(nblocks,)](*args, table, partials, nseg, nblocks, ACC=_acc(x.dtype), **meta, **_LAUNCH)
        _segment_reduce_kernel[(nseg,)](partials, table, out, nblocks, K=k, RBLOCK=RBLOCK, **_LAUNCH)
    return out


def _sumsq(x: torch.Tensor, weight: Optional[torch.Tensor], eta: float, nseg: int, table, nblocks: int,
           block: int) -> torch.Tensor:
    if table is None:                                   # no segment, or all of them empty
        return torch.zeros(nseg, dtype=_acc_torch(x.dtype), device=x.device)
    args = (x, x if weight is None else weight, *_split(eta, x.dtype == torch.float64))
    return _segment_sums(_segment_partials_kernel, args, x, table, nseg, nblocks, 1,
                         KIND=_SUMSQ if weight is None else _SUMSQ_T, BLOCK=block).view(nseg)


def segment_sumsq(x: torch.Tensor, bounds: Sequence[int],
                  weight: Optional[torch.Tensor] = None, eta: float = 0.0) -> torch.Tensor:
    """Per-segment sums of squares of ``x`` (of ``(|weight| + eta) * x`` when ``weight`` is
    given: ASAM's ``T g``), in fp32 (fp64 for fp64 buffers)."""
    _check(x, weight=weight)
    nseg = max(len(bounds) - 1, 0)
    table, nblocks, block = _flat_table((x, x if weight is None else weight), bounds)
    return _sumsq(x, weight, eta, nseg, table, nblocks, block)


def segment_sumsq_list(xs: Sequence[torch.Tensor], weights: Optional[Sequence[torch.Tensor]] = None,
                       eta: float = 0.0) -> torch.Tensor:
    """``segment_sumsq`` with each tensor of ``xs`` one segment: shape ``(len(xs),)``."""
    x0 = _check_lists("xs", xs, ("weights",), weights=weights)
    if x0 is None:
        return _empty_sums(0, None)
    table, nblocks, block = _list_table((xs, xs if weights is None else weights))
    return _sumsq(x0, None if weights is None else weights[0], eta, len(xs), table, nblocks, block)


def _gram(a: torch.Tensor, b: torch.Tensor, nseg: int, table, nblocks: int, block: int) -> torch.Tensor:
    if table is None:
        return torch.zeros((nseg, 3), dtype=_acc_torch(a.dtype), device=a.device)
    return _segment_sums(_segment_partials_kernel, (a, b, 0.0, 0.0, 0.0), a, table, nseg, nblocks, 3,
                         KIND=_GRAM, BLOCK=block)


def segment_gram(a: torch.Tensor, b: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Per segment, the triple (sum a^2, sum a*b, sum b^2): shape ``(segments, 3)``; fp32, fp64
    for fp64 buffers."""
    _check(a, b=b)
    table, nblocks, block = _flat_table((a, b), bounds)
    return _gram(a, b, max(len(bounds) - 1, 0), table, nblocks, block)


def segment_gram_list(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``segment_gram`` with each pair of tensors one segment: shape ``(len(a), 3)``."""
    a0 = _check_lists("a", a, b=b)
    if a0 is None:
        return _empty_sums(0, None, 3)
    table, nblocks, block = _list_table((a, b))
    return _gram(a0, b[0], len(a), table, nblocks, block)


@triton.jit
def _axpby_tile(y_ptr, x_ptr, part_ptr, pid, offs, mask, alpha, beta, ACC: tl.constexpr):
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    y = _rounded(alpha * y + beta * x, y_ptr)
    tl.store(y_ptr + offs, y, mask=mask)
    y = y.to(ACC)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, y * y, 0.0), axis=0))


@triton.jit
def _axpby_kernel(y_ptr, x_ptr, alpha_ptr, beta_ptr, table_ptr, part_ptr, nseg, nblocks,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``y <- alpha[seg] * y + beta[seg] * x`` on this program's (segment, block), and its
    partial sum of squares of the stored (rounded) ``y``. Fast and masked paths as in
    ``_segment_partials_kernel``."""
    pid = tl.program_id(0)
    seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
    n = tl.load(table_ptr + nseg + 1 + seg)
    start = (pid - tl.load(table_ptr + seg)) * BLOCK                   # int64: seg is int64
    offs = start + tl.arange(0, BLOCK)
    addr = table_ptr + 2 * nseg + 1 + nblocks + seg
    y_addr = tl.load(addr)
    x_addr = tl.load(addr + nseg)
    alpha = tl.load(alpha_ptr + seg).to(ACC)
    beta = tl.load(beta_ptr + seg).to(ACC)
    y_ptr = y_addr.to(y_ptr.dtype)
    x_ptr = x_addr.to(x_ptr.dtype)
    if (((y_addr | x_addr) & 15) == 0) & (start + BLOCK <= n):
        _axpby_tile(tl.multiple_of(y_ptr, 16), tl.multiple_of(x_ptr, 16), part_ptr, pid, offs, tl.full([BLOCK], 1, tl.int1),
                    alpha, beta, ACC)
    else:
        _axpby_tile(y_ptr, x_ptr, part_ptr, pid, offs, offs < n, alpha, beta, ACC)


def _axpby(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, nseg: int, table,
           nblocks: int, block: int) -> torch.Tensor:
    if table is None:
        return torch.zeros(nseg, dtype=_acc_torch(y.dtype), device=y.device)
    return _segment_sums(_axpby_kernel, (y, x, alpha.contiguous(), beta.contiguous()), y, table, nseg,
                         nblocks, 1, BLOCK=block).view(nseg)


def segment_axpby(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                  bounds: Sequence[int]) -> torch.Tensor:
    """Per segment s: ``y <- alpha[s] * y + beta[s] * x`` (``alpha``, ``beta``: one value per
    segment on the buffers' device, in the maths dtype — fp32, fp64 for fp64 buffers — read by
    the kernel). Returns the per-segment sums of squares of the new ``y`` as stored, in the maths
    dtype.
    Segments must not overlap."""
    _check(y, x=x)
    nseg = max(len(bounds) - 1, 0)
    _check_coeffs(y, nseg, "segment_axpby", alpha=alpha, beta=beta)
    table, nblocks, block = _flat_table((y, x), bounds)
    return _axpby(y, x, alpha, beta, nseg, table, nblocks, block)


def segment_axpby_list(ys: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], alpha: torch.Tensor,
                       beta: torch.Tensor) -> torch.Tensor:
    """``segment_axpby`` with each pair of tensors one segment (``alpha``, ``beta``: one value per
    tensor, device tensors in the maths dtype). The tensors of ``ys`` must not overlap."""
    y0 = _check_lists("ys", ys, xs=xs)
    if y0 is None:
        return _empty_sums(0, None)
    _check_coeffs(y0, len(ys), "segment_axpby_list", alpha=alpha, beta=beta)
    table, nblocks, block = _list_table((ys, xs))
    return _axpby(y0, xs[0], alpha, beta, len(ys), table, nblocks, block)


# --------------------------------------------------------------------------------------------
# The element-wise ops below: one kernel each, for a flat buffer (LIST=False: one contiguous
# range of ``n`` elements from the pointer arguments) or for lists (LIST=True: the pointer
# arguments only give the element types; each program reads its tensor, the tensor's numel and
# every operand's address from the table, and ``stat_start`` is ``stat_first``, a tensor
# index). The maths after that prologue is the same code (a ``_*_tile`` helper), so flat and
# list give the same bits.
#
# Each kernel calls its tile on one of two paths, with the same code and the same offsets (so
# the compiler gives both one layout, 16 bytes of elements per thread, and a block's statistics
# are the same tree on either): a block that lies wholly in its buffer (list: at 16-byte aligned
# addresses, which the pointers then carry by ``tl.multiple_of``) passes a constant all-true
# mask, so its accesses are 128-bit; the last, partial block (and a list tensor at an unaligned
# address) passes ``offs < n``. (A fast-path mask computed from the offsets, such as
# ``offs < start + BLOCK``, is no good: the two paths then differ only in an operand, and
# MLIR's block merging folds them into the masked one before the lowering.) Without the fast
# path every access of a flat kernel was 32-bit whenever ``n`` is not a multiple of 16 (Triton
# specializes an integer argument on divisibility by 16 only): ResNet-50's 25,557,032
# parameters are 8 more than one; and every access of a list kernel was 32-bit.
#
# A tile issues every load before its first store or reduction: a ``tl.sum`` is a barrier of
# the whole program, and a load placed after it (the momentum buffer after the statistics)
# waited for it, a second round trip to memory per block.
# --------------------------------------------------------------------------------------------

def _stat_first(stat_first: int, nseg: int) -> int:
    """The first tensor of the statistics (``lists.per_tensor``'s ``i >= stat_first``)."""
    return min(max(int(stat_first), 0), nseg)


# --------------------------------------------------------------------------------------------
# perturb: backup <- p; grad_keep <- g; p <- p + scale * T^2 * g, T = |p| + eta (adaptive)
# --------------------------------------------------------------------------------------------

@triton.jit
def _perturb_tile(p_ptr, g_ptr, backup_ptr, keep_ptr, offs, mask, scale, eta,
                  ADAPTIVE: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr):
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0)
    g_raw = tl.load(g_ptr + offs, mask=mask, other=0)
    tl.store(backup_ptr + offs, p_raw, mask=mask)                   # bit-exact copies
    if HAS_KEEP:
        tl.store(keep_ptr + offs, g_raw, mask=mask)
    w = p_raw.to(ACC)
    step = g_raw.to(ACC) * scale
    if ADAPTIVE:
        t = tl.abs(w) + eta
        step = step * t
        step = step * t
    tl.store(p_ptr + offs, _rounded(w + step, p_ptr), mask=mask)


@triton.jit
def _perturb_kernel(p_ptr, g_ptr, scale_ptr, backup_ptr, keep_ptr, n, eta_hi, eta_mid, eta_lo,
                    table_ptr, nseg, nblocks,
                    ADAPTIVE: tl.constexpr, HAS_KEEP: tl.constexpr, LIST: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(ACC)          # first: after the stores it would be a round trip more
    eta = tl.cast(eta_hi, ACC) + tl.cast(eta_mid, ACC) + tl.cast(eta_lo, ACC)
    if LIST:
        seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
        n = tl.load(table_ptr + nseg + 1 + seg)
        start = (pid - tl.load(table_ptr + seg)) * BLOCK
        addr = table_ptr + 2 * nseg + 1 + nblocks + seg
        p_addr = tl.load(addr)
        g_addr = tl.load(addr + nseg)
        b_addr = tl.load(addr + 2 * nseg)
        k_addr = b_addr
        if HAS_KEEP:
            k_addr = tl.load(addr + 3 * nseg)
        p_ptr = p_addr.to(p_ptr.dtype)
        g_ptr = g_addr.to(g_ptr.dtype)
        backup_ptr = b_addr.to(backup_ptr.dtype)
        keep_ptr = k_addr.to(keep_ptr.dtype)
        fast = (((p_addr | g_addr | b_addr | k_addr) & 15) == 0) & (start + BLOCK <= n)
    else:
        start = pid.to(tl.int64) * BLOCK
        fast = start + BLOCK <= n
    offs = start + tl.arange(0, BLOCK)
    if fast:
        if LIST:
            _perturb_tile(tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16), tl.multiple_of(backup_ptr, 16),
                          tl.multiple_of(keep_ptr, 16), offs, tl.full([BLOCK], 1, tl.int1), scale, eta, ADAPTIVE, HAS_KEEP,
                          ACC)
        else:
            _perturb_tile(p_ptr, g_ptr, backup_ptr, keep_ptr, offs, tl.full([BLOCK], 1, tl.int1), scale, eta, ADAPTIVE,
                          HAS_KEEP, ACC)
    else:
        _perturb_tile(p_ptr, g_ptr, backup_ptr, keep_ptr, offs, offs < n, scale, eta, ADAPTIVE, HAS_KEEP, ACC)


def _perturb(p, g, scale, backup, keep, adaptive, eta, grid, n, table, nseg, nblocks, block) -> None:
    """Launch: ``p``... the flat buffers, or the lists' first tensors (element types) with the
    table (``table`` None: flat)."""
    with _device_ctx(p):
        _perturb_kernel[grid](p, g, scale, backup, backup if keep is None else keep, n,
                              *_split(eta, p.dtype == torch.float64), p if table is None else table, nseg,
                              nblocks, ADAPTIVE=bool(adaptive), HAS_KEEP=keep is not None, LIST=table is not None,
                              ACC=_acc(p.dtype), BLOCK=block, **_LAUNCH)


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
    _perturb(param, grad, scale, backup, grad_keep, adaptive, eta, _grid(n, block), n, None, 0, 0, block)


def perturb_list(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: torch.Tensor,
                 backups: Sequence[torch.Tensor], adaptive: bool,
                 grad_keeps: Optional[Sequence[torch.Tensor]] = None, eta: float = 0.0) -> None:
    """``perturb`` on every tensor of the lists (one ``scale`` for all), one launch."""
    p0 = _check_lists("params", params, ("grad_keeps",), grads=grads, backups=backups, grad_keeps=grad_keeps)
    if p0 is None:
        return
    check_scale(scale, p0)
    keeps = backups if grad_keeps is None else grad_keeps
    table, nblocks, block = _list_table((params, grads, backups, keeps))
    if table is None:
        return
    _perturb(p0, grads[0], scale, backups[0], None if grad_keeps is None else keeps[0], adaptive, eta,
             (nblocks,), 0, table, len(params), nblocks, block)


# --------------------------------------------------------------------------------------------
# restore_psf_stats: p <- backup; psf <- grad_sam - psf; partial (sum g^2, sum PSF^2) per block
# --------------------------------------------------------------------------------------------

@triton.jit
def _psf_stats(part_ptr, pid, nprog, offs, mask, stat_start, g, psf):
    """This block's partial (sum g^2, sum PSF^2) over the elements at or after ``stat_start``:
    ``g`` the old psf (the kept gradient), ``psf`` the new one as stored (rounded), both in the
    maths dtype; to ``part_ptr[pid]`` and ``part_ptr[nprog + pid]``."""
    in_stats = mask & (offs >= stat_start)
    tl.store(part_ptr + pid, tl.sum(tl.where(in_stats, g * g, 0.0), axis=0))
    tl.store(part_ptr + nprog + pid, tl.sum(tl.where(in_stats, psf * psf, 0.0), axis=0))


@triton.jit
def _restore_tile(p_ptr, backup_ptr, gs_ptr, psf_ptr, part_ptr, pid, nprog, offs, mask, stat_start,
                  HAS_PSF: tl.constexpr, ACC: tl.constexpr):
    """``p <- backup``; with psf: ``psf <- g_sam - psf`` (psf held g) and the statistics."""
    b = tl.load(backup_ptr + offs, mask=mask, other=0)
    if HAS_PSF:
        g_sam = tl.load(gs_ptr + offs, mask=mask, other=0).to(ACC)
        g = tl.load(psf_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(p_ptr + offs, b, mask=mask)
    if HAS_PSF:
        psf = _rounded(g_sam - g, psf_ptr)
        tl.store(psf_ptr + offs, psf, mask=mask)
        _psf_stats(part_ptr, pid, nprog, offs, mask, stat_start, g, psf.to(ACC))


@triton.jit
def _restore_kernel(p_ptr, backup_ptr, gs_ptr, psf_ptr, part_ptr, n, stat_start, table_ptr, nseg, nblocks,
                    HAS_PSF: tl.constexpr, LIST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if LIST:
        seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
        n = tl.load(table_ptr + nseg + 1 + seg)
        start = (pid - tl.load(table_ptr + seg)) * BLOCK
        addr = table_ptr + 2 * nseg + 1 + nblocks + seg
        p_addr = tl.load(addr)
        b_addr = tl.load(addr + nseg)
        gs_addr = p_addr
        psf_addr = p_addr
        if HAS_PSF:
            gs_addr = tl.load(addr + 2 * nseg)
            psf_addr = tl.load(addr + 3 * nseg)
        p_ptr = p_addr.to(p_ptr.dtype)
        backup_ptr = b_addr.to(backup_ptr.dtype)
        gs_ptr = gs_addr.to(gs_ptr.dtype)
        psf_ptr = psf_addr.to(psf_ptr.dtype)
        stat_start = tl.where(seg >= stat_start, 0, n)     # stat_first: all of the tensor or none
        fast = (((p_addr | b_addr | gs_addr | psf_addr) & 15) == 0) & (start + BLOCK <= n)
    else:
        start = pid.to(tl.int64) * BLOCK
        fast = start + BLOCK <= n
    offs = start + tl.arange(0, BLOCK)
    if fast:
        if LIST:
            _restore_tile(tl.multiple_of(p_ptr, 16), tl.multiple_of(backup_ptr, 16), tl.multiple_of(gs_ptr, 16),
                          tl.multiple_of(psf_ptr, 16), part_ptr, pid, nprog, offs, tl.full([BLOCK], 1, tl.int1), stat_start,
                          HAS_PSF, ACC)
        else:
            _restore_tile(p_ptr, backup_ptr, gs_ptr, psf_ptr, part_ptr, pid, nprog, offs, tl.full([BLOCK], 1, tl.int1),
                          stat_start, HAS_PSF, ACC)
    else:
        _restore_tile(p_ptr, backup_ptr, gs_ptr, psf_ptr, part_ptr, pid, nprog, offs, offs < n, stat_start, HAS_PSF,
                      ACC)


def _stats_scratch(programs: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty((2, programs), dtype=_acc_torch(dtype), device=device)


def _reduce_stats(partials: torch.Tensor) -> torch.Tensor:
    return partials.sum(dim=1)       # fixed-order device reduction, no sync; in the maths dtype


def _restore(p, backup, gs, psf, stat_start, grid, n, table, nseg, nblocks, block) -> Optional[torch.Tensor]:
    partials = _stats_scratch(grid[0], p.dtype, p.device) if psf is not None else p
    with _device_ctx(p):
        _restore_kernel[grid](p, backup, gs, p if psf is None else psf, partials, n, stat_start,
                              p if table is None else table, nseg, nblocks, HAS_PSF=psf is not None,
                              LIST=table is not None, ACC=_acc(p.dtype), BLOCK=block, **_LAUNCH)
    return None if psf is None else _reduce_stats(partials)


def restore_psf_stats(param: torch.Tensor, backup: torch.Tensor, grad_sam: torch.Tensor,
                      psf: Optional[torch.Tensor], stat_start: int) -> Optional[torch.Tensor]:
    """``param <- backup``; with ``psf``: ``psf <- grad_sam - psf`` and the pair (maths dtype)
    (sum g^2, sum PSF^2) over ``[stat_start:]`` (see ``reference.restore_psf_stats``)."""
    _check(param, backup=backup, grad_sam=grad_sam, psf=psf)
    n = param.numel()
    if n == 0:
        return None if psf is None else _empty_sums(2, param)
    block = _block(n)
    return _restore(param, backup, grad_sam, psf, _stat_start(stat_start, n), _grid(n, block), n, None, 0, 0,
                    block)


def restore_psf_stats_list(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                           grad_sams: Sequence[torch.Tensor], psfs: Optional[Sequence[torch.Tensor]],
                           stat_first: int) -> Optional[torch.Tensor]:
    """``restore_psf_stats`` on every tensor of the lists, one launch; the statistics pair is over
    the tensors of index >= ``stat_first``."""
    p0 = _check_lists("params", params, ("psfs",), backups=backups, grad_sams=grad_sams, psfs=psfs)
    if p0 is None:
        return None if psfs is None else _empty_sums(2, None)
    table, nblocks, block = _list_table((params, backups, grad_sams, params if psfs is None else psfs))
    if table is None:
        return None if psfs is None else _empty_sums(2, p0)
    return _restore(p0, backups[0], grad_sams[0], None if psfs is None else psfs[0],
                    _stat_first(stat_first, len(params)), (nblocks,), 0, table, len(params), nblocks, block)


# --------------------------------------------------------------------------------------------
# reuse: grad <- grad + coeff * psf
# --------------------------------------------------------------------------------------------

@triton.jit
def _reuse_tile(g_ptr, psf_ptr, offs, mask, coeff, ACC: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
    psf = tl.load(psf_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(g_ptr + offs, _rounded(g + coeff * psf, g_ptr), mask=mask)


@triton.jit
def _reuse_kernel(g_ptr, psf_ptr, n, coeff_hi, coeff_mid, coeff_lo, scalars_ptr, table_ptr, nseg, nblocks,
                  HAS_SCALARS: tl.constexpr, LIST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_SCALARS:                             # [coeff], float64 on the device
        coeff = tl.load(scalars_ptr).to(ACC)
    else:
        coeff = tl.cast(coeff_hi, ACC) + tl.cast(coeff_mid, ACC) + tl.cast(coeff_lo, ACC)
    if LIST:
        seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
        n = tl.load(table_ptr + nseg + 1 + seg)
        start = (pid - tl.load(table_ptr + seg)) * BLOCK
        addr = table_ptr + 2 * nseg + 1 + nblocks + seg
        g_addr = tl.load(addr)
        psf_addr = tl.load(addr + nseg)
        g_ptr = g_addr.to(g_ptr.dtype)
        psf_ptr = psf_addr.to(psf_ptr.dtype)
        fast = (((g_addr | psf_addr) & 15) == 0) & (start + BLOCK <= n)
    else:
        start = pid.to(tl.int64) * BLOCK
        fast = start + BLOCK <= n
    offs = start + tl.arange(0, BLOCK)
    if fast:
        if LIST:
            _reuse_tile(tl.multiple_of(g_ptr, 16), tl.multiple_of(psf_ptr, 16), offs, tl.full([BLOCK], 1, tl.int1), coeff,
                        ACC)
        else:
            _reuse_tile(g_ptr, psf_ptr, offs, tl.full([BLOCK], 1, tl.int1), coeff, ACC)
    else:
        _reuse_tile(g_ptr, psf_ptr, offs, offs < n, coeff, ACC)


def _reuse(g, psf, coeff, scalars, grid, n, table, nseg, nblocks, block) -> None:
    with _device_ctx(g):
        _reuse_kernel[grid](g, psf, n, *_split(coeff, g.dtype == torch.float64), g if scalars is None else scalars,
                            g if table is None else table, nseg, nblocks, HAS_SCALARS=scalars is not None,
                            LIST=table is not None, ACC=_acc(g.dtype), BLOCK=block, **_LAUNCH)


def _scalars_device(t0: Optional[torch.Tensor], scalars) -> torch.device:
    """Where a list op's ``scalars`` must be: the first tensor's device; for empty lists
    wherever they are (no kernel reads them)."""
    if t0 is not None:
        return t0.device
    return scalars.device if isinstance(scalars, torch.Tensor) else torch.device("cpu")


def reuse(grad: torch.Tensor, psf: torch.Tensor, coeff: float, scalars: Optional[torch.Tensor] = None) -> None:
    """vSAM reuse (Eq. 17): ``grad <- grad + coeff * PSF``. ``scalars``: ``[coeff]`` as a float64
    device tensor, read by the kernel instead of ``coeff`` (``vsam_ext.ops.scalars``)."""
    _check(grad, psf=psf)
    check_scalars("reuse", scalars, grad.device)
    n = grad.numel()
    if n == 0:
        return
    block = _block(n)
    _reuse(grad, psf, coeff, scalars, _grid(n, block), n, None, 0, 0, block)


def reuse_list(grads: Sequence[torch.Tensor], psfs: Sequence[torch.Tensor], coeff: float,
               scalars: Optional[torch.Tensor] = None) -> None:
    """``reuse`` on every tensor of the lists, one launch (one ``scalars`` for all)."""
    g0 = _check_lists("grads", grads, psfs=psfs)
    check_scalars("reuse", scalars, _scalars_device(g0, scalars))
    if g0 is None:
        return
    table, nblocks, block = _list_table((grads, psfs))
    if table is not None:
        _reuse(g0, psfs[0], coeff, scalars, (nblocks,), 0, table, len(grads), nblocks, block)


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
def _front_loads(offs, mask, p_ptr, g_ptr, psf_ptr, backup_ptr, MODE: tl.constexpr, ACC: tl.constexpr):
    """The loads of a fused step's front, issued before the caller's state loads and any store:
    (g, w, q). w: the weights (``backup`` in restore modes, the stepped weights then go to
    ``param``); q: the PSF (reuse) or the kept g (restore + PSF), else g (unused)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
    if MODE >= 2:                                              # _RESTORE, _RESTORE_PSF
        w = tl.load(backup_ptr + offs, mask=mask, other=0).to(ACC)
    else:
        w = tl.load(p_ptr + offs, mask=mask, other=0).to(ACC)
    q = g
    if MODE == 1 or MODE == 3:                                 # reuse: the PSF; restore: the kept g
        q = tl.load(psf_ptr + offs, mask=mask, other=0).to(ACC)
    return g, w, q


@triton.jit
def _front_grad(offs, mask, g, q, psf_ptr, coeff, MODE: tl.constexpr, MAXIMIZE: tl.constexpr, ACC: tl.constexpr):
    """The final gradient d as in ``reference._final_grad`` (``grad + coeff * psf`` in reuse
    mode, ``grad`` = g_sam otherwise, negated when maximizing) and, in _RESTORE_PSF, the new PSF
    psf <- g_sam - psf stored and returned (else g, unused): (d, psf). The grad buffer is never
    written."""
    psf = g
    if MODE == 3:
        psf = _rounded(g - q, psf_ptr)
        tl.store(psf_ptr + offs, psf, mask=mask)
    if MODE == 1:
        d = g + coeff * q
    else:
        d = g
    if MAXIMIZE:
        d = -d
    return d, psf


@triton.jit
def _sgd_tile(p_ptr, g_ptr, buf_ptr, psf_ptr, backup_ptr, part_ptr, pid, nprog, offs, mask, stat_start,
              coeff, lr, weight_decay, momentum, one_minus_dampening,
              MODE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
              MAXIMIZE: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr):
    """One block of the SGD step: the front (``_front_loads``, the momentum buffer's load,
    ``_front_grad``), the step, and the statistics in _RESTORE_PSF."""
    g, w, q = _front_loads(offs, mask, p_ptr, g_ptr, psf_ptr, backup_ptr, MODE, ACC)
    if MOMENTUM and not FIRST:
        buf_old = tl.load(buf_ptr + offs, mask=mask, other=0).to(ACC)
    d, psf = _front_grad(offs, mask, g, q, psf_ptr, coeff, MODE, MAXIMIZE, ACC)
    if WEIGHT_DECAY:
        d = d + weight_decay * w
    if MOMENTUM:
        if FIRST:
            buf = d
        else:
            buf = momentum * buf_old + one_minus_dampening * d
        tl.store(buf_ptr + offs, _rounded(buf, buf_ptr), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(p_ptr + offs, _rounded(w - lr * d, p_ptr), mask=mask)
    if MODE == 3:
        _psf_stats(part_ptr, pid, nprog, offs, mask, stat_start, q, psf.to(ACC))


@triton.jit
def _sgd_kernel(p_ptr, g_ptr, buf_ptr, psf_ptr, backup_ptr, part_ptr, n, stat_start,
                coeff_hi, coeff_mid, coeff_lo, lr_hi, lr_mid, lr_lo, wd_hi, wd_mid, wd_lo,
                mom_hi, mom_mid, mom_lo, damp_hi, damp_mid, damp_lo, scalars_ptr, table_ptr, nseg, nblocks,
                MODE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST: tl.constexpr,
                HAS_SCALARS: tl.constexpr, LIST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_SCALARS:                             # [coeff, lr], float64 on the device
        coeff = tl.load(scalars_ptr).to(ACC)
        lr = tl.load(scalars_ptr + 1).to(ACC)
    else:
        coeff = tl.cast(coeff_hi, ACC) + tl.cast(coeff_mid, ACC) + tl.cast(coeff_lo, ACC)
        lr = tl.cast(lr_hi, ACC) + tl.cast(lr_mid, ACC) + tl.cast(lr_lo, ACC)
    weight_decay = tl.cast(wd_hi, ACC) + tl.cast(wd_mid, ACC) + tl.cast(wd_lo, ACC)
    momentum = tl.cast(mom_hi, ACC) + tl.cast(mom_mid, ACC) + tl.cast(mom_lo, ACC)
    one_minus_dampening = tl.cast(damp_hi, ACC) + tl.cast(damp_mid, ACC) + tl.cast(damp_lo, ACC)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if LIST:
        seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
        n = tl.load(table_ptr + nseg + 1 + seg)
        start = (pid - tl.load(table_ptr + seg)) * BLOCK
        addr = table_ptr + 2 * nseg + 1 + nblocks + seg
        p_addr = tl.load(addr)
        g_addr = tl.load(addr + nseg)
        buf_addr = p_addr
        psf_addr = p_addr
        backup_addr = p_addr
        if MOMENTUM:
            buf_addr = tl.load(addr + 2 * nseg)
        if MODE == 1 or MODE == 3:                             # _REUSE, _RESTORE_PSF
            psf_addr = tl.load(addr + 3 * nseg)
        if MODE >= 2:
            backup_addr = tl.load(addr + 4 * nseg)
        p_ptr = p_addr.to(p_ptr.dtype)
        g_ptr = g_addr.to(g_ptr.dtype)
        buf_ptr = buf_addr.to(buf_ptr.dtype)
        psf_ptr = psf_addr.to(psf_ptr.dtype)
        backup_ptr = backup_addr.to(backup_ptr.dtype)
        stat_start = tl.where(seg >= stat_start, 0, n)     # stat_first: all of the tensor or none
        fast = (((p_addr | g_addr | buf_addr | psf_addr | backup_addr) & 15) == 0) & (start + BLOCK <= n)
    else:
        start = pid.to(tl.int64) * BLOCK
        fast = start + BLOCK <= n
    offs = start + tl.arange(0, BLOCK)
    if fast:
        if LIST:
            _sgd_tile(tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16), tl.multiple_of(buf_ptr, 16),
                      tl.multiple_of(psf_ptr, 16), tl.multiple_of(backup_ptr, 16), part_ptr, pid, nprog, offs,
                      tl.full([BLOCK], 1, tl.int1), stat_start, coeff, lr, weight_decay, momentum, one_minus_dampening,
                      MODE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, FIRST, ACC)
        else:
            _sgd_tile(p_ptr, g_ptr, buf_ptr, psf_ptr, backup_ptr, part_ptr, pid, nprog, offs, tl.full([BLOCK], 1, tl.int1),
                      stat_start, coeff, lr, weight_decay, momentum, one_minus_dampening,
                      MODE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, FIRST, ACC)
    else:
        _sgd_tile(p_ptr, g_ptr, buf_ptr, psf_ptr, backup_ptr, part_ptr, pid, nprog, offs, offs < n, stat_start,
                  coeff, lr, weight_decay, momentum, one_minus_dampening,
                  MODE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, FIRST, ACC)


def _sgd(p, g, buf, psf, backup, coeff, stat_start, lr, weight_decay, momentum, dampening, nesterov, maximize,
         first, scalars, mode, grid, n, table, nseg, nblocks, block) -> Optional[torch.Tensor]:
    """One launch of the SGD kernel (``table`` None: flat buffers; else the lists' first tensors,
    ``stat_start`` then being ``stat_first``); the statistics in _RESTORE_PSF mode."""
    partials = _stats_scratch(grid[0], p.dtype, p.device) if mode == _RESTORE_PSF else p
    wide = p.dtype == torch.float64
    with _device_ctx(p):
        _sgd_kernel[grid](
            p, g, p if buf is None else buf, p if psf is None else psf, p if backup is None else backup, partials,
            n, stat_start, *_split(coeff, wide), *_split(lr, wide), *_split(weight_decay, wide),
            *_split(momentum, wide), *_split(1.0 - float(dampening), wide), p if scalars is None else scalars,
            p if table is None else table, nseg, nblocks, MODE=mode, WEIGHT_DECAY=weight_decay != 0.0,
            MOMENTUM=buf is not None, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), FIRST=bool(first),
            HAS_SCALARS=scalars is not None, LIST=table is not None, ACC=_acc(p.dtype), BLOCK=block, **_LAUNCH)
    return _reduce_stats(partials) if mode == _RESTORE_PSF else None


def sgd_step(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor],
             psf: Optional[torch.Tensor], backup: Optional[torch.Tensor], coeff: float, stat_start: int,
             lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first: bool, scalars: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """torch.optim.SGD's step fused with the restore or the reuse, one pass (see
    ``reference.sgd_step``). Returns the statistics pair in restore mode with ``psf``.
    ``scalars``: ``[coeff, lr]`` as a float64 device tensor, read by the kernel instead of
    ``coeff`` and ``lr`` (``vsam_ext.ops.scalars``; ``coeff`` still picks the mode)."""
    coeff, momentum = float(coeff), float(momentum)
    has_momentum = momentum != 0.0
    if has_momentum and momentum_buffer is None:
        raise ValueError("sgd_step: momentum != 0 needs a momentum_buffer")
    buf = momentum_buffer if has_momentum else None
    _check(param, grad=grad, momentum_buffer=buf, psf=psf, backup=backup)
    check_scalars("sgd_step", scalars, param.device)
    mode = _mode(psf, backup, coeff)
    n = param.numel()
    if n == 0:
        return _empty_sums(2, param) if mode == _RESTORE_PSF else None
    block = _block(n)
    return _sgd(param, grad, buf, psf, backup, coeff, _stat_start(stat_start, n), lr, weight_decay, momentum,
                dampening, nesterov, maximize, first, scalars, mode, _grid(n, block), n, None, 0, 0, block)


def sgd_step_list(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  momentum_buffers: Optional[Sequence[torch.Tensor]], psfs: Optional[Sequence[torch.Tensor]],
                  backups: Optional[Sequence[torch.Tensor]], coeff: float, stat_first: int, lr: float,
                  weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                  first: bool, scalars: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``sgd_step`` on every tensor of the lists, one launch (one ``scalars`` for all); the
    statistics pair (restore mode with ``psfs``) is over the tensors of index >= ``stat_first``."""
    coeff, momentum = float(coeff), float(momentum)
    has_momentum = momentum != 0.0
    if has_momentum and momentum_buffers is None:
        raise ValueError("sgd_step_list: momentum != 0 needs momentum_buffers")
    bufs = momentum_buffers if has_momentum else None
    p0 = _check_lists("params", params, ("momentum_buffers", "psfs", "backups"), grads=grads,
                      momentum_buffers=bufs, psfs=psfs, backups=backups)
    check_scalars("sgd_step", scalars, _scalars_device(p0, scalars))
    mode = _mode(psfs, backups, coeff)
    if p0 is None:
        return _empty_sums(2, None) if mode == _RESTORE_PSF else None
    operands = [params, grads] + [params if t is None else t for t in (bufs, psfs, backups)]
    table, nblocks, block = _list_table(operands)
    if table is None:
        return _empty_sums(2, p0) if mode == _RESTORE_PSF else None
    first_of = lambda ts: None if ts is None else ts[0]     # noqa: E731
    return _sgd(p0, grads[0], first_of(bufs), first_of(psfs), first_of(backups), coeff,
                _stat_first(stat_first, len(params)), lr, weight_decay, momentum, dampening, nesterov, maximize,
                first, scalars, mode, (nblocks,), 0, table, len(params), nblocks, block)


def _check_step(op: str, step: int) -> None:
    """AdamW's ``step`` (the count after this step's increment) is >= 1, with or without
    ``scalars`` (the bias corrections of step 0 divide by zero)."""
    if int(step) < 1:
        raise ValueError(f"{op}: step must be >= 1 (the count after this step's increment), got {step}")


@triton.jit
def _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, psf_ptr, backup_ptr, part_ptr, pid, nprog, offs, mask, stat_start,
                coeff, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                MODE: tl.constexpr, MAXIMIZE: tl.constexpr, ACC: tl.constexpr):
    """One block of the AdamW step; the front as in ``_sgd_tile``."""
    g, w, q = _front_loads(offs, mask, p_ptr, g_ptr, psf_ptr, backup_ptr, MODE, ACC)
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(ACC)
    v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
    d, psf = _front_grad(offs, mask, g, q, psf_ptr, coeff, MODE, MAXIMIZE, ACC)
    w = w * decay                                                           # decoupled weight decay
    m = m + one_minus_beta1 * (d - m)                                       # torch's lerp
    v = beta2 * v + one_minus_beta2 * d * d
    tl.store(m_ptr + offs, _rounded(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, _rounded(v, v_ptr), mask=mask)
    denom = _div_rn(_sqrt_rn(v), bc2_sqrt) + eps
    tl.store(p_ptr + offs, _rounded(w - _div_rn(step_size * m, denom), p_ptr), mask=mask)
    if MODE == 3:
        _psf_stats(part_ptr, pid, nprog, offs, mask, stat_start, q, psf.to(ACC))


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, psf_ptr, backup_ptr, part_ptr, n, stat_start,
                  coeff_hi, coeff_mid, coeff_lo, decay_hi, decay_mid, decay_lo, b1c_hi, b1c_mid, b1c_lo,
                  beta2_hi, beta2_mid, beta2_lo, b2c_hi, b2c_mid, b2c_lo,
                  step_size_hi, step_size_mid, step_size_lo, bc2_sqrt_hi, bc2_sqrt_mid, bc2_sqrt_lo,
                  eps_hi, eps_mid, eps_lo, scalars_ptr, table_ptr, nseg, nblocks,
                  MODE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALARS: tl.constexpr, LIST: tl.constexpr,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_SCALARS:                             # [coeff, decay, step_size, bc2_sqrt], float64 on the device
        coeff = tl.load(scalars_ptr).to(ACC)
        decay = tl.load(scalars_ptr + 1).to(ACC)
        step_size = tl.load(scalars_ptr + 2).to(ACC)
        bc2_sqrt = tl.load(scalars_ptr + 3).to(ACC)
    else:
        coeff = tl.cast(coeff_hi, ACC) + tl.cast(coeff_mid, ACC) + tl.cast(coeff_lo, ACC)
        decay = tl.cast(decay_hi, ACC) + tl.cast(decay_mid, ACC) + tl.cast(decay_lo, ACC)     # 1 - lr * wd
        step_size = tl.cast(step_size_hi, ACC) + tl.cast(step_size_mid, ACC) + tl.cast(step_size_lo, ACC)
        bc2_sqrt = tl.cast(bc2_sqrt_hi, ACC) + tl.cast(bc2_sqrt_mid, ACC) + tl.cast(bc2_sqrt_lo, ACC)
    one_minus_beta1 = tl.cast(b1c_hi, ACC) + tl.cast(b1c_mid, ACC) + tl.cast(b1c_lo, ACC)
    beta2 = tl.cast(beta2_hi, ACC) + tl.cast(beta2_mid, ACC) + tl.cast(beta2_lo, ACC)
    one_minus_beta2 = tl.cast(b2c_hi, ACC) + tl.cast(b2c_mid, ACC) + tl.cast(b2c_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_mid, ACC) + tl.cast(eps_lo, ACC)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if LIST:
        seg = tl.load(table_ptr + 2 * nseg + 1 + pid)
        n = tl.load(table_ptr + nseg + 1 + seg)
        start = (pid - tl.load(table_ptr + seg)) * BLOCK
        addr = table_ptr + 2 * nseg + 1 + nblocks + seg
        p_addr = tl.load(addr)
        g_addr = tl.load(addr + nseg)
        m_addr = tl.load(addr + 2 * nseg)
        v_addr = tl.load(addr + 3 * nseg)
        psf_addr = p_addr
        backup_addr = p_addr
        if MODE == 1 or MODE == 3:                             # _REUSE, _RESTORE_PSF
            psf_addr = tl.load(addr + 4 * nseg)
        if MODE >= 2:
            backup_addr = tl.load(addr + 5 * nseg)
        p_ptr = p_addr.to(p_ptr.dtype)
        g_ptr = g_addr.to(g_ptr.dtype)
        m_ptr = m_addr.to(m_ptr.dtype)
        v_ptr = v_addr.to(v_ptr.dtype)
        psf_ptr = psf_addr.to(psf_ptr.dtype)
        backup_ptr = backup_addr.to(backup_ptr.dtype)
        stat_start = tl.where(seg >= stat_start, 0, n)     # stat_first: all of the tensor or none
        fast = (((p_addr | g_addr | m_addr | v_addr | psf_addr | backup_addr) & 15) == 0) & (start + BLOCK <= n)
    else:
        start = pid.to(tl.int64) * BLOCK
        fast = start + BLOCK <= n
    offs = start + tl.arange(0, BLOCK)
    if fast:
        if LIST:
            _adamw_tile(tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16), tl.multiple_of(m_ptr, 16),
                        tl.multiple_of(v_ptr, 16), tl.multiple_of(psf_ptr, 16), tl.multiple_of(backup_ptr, 16),
                        part_ptr, pid, nprog, offs, tl.full([BLOCK], 1, tl.int1), stat_start, coeff, decay, one_minus_beta1,
                        beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MODE, MAXIMIZE, ACC)
        else:
            _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, psf_ptr, backup_ptr, part_ptr, pid, nprog, offs,
                        tl.full([BLOCK], 1, tl.int1), stat_start, coeff, decay, one_minus_beta1, beta2, one_minus_beta2,
                        step_size, bc2_sqrt, eps, MODE, MAXIMIZE, ACC)
    else:
        _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, psf_ptr, backup_ptr, part_ptr, pid, nprog, offs, offs < n,
                    stat_start, coeff, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                    MODE, MAXIMIZE, ACC)


def _adamw(p, g, m, v, psf, backup, coeff, stat_start, lr, beta1, beta2, eps, weight_decay, step, maximize,
           scalars, mode, grid, n, table, nseg, nblocks, block) -> Optional[torch.Tensor]:
    """One launch of the AdamW kernel (``table`` None: flat buffers; else the lists' first
    tensors, ``stat_start`` then being ``stat_first``); the statistics in _RESTORE_PSF mode."""
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    if scalars is None:
        # every scalar on the host, in Python floats, as the reference computes them
        decay = 1.0 - lr * float(weight_decay)
        step_size = lr / (1.0 - beta1 ** step)
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    else:                                       # the kernel reads them from ``scalars``
        decay = step_size = bc2_sqrt = 0.0
    partials = _stats_scratch(grid[0], p.dtype, p.device) if mode == _RESTORE_PSF else p
    wide = p.dtype == torch.float64
    with _device_ctx(p):
        _adamw_kernel[grid](
            p, g, m, v, p if psf is None else psf, p if backup is None else backup, partials, n, stat_start,
            *_split(coeff, wide), *_split(decay, wide), *_split(1.0 - beta1, wide), *_split(beta2, wide),
            *_split(1.0 - beta2, wide), *_split(step_size, wide), *_split(bc2_sqrt, wide), *_split(eps, wide),
            p if scalars is None else scalars, p if table is None else table, nseg, nblocks,
            MODE=mode, MAXIMIZE=bool(maximize), HAS_SCALARS=scalars is not None, LIST=table is not None,
            ACC=_acc(p.dtype), BLOCK=block, **_LAUNCH)
    return _reduce_stats(partials) if mode == _RESTORE_PSF else None


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               psf: Optional[torch.Tensor], backup: Optional[torch.Tensor], coeff: float, stat_start: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               maximize: bool, scalars: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """torch.optim.AdamW's step (no amsgrad) fused with the restore or the reuse, one pass (see
    ``reference.adamw_step``); ``step`` counts this step (1 on the first). ``scalars``:
    ``[coeff, 1 - lr * weight_decay, lr / (1 - beta1 ** step), sqrt(1 - beta2 ** step)]`` as a
    float64 device tensor, read by the kernel instead of the values from the float arguments
    (``vsam_ext.ops.scalars``; ``coeff`` still picks the mode, ``step`` must still be >= 1)."""
    coeff = float(coeff)
    _check(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, psf=psf, backup=backup)
    check_scalars("adamw_step", scalars, param.device)
    _check_step("adamw_step", step)
    mode = _mode(psf, backup, coeff)
    n = param.numel()
    if n == 0:
        return _empty_sums(2, param) if mode == _RESTORE_PSF else None
    block = _block(n)
    return _adamw(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, _stat_start(stat_start, n), lr, beta1,
                  beta2, eps, weight_decay, step, maximize, scalars, mode, _grid(n, block), n, None, 0, 0, block)


def adamw_step_list(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                    psfs: Optional[Sequence[torch.Tensor]], backups: Optional[Sequence[torch.Tensor]],
                    coeff: float, stat_first: int, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, step: int, maximize: bool,
                    scalars: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``adamw_step`` on every tensor of the lists, one launch (one ``scalars`` for all); the
    statistics pair (restore mode with ``psfs``) is over the tensors of index >= ``stat_first``."""
    coeff = float(coeff)
    p0 = _check_lists("params", params, ("psfs", "backups"), grads=grads, exp_avgs=exp_avgs,
                      exp_avg_sqs=exp_avg_sqs, psfs=psfs, backups=backups)
    check_scalars("adamw_step", scalars, _scalars_device(p0, scalars))
    _check_step("adamw_step_list", step)
    mode = _mode(psfs, backups, coeff)
    if p0 is None:
        return _empty_sums(2, None) if mode == _RESTORE_PSF else None
    operands = [params, grads, exp_avgs, exp_avg_sqs] + [params if t is None else t for t in (psfs, backups)]
    table, nblocks, block = _list_table(operands)
    if table is None:
        return _empty_sums(2, p0) if mode == _RESTORE_PSF else None
    return _adamw(p0, grads[0], exp_avgs[0], exp_avg_sqs[0], None if psfs is None else psfs[0],
                  None if backups is None else backups[0], coeff, _stat_first(stat_first, len(params)), lr, beta1,
                  beta2, eps, weight_decay, step, maximize, scalars, mode, (nblocks,), 0, table, len(params), nblocks,
                  block)
