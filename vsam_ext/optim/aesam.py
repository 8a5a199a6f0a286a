"""AE-SAM (Jiang et al. 2023): a SAM step only when the squared gradient norm is large compared
with its running statistics (ALGORITHMS.md, "AE-SAM")."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..controller import AESAMController
from ._ddp import mean_across_ranks
from ._driver import TwoPassOptimizer

__all__ = ["AESAM"]


class AESAM(TwoPassOptimizer):
    """AE-SAM around any ``torch.optim`` base optimizer.

    ``total_steps`` (T) is the length of the run in optimizer steps: the threshold coefficient
    moves linearly from ``lambdas[1]`` at step 0 to ``lambdas[0]`` at step T (and stays there).
    The decision needs ``||g||^2`` on the host: one device-to-host read of a scalar per step,
    by construction of the method (on CUDA that is one synchronisation per step). The norm is
    reused by the perturbation of a SAM step.

    * ``total_steps``: T, the run's length in optimizer steps, an int >= 1 (required).
    * ``delta``: δ, the decay of the running mean and variance of ``||g||^2``, in [0, 1).
      Default 0.9.
    * ``lambdas``: (λ1, λ2), the threshold coefficient at step T and at step 0, two finite
      floats. Default (-1, 1).
    * ``rho``: SAM radius, a float >= 0. Default 0.05.
    * ``adaptive``, ``eta``, ``adaptive_params``, ``model``, ``backend``, ``fused_base``,
      ``perturbation``, ``param_storage`` (keyword), and ``**base_kwargs``: as for ``SAM`` (ASAM flavour, offset and
      tensors; the module whose BatchNorm statistics the perturbed pass leaves alone; backend;
      torch SGD/AdamW step fused in; DDP perturbation; the base optimizer's arguments).

    Errors as for ``SAM``. Memory: one parameter-sized buffer (the saved weights).
    """

    def __init__(self, params, base_optimizer, total_steps: int, delta: float = 0.9,
                 lambdas: Sequence[float] = (-1.0, 1.0), rho: float = 0.05, *, adaptive: Union[bool, str] = False, eta: Optional[float] = None,
                 adaptive_params: Union[None, str, Callable] = None, model: Optional[torch.nn.Module] = None,
                 backend: Optional[str] = None, fused_base: bool = True, perturbation: str = "global",
                 param_storage: str = "flat",
                 **base_kwargs) -> None:
        self._norm = None
        super().__init__(params, base_optimizer, AESAMController(total_steps, delta, lambdas), rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend, fused_base=fused_base,
                         perturbation=perturbation, param_storage=param_storage, **base_kwargs)

    def _feed_stats(self, before_decide: bool = False) -> list:
        if not before_decide:
            return []
        sumsq = self._grad_sumsq(scaled=False)
        self._norm = sumsq.sqrt()
        if self._per_rank_ddp is not None:         # rank-consistent decisions; the norm stays local
            sumsq = mean_across_ranks(self._per_rank_ddp, sumsq.clone().reshape(1))[0]
        n = float(sumsq)                           # the one host read per step
        self.controller.push_norm(n)
        return [n]

    def _perturb(self, norm=None, radius_factor: float = 1.0) -> None:
        plain = not any(b.scaled for b in self.flat.buffers)
        super()._perturb(self._norm if norm is None and plain else norm, radius_factor)
        self._norm = None
