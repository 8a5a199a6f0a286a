"""ASAM's two flavours: which tensors get the adaptive scale ``T = |w| + eta``.

* ``"official"`` (Kwon et al.'s code; what ``adaptive=True`` means): ``eta = 0.01``, ``T`` on
  weight tensors only (``dim() >= 2``: conv, linear, embedding); biases and norm layers use
  ``T = 1``. The authors suggest ``rho = 0.5`` with SGD on CIFAR.
* ``"davda54"`` (the widely used davda54/sam variant): ``eta = 0``, every tensor; ``rho = 2.0``.

``eta=`` and ``adaptive_params=`` ("weights", "all" or a callable ``f(tensor) -> bool``)
override the flavour's choice.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..arguments import check

__all__ = ["resolve_adaptive", "FLAVOURS"]

FLAVOURS = {"official": (0.01, "weights"), "davda54": (0.0, "all")}

_FILTERS = {"weights": lambda p: p.dim() >= 2, "all": lambda p: True}


def resolve_adaptive(adaptive, eta, adaptive_params) -> Tuple[bool, float, Callable[[torch.Tensor], bool]]:
    """``(enabled, eta, filter)`` from the constructor arguments; clear errors for bad ones."""
    check("SAM", "adaptive", adaptive)
    flavour = FLAVOURS["official" if adaptive in (False, True) else adaptive]
    eta = flavour[0] if check("SAM", "eta", eta) is None else eta
    chosen = flavour[1] if adaptive_params is None else adaptive_params
    if callable(chosen):
        keep: Optional[Callable] = chosen
    elif isinstance(chosen, str) and chosen in _FILTERS:
        keep = _FILTERS[chosen]
    else:
        raise ValueError(f"adaptive_params must be 'weights', 'all' or a callable(tensor) -> bool, got {chosen!r}")
    return adaptive is not False, float(eta), keep
