"""SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021): a SAM step on every step."""
from __future__ import annotations

from typing import Optional

import torch

from ..controller import EveryStep
from ._driver import TwoPassOptimizer

__all__ = ["SAM"]


class SAM(TwoPassOptimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` base optimizer.

    ``SAM(params, torch.optim.SGD, rho=0.05, adaptive=False, lr=0.1, momentum=0.9)`` (davda54/sam's
    call pattern) or ``SAM(params, base_instance, rho=...)``. ``adaptive=True`` is ASAM with
    ``T = |w|``. ``model=`` keeps BatchNorm running statistics out of the perturbed pass.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 model: Optional[torch.nn.Module] = None, backend: Optional[str] = None, **base_kwargs) -> None:
        super().__init__(params, base_optimizer, EveryStep(), rho=rho, adaptive=adaptive, model=model,
                         backend=backend, **base_kwargs)
