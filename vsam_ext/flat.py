"""Flattened parameter and gradient buffers.

The parameters that require grad are packed, per (param group, device, dtype), into one
contiguous buffer, and each parameter's ``.grad`` becomes a view of a flat gradient buffer that
is zeroed in place, never set to None. Fused ops then run over a few large buffers instead of
many small tensors. Each parameter lives in the flat buffer but keeps a storage of its own
(``own_storage``), as an unflattened parameter has: saving a module (``torch.save`` of its
``state_dict``, safetensors) writes its parameters alone, not the whole buffer.

Buffers are per param group as well, so every buffer has one set of hyper-parameters (rho,
lr, ...): a fused base step needs nothing per element but the data.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .shards import ShardBuffer, ShardGroup, is_dtensor

__all__ = ["FlatBuffer", "FlatParams", "segment_view", "own_storage"]


def _dense_permutation(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides lay its elements out densely in some order (contiguous,
    channels_last, a transpose, ...): then a flat segment can hold it with the same strides."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def segment_view(flat: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    """``flat[start:start + like.numel()]`` seen with ``like``'s shape and, when they are dense,
    its strides: a channels_last (or transposed) parameter keeps its memory format. The flat
    ops are elementwise over memory and the per-tensor sums do not depend on the order."""
    if like.numel() > 1 and not like.is_contiguous() and _dense_permutation(like):
        return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + start)
    return flat[start:start + like.numel()].view(like.shape)


def own_storage(flat: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    """``segment_view(flat, start, like)``, but with a storage of its own over exactly its
    elements (which keeps ``flat`` alive): the C++ op ``vsam_ext::own_storage_alias``. Without
    the compiled extension, or for an empty tensor, the plain view."""
    view = segment_view(flat, start, like)
    if view.numel() == 0 or not _HAS_ALIAS:
        return view
    return torch.ops.vsam_ext.own_storage_alias(flat, start, list(view.shape), list(view.stride()))


def _has_alias() -> bool:
    try:
        from .ops import extension  # noqa: F401  (loads vsam_ext._C)
    except (ImportError, OSError):
        return False
    return hasattr(torch.ops.vsam_ext, "own_storage_alias")


_HAS_ALIAS = _has_alias()


class FlatBuffer:
    """The parameters of one (group, device, dtype), packed in registration order."""

    sharded = False

    def __init__(self, group_index: int, params: Sequence[torch.Tensor], scaled: bool = False) -> None:
        first = params[0]
        self.group_index = group_index
        self.scaled = scaled         # ASAM: these tensors get T = |w| + eta
        self.params: List[torch.Tensor] = list(params)
        self.device, self.dtype = first.device, first.dtype
        self.offsets: List[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.param = torch.empty(total, dtype=self.dtype, device=self.device)
        self.grad = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.grad_views: List[torch.Tensor] = []
        with torch.no_grad():
            for p, start in zip(self.params, self.offsets):
                n = p.numel()
                segment_view(self.param, start, p).copy_(p.detach())
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise TypeError("params: sparse gradients are not supported "
                                        f"(a parameter of shape {tuple(p.shape)} has one)")
                    segment_view(self.grad, start, p).copy_(p.grad)
                p.data = own_storage(self.param, start, p)
                view = segment_view(self.grad, start, p)
                p.grad = view
                self.grad_views.append(view)
        self.data_ptrs = [p.data_ptr() for p in self.params]
        self.stat_start = total      # elements [stat_start, numel) belong to the last-L tensors
        self.backup: Optional[torch.Tensor] = None   # weights saved by the perturbation
        self.psf: Optional[torch.Tensor] = None      # vSAM: first gradient, then the PSF

    def bounds(self) -> List[int]:
        """Segment boundaries (one segment per parameter tensor), for per-segment ops."""
        return self.offsets + [self.numel]

    def new_buffer(self) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def load_weights(self, source: torch.Tensor) -> None:
        """``param <- source`` (a flat buffer of ours, e.g. the saved weights)."""
        self.param.copy_(source)

    def layout(self) -> list:
        return [self.group_index, str(self.dtype), self.numel, [list(p.shape) for p in self.params]]

    def export(self, own: torch.Tensor) -> torch.Tensor:
        """A buffer of ours (PSF, g_v) as a checkpoint holds it: the flat tensor itself."""
        return own

    def restore(self, own: torch.Tensor, saved) -> None:
        """``own <- saved`` (what ``export`` gave, as loaded from a checkpoint)."""
        own.copy_(saved)


class FlatParams:
    """All flat buffers of one optimizer, plus which parameters got a gradient this step."""

    def __init__(self, stat_tensors: Optional[int] = None, in_place: bool = False) -> None:
        self.in_place = in_place                  # every parameter left where it lives (ShardBuffer)
        self.buffers: List[FlatBuffer] = []
        self.managed: List[torch.Tensor] = []     # registration order, across buffers
        self._ids: Dict[int, int] = {}
        self._received: List[bool] = []
        self._dirty = False                       # some gradient arrived since the last zeroing
        self._hooks = []
        # The hooks hold this object weakly: a dropped optimizer frees its buffers and its hooks.
        weakref.finalize(self, _remove_hooks, self._hooks)
        self.accepting = True                     # False while no gradient is expected
        self.late_grad = False                    # a gradient arrived while not accepting
        self.stat_tensors = stat_tensors
        self._warned_unmanaged = False
        self.unmanaged: List[torch.Tensor] = []   # frozen at construction: the base optimizer's alone
        self.shard_group: Optional[ShardGroup] = None   # FSDP2: scalars are summed over it

    # -- construction -------------------------------------------------------------------
    def add_group(self, group_index: int, params: Sequence[torch.Tensor],
                  scaled: Optional[Callable[[torch.Tensor], bool]] = None) -> None:
        """``scaled``: ASAM's filter; the tensors it selects go to buffers of their own."""
        # A gradient counts as received only if it existed before the flat buffer took over:
        # the buffer gives every parameter a (zero) .grad view, which is not a gradient.
        had_grad = {id(p): p.grad is not None for p in params}
        # Before anything moves: every parameter of a kind we handle, one mesh for every DTensor,
        # no plain tensor beside them.
        new = [p for p in params if p.requires_grad and id(p) not in self._ids]
        self.shard_group = ShardGroup.of(self.managed + new)
        buckets: Dict[tuple, List[torch.Tensor]] = {}
        for p in params:
            if not p.requires_grad or id(p) in self._ids:
                continue
            if p.device.type == "cpu" and p.is_shared():
                raise ValueError("params: a parameter is in shared memory (model.share_memory(), e.g. for Hogwild "
                                 "training); the optimizer would move it into its own buffer and the processes "
                                 "would stop sharing it. Not supported: build the optimizer on unshared "
                                 "parameters")
            if not p.dtype.is_floating_point:
                raise TypeError(f"params: only floating-point parameters can be optimized, got {p.dtype}")
            buckets.setdefault((p.device, p.dtype, bool(scaled(p)) if scaled else False), []).append(p)
        for (_, _, is_scaled), bucket in buckets.items():
            kind = ShardBuffer if self.in_place or is_dtensor(bucket[0]) else FlatBuffer
            self.buffers.append(kind(group_index, bucket, is_scaled))
        self.unmanaged += [p for p in params if not p.requires_grad and id(p) not in self._ids]
        for p in params:
            if p.requires_grad and id(p) not in self._ids:
                index = len(self.managed)
                self._ids[id(p)] = index
                self.managed.append(p)
                self._received.append(had_grad[id(p)])
                if not is_dtensor(p):        # FSDP2 hands gradients over after its reduce-scatter
                    self._hooks.append(p.register_hook(self._make_hook(index)))
        self._dirty = True
        self._place_stat_range()

    def _make_hook(self, index: int):
        ref = weakref.ref(self)

        def on_grad(grad: torch.Tensor) -> None:
            flat = ref()
            if flat is None:
                return
            if grad.layout != torch.strided:
                raise TypeError(f"params: sparse gradients are not supported (parameter #{index} "
                                f"got a {grad.layout} gradient); use dense embeddings")
            flat._received[index] = True
            flat._dirty = True
            if not flat.accepting:
                flat.late_grad = True
        return on_grad

    def _place_stat_range(self) -> None:
        """The statistics use the last L managed tensors; in each buffer they are a suffix."""
        last = set(map(id, self.managed[-self.stat_tensors:])) if self.stat_tensors else set()
        for buf in self.buffers:
            buf.stat_start = buf.numel
            for p, start in zip(reversed(buf.params), reversed(buf.offsets)):
                if id(p) not in last:
                    break
                buf.stat_start = start

    # -- every step ---------------------------------------------------------------------
    def written(self) -> None:
        """The fused ops wrote the parameters through the flat buffer: bump their version
        counters, as an in-place update of each would (autograd then refuses a graph that saved
        the old values)."""
        torch.autograd.graph.increment_version(
            [t for b in self.buffers for t in (b.param if b.sharded else b.params)])

    def zero_grads(self) -> None:
        """Zero every gradient in place. A ``.grad`` that was replaced (``model.zero_grad()`` set
        it to None and a backward made a new one) goes back to its view, zeroed too: it belongs
        to no step yet (it used to be added to the next step's gradient)."""
        for p, view in self._replaced_grads():
            p.grad = view
            self._dirty = True
        for b in self.buffers:
            if b.sharded:                    # FSDP2's gradients are its own: dropped, as torch does
                for p in b.params:
                    p.grad = None
                    self._received[self._ids[id(p)]] = False
        if self._dirty:
            for buf in self.buffers:
                if not buf.sharded:
                    buf.grad.zero_()
            for i in range(len(self._received)):
                self._received[i] = False
            self._dirty = False

    def received_any(self) -> bool:
        """Whether any gradient reached a managed parameter since the last zeroing: through
        autograd, or as a new ``.grad`` tensor (in-place writes into the views are not seen)."""
        return (any(self._received) or any(True for _ in self._replaced_grads())
                or any(p.grad is not None for b in self.buffers if b.sharded for p in b.params))

    def _replaced_grads(self):
        """(parameter, its flat gradient view) for every managed parameter whose ``.grad`` is no
        longer that view (set to None, or a new tensor from a backward after that)."""
        for buf in self.buffers:
            if buf.sharded:
                continue
            for p, view in zip(buf.params, buf.grad_views):
                if p.grad is not view:
                    yield p, view

    def check(self) -> List[torch.Tensor]:
        """Before a step: refuse re-pointed parameters, pull in gradients that landed outside
        the flat buffer (e.g. after ``model.zero_grad()`` set them to None), and return the
        managed parameters that got no gradient (they are left untouched this step)."""
        for buf in self.buffers:
            if buf.sharded:
                if buf.moved():
                    raise RuntimeError("a sharded parameter has a new local tensor (was the model moved or "
                                       "re-sharded after the optimizer was built?); build the optimizer after that")
                for p in buf.params:
                    self._received[self._ids[id(p)]] = p.grad is not None
                continue
            for p, ptr, view in zip(buf.params, buf.data_ptrs, buf.grad_views):
                if p.data_ptr() != ptr:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} no longer lives in the optimizer's "
                        f"flat buffer (was the model moved, cast or given new tensors after the optimizer "
                        f"was built: model.to()/.half(), model.share_memory(), "
                        f"load_state_dict(assign=True), p.data = ...?); build the optimizer after that")
                g = p.grad
                if g is not view:
                    if g is not None:
                        if g.layout != torch.strided:
                            raise TypeError("params: sparse gradients are not supported")
                        view.copy_(g)
                        self._received[self._ids[id(p)]] = True
                    else:               # set to None (model.zero_grad()) and not made again since:
                        view.zero_()    # no gradient this step, whatever the flag said before
                        self._received[self._ids[id(p)]] = False
                    p.grad = view
                    self._dirty = True
        if not self._warned_unmanaged and any(p.grad is not None for p in self.unmanaged):
            warnings.warn("a parameter that was frozen when the optimizer was built now has a gradient: "
                          "the base optimizer steps it, without SAM perturbation; build a new optimizer "
                          "to include it", stacklevel=3)
            self._warned_unmanaged = True
        if not any(self._received):
            # No gradient came through autograd at all: the gradients were written into .grad
            # directly (e.g. p.grad.copy_(g)), so every parameter counts as having one.
            return []
        return [p for p, got in zip(self.managed, self._received) if not got]

    def state_layout(self) -> List[list]:
        """Per buffer: [group, dtype, numel, the shapes of its tensors] (plain lists)."""
        return [b.layout() for b in self.buffers]


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()
