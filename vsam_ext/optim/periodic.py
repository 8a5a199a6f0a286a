"""SAM-k: a SAM step every k-th step, plain base steps in between (no reuse)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..controller import Periodic
from ._driver import TwoPassOptimizer

__all__ = ["PeriodicSAM"]


class PeriodicSAM(TwoPassOptimizer):
    """SAM-k around any ``torch.optim`` base optimizer: a SAM step when ``steps % period == 0``
    (the first step is one), the base optimizer's step on the gradient at ``w`` otherwise.

    * ``period``: k, an int >= 1 (1: plain SAM). Default 5.
    * ``rho``, ``adaptive``, ``eta``, ``adaptive_params``, ``model``, ``backend``,
      ``fused_base``, ``perturbation``, ``param_storage``, ``**base_kwargs``: as for ``SAM`` (radius; ASAM flavour,
      offset and tensors; the module whose BatchNorm statistics the perturbed pass leaves alone;
      backend; torch SGD/AdamW step fused in; DDP perturbation; the base optimizer's arguments).

    Errors as for ``SAM``. Memory: one parameter-sized buffer (the saved weights).
    """

    def __init__(self, params, base_optimizer, period: int = 5, rho: float = 0.05,
                 adaptive: Union[bool, str] = False, model: Optional[torch.nn.Module] = None,
                 backend: Optional[str] = None, *, eta: Optional[float] = None,
                 adaptive_params: Union[None, str, Callable] = None, fused_base: bool = True,
                 perturbation: str = "global", param_storage: str = "flat", **base_kwargs) -> None:
        super().__init__(params, base_optimizer, Periodic(period), rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend, fused_base=fused_base,
                         perturbation=perturbation, param_storage=param_storage, **base_kwargs)
