"""Sharded checkpoints (``torch.distributed.checkpoint``) of an optimizer over FSDP2 parameters.

DCP loads *into* the tensors that ``state_dict()`` returns, so a fresh optimizer must return
every state tensor a trained one has. torch's SGD and AdamW create their state at the first
step; for sharded parameters without state yet, ``state_dict()`` therefore holds zero
placeholders of the fused base optimizer's state (DTensors, sharded as the parameters) and
lists them (``placeholders``); ``load_state_dict`` drops whatever the loaded checkpoint says
was a placeholder, and refuses a checkpoint whose base state would come back incomplete.
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["add_placeholders", "loaded_base_state"]


def _placeholder(base: torch.optim.Optimizer, group: dict, p: torch.Tensor):
    if type(base) is torch.optim.SGD:
        return {"momentum_buffer": torch.zeros_like(p)} if group.get("momentum", 0) != 0 else None
    if type(base) in (torch.optim.Adam, torch.optim.AdamW):
        return {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return None


def add_placeholders(opt, base_sd: dict) -> List[int]:
    """Zero state for the sharded parameters that have none yet (in ``base_sd`` only, not in
    the base optimizer); returns their indices."""
    sharded = {id(p) for b in opt.flat.buffers if b.sharded for p in b.params}
    added = []
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in sharded and index not in base_sd["state"]:
                state = _placeholder(opt.base_optimizer, group, p)
                if state is not None:
                    base_sd["state"][index] = state
                    added.append(index)
            index += 1
    return added


def loaded_base_state(ours: dict, base_sd: dict) -> dict:
    """The base optimizer's state dict to load: without placeholders; ValueError when fewer
    parameters have state than when it was saved (a sharded checkpoint loaded into a fresh
    optimizer whose base we cannot give placeholders: take one step before loading)."""
    drop = set(ours.get("placeholders") or [])
    state = {k: v for k, v in base_sd["state"].items() if k not in drop}
    saved = ours.get("stateful_params")
    if saved is not None and len(state) < saved:
        raise ValueError(f"state_dict: the base optimizer's state of {saved - len(state)} parameter(s) did not come "
                         f"back (a sharded checkpoint loads into the tensors of this optimizer's state_dict(), and "
                         f"this one had none for them); take one step before loading, or use SGD/AdamW as the base")
    return dict(base_sd, state=state)
