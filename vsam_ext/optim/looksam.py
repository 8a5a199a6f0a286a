"""LookSAM (Liu et al. 2022): a SAM step every k-th step; in between, each tensor's gradient
gets back the part of the last SAM gradient orthogonal to its own gradient (ALGORITHMS.md)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..arguments import check
from ..controller import Periodic
from ._driver import EPS, TwoPassOptimizer

__all__ = ["LookSAM"]


def _maths_dtype(b) -> torch.dtype:
    """The ops' coefficient dtype for a buffer: fp64 for fp64 buffers, else fp32."""
    return torch.float64 if b.dtype == torch.float64 else torch.float32


class LookSAM(TwoPassOptimizer):
    """LookSAM-k around any ``torch.optim`` base optimizer.

    Refresh step (``steps % k == 0``, the optimizer's own counter): a SAM step; per tensor,
    ``g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||`` is kept. Other steps, one forward/backward:
    per tensor ``g <- g + alpha * ||g|| / (||g_v|| + eps) * g_v``, then the base step.

    Memory: two parameter-sized buffers (``g_v``, which holds ``g`` during a refresh, and the
    weights saved by the perturbation). Other arguments as for ``SAM``.
    """

    def __init__(self, params, base_optimizer, k: int = 5, alpha: float = 0.7, rho: float = 0.05,
                 **kwargs) -> None:
        self.alpha = check("LookSAM", "alpha", alpha)
        k = check("LookSAM", "k", k)
        self._gv_sq: List[Optional[torch.Tensor]] = []    # per buffer: per-tensor ||g_v||^2 (fp32)
        self._ones: List[Optional[torch.Tensor]] = []
        super().__init__(params, base_optimizer, Periodic(k), rho=rho, **kwargs)

    @property
    def k(self) -> int:
        return self.controller.period

    @property
    def _keeps_grad(self) -> bool:
        return True

    def _ones_for(self, i: int, b) -> torch.Tensor:
        while len(self._ones) <= i:
            self._ones.append(None)
        if self._ones[i] is None:
            self._ones[i] = torch.ones(len(b.offsets), dtype=_maths_dtype(b), device=b.device)
        return self._ones[i]

    def _after_second_pass(self) -> None:
        """``psf`` holds ``g``, ``grad`` holds ``g_s``: ``psf <- g_v`` per tensor."""
        self._gv_sq = []
        for i, b in enumerate(self.flat.buffers):
            bounds = b.bounds()
            gram = self._ops.segment_gram(b.psf, b.grad, bounds)       # (|g|^2, <g, g_s>, |g_s|^2)
            g_norm, gs_norm = gram[:, 0].sqrt(), gram[:, 2].sqrt()
            cos = gram[:, 1] / (g_norm * gs_norm + EPS)
            coeff = gs_norm * cos / (g_norm + EPS)
            self._gv_sq.append(self._ops.segment_axpby(b.psf, b.grad, -coeff.to(_maths_dtype(b)),
                                                       self._ones_for(i, b), bounds))

    def _adjust_cheap_grad(self) -> None:
        for i, (b, gv_sq) in enumerate(zip(self.flat.buffers, self._gv_sq)):
            if gv_sq is None:
                continue
            bounds = b.bounds()
            g_norm = self._ops.segment_sumsq(b.grad, bounds).sqrt()
            coeff = self.alpha * g_norm / (gv_sq.sqrt() + EPS)
            self._ops.segment_axpby(b.grad, b.psf, self._ones_for(i, b), coeff.to(_maths_dtype(b)), bounds)

    def _on_abort(self) -> None:
        self._gv_sq = []          # the g_v buffers hold this step's g now

    def _extra_state(self) -> dict:
        return {"gv": [b.psf if gv is not None else None for b, gv in zip(self.flat.buffers, self._gv_sq)],
                "gv_sq": list(self._gv_sq)}

    def _load_extra_state(self, state: dict) -> None:
        self._gv_sq = []
        for b, gv, gv_sq in zip(self.flat.buffers, state["gv"], state["gv_sq"]):
            if gv is None:
                self._gv_sq.append(None)
                continue
            if b.psf is None:
                b.psf = b.new_buffer()
            b.psf.copy_(gv)
            self._gv_sq.append(gv_sq.to(device=b.device, dtype=torch.float32))
