"""vSAM (arXiv 2403.08821): SAM's second pass only on the steps the variation controller samples;
the other steps reuse the last PSF = g_sam - g with weight ``reuse_decay ** age`` (Eq. 17)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..arguments import check
from ..controller import VSAMController
from ..stats_queue import DeferredStats
from ._driver import TwoPassOptimizer, on_one_device

__all__ = ["VSAM"]


class VSAM(TwoPassOptimizer):
    """vSAM around any ``torch.optim`` base optimizer; see README for every argument.

    Memory: two parameter-sized buffers beyond the base optimizer's state: the PSF (which holds
    ``g`` between the two passes of a SAM step) and the weights saved by the perturbation.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 window: int = 50, slices: int = 5, max_rate: float = 0.8,
                 lambdas: Sequence[float] = (0.13, 0.13), reuse_decay: float = 0.7, max_reuse: int = 6,
                 stat_tensors: int = 10, warmup_steps: int = 1173, seed: int = 0,
                 model: Optional[torch.nn.Module] = None, backend: Optional[str] = None, **base_kwargs) -> None:
        self.reuse_decay = check("VSAM", "reuse_decay", reuse_decay)
        self.max_reuse = check("VSAM", "max_reuse", max_reuse)
        stat_tensors = check("VSAM", "stat_tensors", stat_tensors)
        controller = VSAMController(window=window, slices=slices, max_rate=max_rate, lambdas=lambdas,
                                    warmup_steps=warmup_steps, seed=seed)
        self._pending = DeferredStats(controller.window)
        self.psf_age = 0          # cheap steps since the PSF was formed
        self.has_psf = False
        super().__init__(params, base_optimizer, controller, rho=rho, adaptive=adaptive, model=model,
                         backend=backend, stat_tensors=stat_tensors, **base_kwargs)

    def _record_psf(self, pairs) -> None:
        home = self.flat.buffers[0].device
        sums = torch.stack(on_one_device(pairs, home)).sum(0)
        if self._pending.full():
            self._feed_stats()
        self._pending.push(sums)
        self.psf_age = 0
        self.has_psf = True

    def _reuse_coeff(self) -> float:
        self.psf_age += 1
        if self.has_psf and self.psf_age <= self.max_reuse and self.reuse_decay > 0:
            return self.reuse_decay ** self.psf_age
        return 0.0

    def _on_abort(self) -> None:
        self.has_psf = False      # the PSF buffer holds this step's g now, not a PSF

    def _feed_stats(self, before_decide: bool = False) -> list:
        """Hand queued statistics to the controller: always when asked outside a step, and before
        a decision only when the controller reads them (a window boundary)."""
        if before_decide and not self.controller.needs_stats():
            return []
        pairs = [(math.sqrt(psf_sq), math.sqrt(g_sq)) for g_sq, psf_sq in self._pending.drain()]
        for psf_norm, grad_norm in pairs:
            self.controller.push_stats(psf_norm, grad_norm)
        return pairs

    def flush_stats(self) -> List[Tuple[float, float]]:
        """Hand the queued statistics to the controller now and return them, oldest first, as
        (PSF norm, gradient norm) over the last ``stat_tensors`` tensors, one pair per SAM step
        since the last flush. On CUDA this waits for the device once; the optimizer itself
        flushes only at window boundaries, so call it at most every so often (e.g. per epoch)."""
        if self._phase is not None:
            raise RuntimeError("flush_stats() between first_step() and second_step(): finish the step first")
        return self._feed_stats()

    @property
    def stats(self):
        return dict(super().stats, psf_age=self.psf_age)

    def _extra_state(self) -> dict:
        return {"psf_age": self.psf_age, "has_psf": self.has_psf,
                "psf": [b.psf if self.has_psf else None for b in self.flat.buffers]}

    def _load_extra_state(self, state: dict) -> None:
        self.psf_age = int(state["psf_age"])
        self.has_psf = bool(state["has_psf"])
        if self.has_psf:
            for b, saved in zip(self.flat.buffers, state["psf"]):
                if saved is None:                # a buffer added after the last SAM step
                    continue
                if b.psf is None:
                    b.psf = b.new_buffer()
                b.psf.copy_(saved)
