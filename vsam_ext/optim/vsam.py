"""vSAM (arXiv 2403.08821): SAM's second pass only on the steps the variation controller samples;
the other steps reuse the last PSF = g_sam - g with weight ``reuse_decay ** age`` (Eq. 17)."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..arguments import check
from ..controller import _SLICES, _WARMUP, _WINDOW, VSAMController
from ..stats_queue import DeferredStats
from ._driver import TwoPassOptimizer, on_one_device

__all__ = ["VSAM"]


class VSAM(TwoPassOptimizer):
    """vSAM (arXiv 2403.08821) around any ``torch.optim`` base optimizer: SAM's second pass only
    on the steps the variation controller samples; the other steps reuse the last PSF.

    ``VSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, total_steps=epochs * len(loader))``.
    The defaults are the authors' CIFAR settings (ALGORITHMS.md, "vSAM").

    * ``rho``: SAM radius, a float >= 0. Default 0.05.
    * ``adaptive``: the ASAM flavour of the perturbation (as for ``SAM``). Default False.
    * ``window``: K, steps per sampling window, an int >= 2. Default 50; with ``total_steps``
      and no ``window``: (steps after warm-up) // 10 clamped to [10, 50].
    * ``slices``: slices of the robust variance, an int in [1, window]. Default 5. The variance
      needs ``2 * slices`` PSF norms in a window, so ``slices <= window // 2`` lets it act; a
      ``window`` below 5 needs ``slices=`` too (the error says so).
    * ``max_rate``: the highest fraction of a window that may be SAM steps, in (0, 1], with
      ``window * max_rate >= 1``. Default 0.8.
    * ``lambdas``: (λ1, λ2), the gains on the ratio change and the variance change, two finite
      floats. Default (0.13, 0.13).
    * ``reuse_decay``: ζ, the PSF reused ``a`` steps after its SAM step weighs ``ζ ** a``, in
      [0, 1); 0 is vSAM-A (no reuse). Default 0.7.
    * ``max_reuse``: cheap steps after a SAM step that still reuse its PSF, an int >= 0. Default 6.
    * ``stat_tensors``: L, the statistics use the last L parameter tensors (registration order),
      an int >= 1. Default 10.
    * ``warmup_steps``: steps that are all SAM steps before sampling starts, an int >= 0.
      Default 1173 (the authors' 3 CIFAR-10 epochs at batch 128); with ``total_steps`` and no
      ``warmup_steps``: ``round(0.1 * total_steps)``. Left at its default with no
      ``total_steps``, the first step warns once (a shorter run would be plain SAM throughout).
    * ``seed``: the controller's ``random.Random`` seed, an int >= 0. Default 0.
    * ``model``, ``backend``: as for ``SAM`` (BatchNorm statistics kept out of the perturbed
      pass; the backend, None for automatic).
    * ``total_steps`` (keyword): the run's length in optimizer steps (e.g. ``epochs *
      len(loader)``), an int >= 1, or None (unknown). Sizes the warm-up and the window to the
      run by the training tool's rule (``vsam_ext.controller.vsam_schedule``); a
      ``warmup_steps`` or ``window`` given wins. A ``warmup_steps >= total_steps`` warns.
    * ``eta``, ``adaptive_params``, ``fused_base``, ``perturbation``, ``param_storage`` (keyword), and
      ``**base_kwargs``: as for ``SAM`` (ASAM offset and tensors; torch SGD/AdamW step fused in;
      DDP perturbation; the base optimizer's arguments).

    ``stats`` adds ``in_warmup``, ``warmup_steps``, ``warmup_steps_left`` and ``total_steps``
    to the common ones. Errors as for ``SAM``.
    Memory: two parameter-sized buffers beyond the base optimizer's state: the PSF (which holds
    ``g`` between the two passes of a SAM step) and the weights saved by the perturbation.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: Union[bool, str] = False,
                 window: int = _WINDOW, slices: int = _SLICES, max_rate: float = 0.8,
                 lambdas: Sequence[float] = (0.13, 0.13), reuse_decay: float = 0.7, max_reuse: int = 6,
                 stat_tensors: int = 10, warmup_steps: int = _WARMUP, seed: int = 0,
                 model: Optional[torch.nn.Module] = None, backend: Optional[str] = None, *,
                 total_steps: Optional[int] = None, eta: Optional[float] = None,
                 adaptive_params: Union[None, str, Callable] = None, fused_base: bool = True,
                 perturbation: str = "global", param_storage: str = "flat", **base_kwargs) -> None:
        self.reuse_decay = check("VSAM", "reuse_decay", reuse_decay)
        self.max_reuse = check("VSAM", "max_reuse", max_reuse)
        stat_tensors = check("VSAM", "stat_tensors", stat_tensors)
        controller = VSAMController(window=window, slices=slices, max_rate=max_rate, lambdas=lambdas,
                                    warmup_steps=warmup_steps, seed=seed, total_steps=total_steps)
        self._pending = DeferredStats(controller.window)
        self.psf_age = 0          # cheap steps since the PSF was formed
        self.has_psf = False
        super().__init__(params, base_optimizer, controller, rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend,
                         stat_tensors=stat_tensors, fused_base=fused_base, perturbation=perturbation,
                         param_storage=param_storage,
                         **base_kwargs)

    def _record_psf(self, pairs) -> None:
        home = self.flat.buffers[0].device
        sums = self._global(torch.stack(on_one_device(pairs, home)).sum(0))
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
        # A sharded checkpoint is loaded into the tensors a state_dict() holds: every buffer
        # is there, even before the first PSF (then unused: has_psf is False).
        return {"psf_age": self.psf_age, "has_psf": self.has_psf,
                "psf": [b.export(self._own_psf(b)) if self.has_psf or b.sharded else None for b in self.flat.buffers]}

    @staticmethod
    def _own_psf(b):
        if b.psf is None:
            b.psf = b.new_buffer()
        return b.psf

    def _load_extra_state(self, state: dict) -> None:
        self.psf_age = int(state["psf_age"])
        self.has_psf = bool(state["has_psf"])
        if self.has_psf:
            for b, saved in zip(self.flat.buffers, state["psf"]):
                if saved is None:                # a buffer added after the last SAM step
                    continue
                b.restore(self._own_psf(b), saved)
