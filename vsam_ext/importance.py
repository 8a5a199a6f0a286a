"""AUSAM's per-sample importance table and its sampling rule (ALGORITHMS.md, "AUSAM").

The table holds, per dataset index, the sum and the count of ``|l(w+e) - l(w)|`` seen so far,
in float64 on the host. Sampling runs on the host too, with the optimizer's seeded CPU
generator, so the draws are reproducible and need no device work.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["ImportanceTable"]


class ImportanceTable:
    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.sum = torch.zeros(num_samples, dtype=torch.float64)
        self.count = torch.zeros(num_samples, dtype=torch.int64)

    def check_ids(self, sample_ids) -> torch.Tensor:
        """``sample_ids`` as a 1-D int64 CPU tensor; clear errors for anything else."""
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids must be a 1-D integer tensor of dataset indices (see "
                            f"vsam_ext.IndexedDataset), got {type(sample_ids).__name__}")
        if sample_ids.dim() != 1 or sample_ids.numel() == 0 or sample_ids.dtype.is_floating_point \
                or sample_ids.dtype == torch.bool or sample_ids.is_complex():
            raise ValueError(f"sample_ids must be a non-empty 1-D integer tensor, got dtype {sample_ids.dtype} "
                             f"and shape {tuple(sample_ids.shape)}")
        ids = sample_ids.detach().to("cpu", torch.int64)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.num_samples:
            raise ValueError(f"sample_ids must lie in [0, num_samples={self.num_samples}), got values in "
                             f"[{low}, {high}]")
        return ids

    def select(self, ids: torch.Tensor, alpha: float, f_min: float, f_max: float,
               generator: torch.Generator) -> Optional[torch.Tensor]:
        """Positions (sorted, CPU int64) of the ``ceil(alpha * B)`` samples to train on, drawn
        without replacement with probabilities from the min-max scaled importances; ``None``
        (the whole batch) while any sample of the batch has never been seen."""
        if bool((self.count[ids] == 0).any()):
            return None
        imp = self.sum[ids] / self.count[ids]
        low, high = imp.min(), imp.max()
        if high > low:
            scores = f_min + (imp - low) / (high - low) * (f_max - f_min)
        else:
            scores = torch.ones_like(imp)
        k = math.ceil(alpha * ids.numel())
        draw = torch.multinomial(scores / scores.sum(), k, replacement=False, generator=generator)
        return draw.sort().values

    def update(self, ids: torch.Tensor, change: torch.Tensor) -> None:
        """``sum += |change|``, ``count += 1`` for each of ``ids`` (distinct within a batch is not
        required: a repeated index is counted once per occurrence)."""
        change = change.detach().to("cpu", torch.float64).abs()
        self.sum.index_add_(0, ids, change)
        self.count.index_add_(0, ids, torch.ones_like(ids))

    def state_dict(self) -> dict:
        return {"sum": self.sum.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["sum"].numel() != self.num_samples:
            raise ValueError(f"state_dict: importance table of {state['sum'].numel()} samples, this optimizer "
                             f"has num_samples={self.num_samples}")
        self.sum.copy_(state["sum"])
        self.count.copy_(state["count"])
