"""SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021): a SAM step on every step."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..controller import EveryStep
from ._driver import TwoPassOptimizer

__all__ = ["SAM"]


class SAM(TwoPassOptimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) around any ``torch.optim`` base optimizer:
    a SAM step (two forward/backward passes) on every step; ``adaptive=True`` is ASAM.

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)`` (davda54/sam's call pattern)
    or ``SAM(params, base_instance, rho=0.05)``.

    Arguments (every optimizer of the package takes the ones from ``rho`` on):

    * ``params``: an iterable of tensors or of param-group dicts (a group may set ``rho``,
      ``adaptive`` (a bool) and ``eta`` of its own, and the base optimizer's options).
    * ``base_optimizer``: a ``torch.optim.Optimizer`` class, built on the same param groups with
      ``**base_kwargs`` (``lr``, ``momentum``, ...); or an instance built on the same
      parameters (then ``**base_kwargs`` must be empty).
    * ``rho``: the SAM radius, a float >= 0. Default 0.05.
    * ``adaptive``: ASAM (Kwon et al. 2021): ``False``; ``True`` or ``"official"`` (``T = |w| +
      eta`` with ``eta = 0.01`` on weight tensors only); ``"davda54"`` (``eta = 0``, every tensor).
    * ``eta`` (keyword): ASAM's offset in ``T = |w| + eta``, a float >= 0; None: the flavour's.
    * ``adaptive_params`` (keyword): the tensors ASAM scales: ``"weights"`` (``dim() >= 2``),
      ``"all"``, or a callable ``f(tensor) -> bool``; None: the flavour's.
    * ``model``: the ``nn.Module`` being trained (or its DDP wrapper): its BatchNorm running
      statistics are kept out of the perturbed pass. None: they are updated by both passes.
    * ``backend``: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``, or None (the fastest
      one available for the parameters' device; ``VSAM_EXT_BACKEND`` overrides).
    * ``fused_base`` (keyword): take torch SGD's / AdamW's step inside our fused passes (a bool,
      default True); other base optimizers always run their own ``step()``.
    * ``perturbation`` (keyword): ``"global"`` (default: the perturbation from the gradient
      all-reduced by DDP) or ``"per_rank"`` (each rank from its own gradient, "m-sharpness";
      needs ``model=`` the ``DistributedDataParallel`` module).
    * ``param_storage`` (keyword): ``"flat"`` (default: the parameters and gradients of each
      (group, device, dtype) are packed into one buffer; ``.grad`` are views of it, zeroed in
      place) or ``"in_place"`` (they stay where they live, ``.grad`` is torch's own and
      ``zero_grad`` sets it to None; the ops run over tensor lists). FSDP2's sharded DTensor
      parameters are always in place. Same results bit for bit (python_tests/test_layouts.py).
    * ``**base_kwargs``: the base optimizer's arguments.

    Errors: a wrong type is a ``TypeError``, a value out of range a ``ValueError``, each naming
    the argument and what is allowed (``vsam_ext.arguments``); a keyword argument that is neither
    ours nor the base optimizer's is a ``TypeError`` naming the closest match.
    Memory: one parameter-sized buffer beyond the base optimizer's state (the saved weights).
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: Union[bool, str] = False,
                 model: Optional[torch.nn.Module] = None, backend: Optional[str] = None, *,
                 eta: Optional[float] = None, adaptive_params: Union[None, str, Callable] = None,
                 fused_base: bool = True, perturbation: str = "global",
                 param_storage: str = "flat", **base_kwargs) -> None:
        super().__init__(params, base_optimizer, EveryStep(), rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend, fused_base=fused_base,
                         perturbation=perturbation, param_storage=param_storage, **base_kwargs)
