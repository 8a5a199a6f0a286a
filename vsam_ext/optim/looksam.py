"""LookSAM (Liu et al. 2022): a SAM step every k-th step; in between, each tensor's gradient
gets back the part of the last SAM gradient orthogonal to its own gradient (ALGORITHMS.md)."""
from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch

from ..arguments import check
from ..controller import Periodic
from ..ops.reference import maths_dtype
from ._driver import EPS, TwoPassOptimizer

__all__ = ["LookSAM"]


def _maths_dtype(b) -> torch.dtype:
    """The ops' coefficient dtype for a buffer: fp64 for fp64 buffers, else fp32."""
    return maths_dtype(b.dtype)


class LookSAM(TwoPassOptimizer):
    """LookSAM-k around any ``torch.optim`` base optimizer.

    Refresh step (``steps % k == 0``, the optimizer's own counter): a SAM step; per tensor,
    ``g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||`` is kept. Other steps, one forward/backward:
    per tensor ``g <- g + alpha * ||g|| / (||g_v|| + eps) * g_v``, then the base step.

    * ``k``: the refresh period, an int >= 1. Default 5 (LookSAM-5 of the paper's tables).
    * ``alpha``: the weight of the ``g_v`` term, a float >= 0. Default 0.7.
    * ``rho``: SAM radius, a float >= 0. Default 0.05.
    * ``adaptive``, ``eta``, ``adaptive_params``, ``model``, ``backend``, ``fused_base``,
      ``perturbation``, ``param_storage`` (keyword), and ``**base_kwargs``: as for ``SAM`` (ASAM flavour, offset and
      tensors; the module whose BatchNorm statistics the perturbed pass leaves alone; backend;
      torch SGD/AdamW step fused in; DDP perturbation; the base optimizer's arguments).

    Errors as for ``SAM``. Memory: two parameter-sized buffers (``g_v``, which holds ``g``
    during a refresh, and the weights saved by the perturbation).
    """

    def __init__(self, params, base_optimizer, k: int = 5, alpha: float = 0.7, rho: float = 0.05,
                 *, adaptive: Union[bool, str] = False, eta: Optional[float] = None,
                 adaptive_params: Union[None, str, Callable] = None, model: Optional[torch.nn.Module] = None,
                 backend: Optional[str] = None, fused_base: bool = True, perturbation: str = "global",
                 param_storage: str = "flat",
                 **base_kwargs) -> None:
        self.alpha = check("LookSAM", "alpha", alpha)
        k = check("LookSAM", "k", k)
        self._inv_gv: List[Optional[torch.Tensor]] = []   # per buffer: per tensor 1/(||g_v|| + eps), or 0
        self._ones: List[Optional[torch.Tensor]] = []
        super().__init__(params, base_optimizer, Periodic(k), rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend, fused_base=fused_base,
                         perturbation=perturbation, param_storage=param_storage, **base_kwargs)

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
        """``psf`` holds ``g``, ``grad`` holds ``g_s``: ``psf <- g_v`` per tensor, and per tensor
        ``1 / (||g_v|| + eps)`` for the cheap steps (the spec's
        ``||g_s|| cos(g, g_s) / ||g||`` is written ``<g, g_s> / ||g||^2``: the same number, with
        no eps left in it to leave a residue where g_v is exactly 0). A g_v within rounding of
        zero (``||g_v|| <= 4 ulp * ||g_s||`` of the buffer's dtype: e.g. any 1-element tensor)
        has no direction; those tensors get no term on the cheap steps."""
        self._inv_gv = []
        for i, b in enumerate(self.flat.buffers):
            bounds = b.bounds()
            gram = self._global(self._ops.segment_gram(b.psf, b.grad, bounds))   # (|g|^2, <g, g_s>, |g_s|^2)
            g_sq = gram[:, 0]
            coeff = torch.where(g_sq > 0, gram[:, 1] / torch.where(g_sq > 0, g_sq, 1.0), 0.0)
            gv_sq = self._global(self._ops.segment_axpby(b.psf, b.grad, -coeff.to(_maths_dtype(b)),
                                                         self._ones_for(i, b), bounds))
            noise = 4 * torch.finfo(b.dtype).eps * gram[:, 2].sqrt()
            gv_norm = gv_sq.to(gram.dtype).sqrt()
            self._inv_gv.append(torch.where(gv_norm > noise, 1.0 / (gv_norm + EPS), 0.0))

    def _adjust_cheap_grad(self) -> None:
        for i, (b, inv_gv) in enumerate(zip(self.flat.buffers, self._inv_gv)):
            if inv_gv is None:
                continue
            bounds = b.bounds()
            g_norm = self._global(self._ops.segment_sumsq(b.grad, bounds)).sqrt()
            coeff = self.alpha * g_norm.to(inv_gv.dtype) * inv_gv
            self._ops.segment_axpby(b.grad, b.psf, self._ones_for(i, b), coeff.to(_maths_dtype(b)), bounds)

    def _on_abort(self) -> None:
        self._inv_gv = []          # the g_v buffers hold this step's g now

    def _extra_state(self) -> dict:
        # Every buffer's g_v and 1/||g_v|| are there even before the first SAM step ("present"
        # says which hold one): a sharded checkpoint is loaded into the tensors a state_dict() holds.
        present = [i < len(self._inv_gv) and self._inv_gv[i] is not None for i in range(len(self.flat.buffers))]
        for b in self.flat.buffers:
            if b.psf is None:
                b.psf = b.new_buffer()
        return {"present": present, "gv": [b.export(b.psf) for b in self.flat.buffers],
                "inv_gv": [self._inv_gv[i] if has else
                           torch.zeros(len(b.offsets), dtype=_maths_dtype(b), device=b.device)
                           for i, (b, has) in enumerate(zip(self.flat.buffers, present))]}

    def _load_extra_state(self, state: dict) -> None:
        self._inv_gv = []
        for b, has, gv, inv in zip(self.flat.buffers, state["present"], state["gv"], state["inv_gv"]):
            if not has:
                self._inv_gv.append(None)
                continue
            if b.psf is None:
                b.psf = b.new_buffer()
            b.restore(b.psf, gv)
            self._inv_gv.append(inv.to(device=b.device))
