"""SAM-k: a SAM step every k-th step, plain base steps in between (no reuse)."""
from __future__ import annotations

from typing import Optional

import torch

from ..controller import Periodic
from ._driver import TwoPassOptimizer

__all__ = ["PeriodicSAM"]


class PeriodicSAM(TwoPassOptimizer):
    """A SAM step when ``steps % period == 0`` (the first step is one), the base step otherwise."""

    def __init__(self, params, base_optimizer, period: int = 5, rho: float = 0.05, adaptive: bool = False,
                 model: Optional[torch.nn.Module] = None, backend: Optional[str] = None, **base_kwargs) -> None:
        super().__init__(params, base_optimizer, Periodic(period), rho=rho, adaptive=adaptive, model=model,
                         backend=backend, **base_kwargs)
