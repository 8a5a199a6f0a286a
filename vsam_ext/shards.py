"""Parameters the optimizer does not own: FSDP2's sharded DTensor parameters.

``fully_shard`` (FSDP2) keeps every parameter as a DTensor whose local shard lives in storage
FSDP owns and all-gathers from before each forward; gradients arrive as new DTensors after
FSDP's reduce-scatter. A ``ShardBuffer`` therefore works on the local shards in place, as lists
(``vsam_ext.ops.lists``): nothing is moved into a flat buffer, and ``.grad`` stays FSDP's. Only
the optimizer's own buffers (saved weights, PSF / g_v) are flat, over the local elements.

Every global scalar (norms, statistics, Gram sums) is a sum over the ranks' local parts:
``ShardGroup.all_reduce`` sums it over the process group that shards the parameters, so every
rank takes the same decision.

What is accepted: DTensors with ``Shard`` placements on one 1-D device mesh (FSDP2's layout;
tensor-parallel shards on that same mesh add up the same way). Refused with a clear error:
FSDP1's ``FlatParameter``, DeepSpeed ZeRO-3 partitions, DTensors on a 2-D mesh (HSDP, FSDP + TP)
or with ``Replicate``/``Partial`` placements, and a mix of DTensors and plain tensors.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["ShardBuffer", "ShardGroup", "is_dtensor", "check_param_kind"]


def is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" and hasattr(p, "device_mesh")


def check_param_kind(p: torch.Tensor) -> None:
    """Refuse the parameter kinds whose storage another framework owns in a way we cannot
    follow, naming the supported alternative."""
    # FSDP1 marks its FlatParameter (_is_flat_param; a plain nn.Parameter in torch 2.13) and,
    # with use_orig_params=True, every original parameter (_fsdp_flattened: a view into it).
    if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False) \
            or getattr(p, "_fsdp_flattened", False):
        raise TypeError("params: an FSDP1 parameter (FullyShardedDataParallel's FlatParameter, or a view into one "
                        "with use_orig_params=True) is not supported: its flat storage mixes the shards of many "
                        "tensors; use FSDP2 (torch.distributed.fsdp.fully_shard), or DistributedDataParallel")
    if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
        raise TypeError("params: a DeepSpeed ZeRO partitioned parameter is not supported (DeepSpeed owns its "
                        "partitions and its own optimizer step); use FSDP2 (torch.distributed.fsdp.fully_shard) "
                        "or DistributedDataParallel")
    if is_dtensor(p):
        from torch.distributed.tensor import Shard
        mesh = p.device_mesh
        if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise TypeError(f"params: a DTensor on a {mesh.ndim}-D mesh with placements {tuple(p.placements)} is not "
                            f"supported: the optimizer sums its scalars over one 1-D mesh of Shard placements "
                            f"(FSDP2's fully_shard). HSDP (2-D mesh), tensor parallelism with Replicate/Partial "
                            f"parameters and FSDP + TP are not built yet")


class ShardGroup:
    """The process group that shards the parameters: global scalars are summed over it."""

    def __init__(self, mesh) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place, the sum (or max) of ``t`` over the ranks; returns ``t``."""
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return t

    @staticmethod
    def of(params: Sequence[torch.Tensor]) -> Optional["ShardGroup"]:
        """The group of ``params``' DTensors (None when there are none); every parameter of a
        kind we handle (``check_param_kind``), one mesh for all, and no plain tensor beside the
        DTensors (its sums would be counted once per rank)."""
        for p in params:
            check_param_kind(p)
        sharded = [p for p in params if is_dtensor(p)]
        if not sharded:
            return None
        if len(sharded) != len(params):
            raise TypeError(f"params: {len(params) - len(sharded)} plain tensor(s) beside {len(sharded)} DTensor "
                            f"parameter(s); with FSDP2 apply fully_shard to the root module too, so every "
                            f"parameter is sharded")
        mesh = sharded[0].device_mesh
        for p in sharded:
            if p.device_mesh != mesh:
                raise TypeError(f"params: DTensor parameters on two device meshes ({mesh} and {p.device_mesh}); "
                                f"one optimizer sums its scalars over one mesh")
        return ShardGroup(mesh)


