"""Keep BatchNorm running statistics out of SAM's perturbed forward pass.

A ``_BatchNorm`` with ``track_running_stats=False`` normalises a training batch with the batch
statistics exactly as before, but neither updates ``running_mean``/``running_var`` nor counts
``num_batches_tracked``; in eval mode it still uses the running statistics. So switching the
flag off for the perturbed pass changes nothing but the bookkeeping we want to skip.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_modules", "freeze_running_stats", "unfreeze_running_stats"]


def batchnorm_modules(model: Optional[torch.nn.Module]) -> List[_BatchNorm]:
    if model is None:
        return []
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def freeze_running_stats(modules: List[_BatchNorm]) -> List[bool]:
    previous = [m.track_running_stats for m in modules]
    for m in modules:
        m.track_running_stats = False
    return previous


def unfreeze_running_stats(modules: List[_BatchNorm], previous: List[bool]) -> None:
    for m, flag in zip(modules, previous):
        m.track_running_stats = flag
