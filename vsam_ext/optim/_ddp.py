"""Per-rank perturbation under DistributedDataParallel ("m-sharpness").

With ``perturbation="per_rank"`` the first pass runs under ``ddp.no_sync()``: each rank
perturbs its weights along its own gradient. What must stay the same on every rank is then
made so by hand, with one all-reduce (mean) of the flat buffers where it is needed:

* a cheap step uses the first pass's gradient: it is averaged before the base step;
* a SAM step keeps ``g`` for the PSF (vSAM) or for ``g_v`` (LookSAM): the kept copy is
  averaged, so the PSF is ``g_s - mean(g)`` on every rank (``g_s`` is averaged by DDP);
* AE-SAM's ``||g||^2`` is averaged over the ranks before the decision.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..arguments import check

__all__ = ["check_perturbation", "mean_across_ranks"]


def check_perturbation(perturbation: str, model) -> Optional[torch.nn.Module]:
    """The DDP module when ``perturbation == "per_rank"``, else None; clear errors."""
    if check("SAM", "perturbation", perturbation) == "global":
        return None
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("perturbation='per_rank' needs model= the DistributedDataParallel module (its no_sync() "
                         f"runs the first pass), got {type(model).__name__}")
    return model


def mean_across_ranks(ddp: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``tensor`` over the DDP module's process group."""
    group = ddp.process_group
    torch.distributed.all_reduce(tensor, group=group)
    return tensor.div_(torch.distributed.get_world_size(group))