def _local(p: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        local = p.to_local() if is_dtensor(p) else p.detach()
    if not local.is_contiguous():
        raise TypeError(f"params: a parameter whose local tensor (shape {tuple(local.shape)}) is not contiguous "
                        f"is not supported")
    return local


class ShardBuffer:
    """The parameters of one (group, device, dtype), left where they live: ``param`` and
    ``grad`` are lists of the local tensors; ``backup`` and ``psf`` are flat buffers of ours.
    Has the attributes of ``flat.FlatBuffer`` that the optimizers read."""

    sharded = True

    def __init__(self, group_index: int, params: Sequence[torch.Tensor], scaled: bool = False) -> None:
        self.group_index = group_index
        self.scaled = scaled
        self.params: List[torch.Tensor] = list(params)
        self.param: List[torch.Tensor] = [_local(p) for p in self.params]
        first = self.param[0]
        self.device, self.dtype = first.device, first.dtype
        self.offsets: List[int] = []
        total = 0
        for t in self.param:
            self.offsets.append(total)
            total += t.numel()
        self.numel = total
        self.data_ptrs = [t.data_ptr() for t in self.param]
        self.stat_start = total
        self.backup: Optional[torch.Tensor] = None
        self.psf: Optional[torch.Tensor] = None
        self._zeros: dict = {}

    @property
    def grad(self) -> List[torch.Tensor]:
        """The local gradients as they are now (FSDP2 hands over new tensors); a parameter
        without one reads as zeros (the step leaves it to the base optimizer, as torch does)."""
        out = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                g = self._zeros.get(i)
                if g is None:
                    g = self._zeros[i] = torch.zeros_like(self.param[i])
                out.append(g)
            else:
                out.append(g.to_local() if is_dtensor(g) else g)
        return out

    def bounds(self) -> List[int]:
        return self.offsets + [self.numel]

    def new_buffer(self) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def load_weights(self, source: torch.Tensor) -> None:
        """``param <- source`` (a flat buffer of ours, e.g. the saved weights)."""
        torch._foreach_copy_(self.param, [s.view_as(t) for s, t in zip(source.split(self._sizes()), self.param)])

    def _sizes(self) -> List[int]:
        return [t.numel() for t in self.param]

    def moved(self) -> bool:
        """Whether FSDP gave a parameter a new local tensor (e.g. ``model.to()``)."""
        # Every step: the pointers alone (a DTensor's local tensor, without a view per call).
        return any((p._local_tensor if is_dtensor(p) else p).data_ptr() != ptr
                   for p, ptr in zip(self.params, self.data_ptrs))

    def as_dtensors(self, flat: torch.Tensor) -> list:
        """A flat buffer of ours as one DTensor per parameter (views: loading into them writes
        the buffer), sharded as the parameters are: what a sharded checkpoint saves."""
        from torch.distributed.tensor import DTensor
        views = [s.view_as(t) for s, t in zip(flat.split(self._sizes()), self.param)]
        return [DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                   run_check=False) if is_dtensor(p) else v
                for v, p in zip(views, self.params)]

    def export(self, own: torch.Tensor) -> list:
        return self.as_dtensors(own)

    def restore(self, own: torch.Tensor, saved: list) -> None:
        """``own <- saved`` per parameter (DCP may already have loaded into these very views)."""
        for dst, src in zip(self.as_dtensors(own), saved):
            dst_local = dst.to_local() if is_dtensor(dst) else dst
            src_local = src.to_local() if is_dtensor(src) else src
            if src_local.data_ptr() != dst_local.data_ptr():
                dst_local.copy_(src_local.view_as(dst_local))

    def layout(self) -> list:
        return [self.group_index, str(self.dtype), sum(p.numel() for p in self.params),
                [list(p.shape) for p in self.params], "sharded"]
