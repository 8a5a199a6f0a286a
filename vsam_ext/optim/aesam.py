"""AE-SAM (Jiang et al. 2023): a SAM step only when the squared gradient norm is large compared
with its running statistics (ALGORITHMS.md, "AE-SAM")."""
from __future__ import annotations

from typing import Sequence

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
    reused by the perturbation of a SAM step. Memory: one parameter-sized buffer (the saved
    weights). Other arguments as for ``SAM``.
    """

    def __init__(self, params, base_optimizer, total_steps: int, delta: float = 0.9,
                 lambdas: Sequence[float] = (-1.0, 1.0), rho: float = 0.05, **kwargs) -> None:
        self._norm = None
        super().__init__(params, base_optimizer, AESAMController(total_steps, delta, lambdas), rho=rho, **kwargs)

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
