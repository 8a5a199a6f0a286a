"""ESAM (Du et al. 2022a): SAM with stochastic weight perturbation (SWP) and sharpness-sensitive
data selection (SDS) (ALGORITHMS.md, "ESAM")."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Union

import torch

from ..arguments import check
from ..controller import EveryStep
from ._amp import unscale_and_check
from ._driver import TwoPassOptimizer
from ._per_sample import per_sample_losses

__all__ = ["ESAM"]


class ESAM(TwoPassOptimizer):
    """ESAM around any ``torch.optim`` base optimizer.

    * SWP: each parameter tensor joins this step's perturbation with probability ``beta``
      (drawn from the optimizer's generator, seeded with ``seed``); the others get
      ``requires_grad=False`` for the first pass, so autograd skips their weight gradients,
      and are not perturbed. The radius is ``rho / beta``. ``beta=1`` turns SWP off.
    * SDS: after the perturbation, a no-grad forward gives each sample's loss at ``w + e``;
      the second forward/backward runs on the ``ceil(gamma * B)`` samples whose loss rose most.
      ``gamma=1`` turns SDS off (and skips that forward).

    ``step(closure)``: the closure follows the per-sample contract of
    ``vsam_ext.optim._per_sample`` (``closure(indices) -> per-sample losses``, no backward);
    it returns the first pass's mean loss. The two-call form (``first_step``, ``select``,
    ``second_step``) is there too.

    * ``beta``: the probability that a tensor joins the perturbation, in (0, 1]. Default 0.5.
    * ``gamma``: the fraction of the batch the second pass runs on, in (0, 1]. Default 0.5.
    * ``rho``: SAM radius, a float >= 0. Default 0.05.
    * ``seed``: the seed of SWP's ``torch.Generator``, an int >= 0. Default 0.
    * ``adaptive``, ``eta``, ``adaptive_params``, ``model``, ``backend``, ``fused_base``,
      ``perturbation``, ``param_storage`` (keyword), and ``**base_kwargs``: as for ``SAM`` (ASAM flavour, offset and
      tensors; the module whose BatchNorm statistics the perturbed pass leaves alone; backend;
      torch SGD/AdamW step fused in; DDP perturbation, where ``"per_rank"`` is not built for
      this method yet (a ``ValueError``); the base optimizer's arguments).

    Errors as for ``SAM``. Memory: one parameter-sized buffer (saved weights).
    """

    def __init__(self, params, base_optimizer, beta: float = 0.5, gamma: float = 0.5, rho: float = 0.05,
                 seed: int = 0, *, adaptive: Union[bool, str] = False, eta: Optional[float] = None,
                 adaptive_params: Union[None, str, Callable] = None, model: Optional[torch.nn.Module] = None,
                 backend: Optional[str] = None, fused_base: bool = True, perturbation: str = "global",
                 param_storage: str = "flat",
                 **base_kwargs) -> None:
        self.beta = check("ESAM", "beta", beta)
        self.gamma = check("ESAM", "gamma", gamma)
        self._generator = torch.Generator().manual_seed(check("ESAM", "seed", seed))
        self.sample_fraction = 1.0
        self.weight_fraction = 1.0
        self._swp_drawn = False
        if perturbation == "per_rank":
            raise ValueError(f"perturbation='per_rank' is not built for {type(self).__name__} yet "
                             f"(its data selection is per rank already)")
        super().__init__(params, base_optimizer, EveryStep(), rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend, fused_base=fused_base,
                         perturbation=perturbation, param_storage=param_storage, **base_kwargs)

    def _draw_dropped(self) -> List[torch.Tensor]:
        """SWP: the tensors left out of this step's perturbation."""
        managed = self.flat.managed
        if self.beta >= 1.0:
            self.weight_fraction = 1.0
            return []
        keep = torch.rand(len(managed), generator=self._generator) < self.beta
        self.weight_fraction = float(keep.float().mean())
        return [p for p, k in zip(managed, keep.tolist()) if not k and p.requires_grad]

    def _perturb(self, norm=None, radius_factor: float = 1.0) -> None:
        super()._perturb(norm, radius_factor / self.beta)

    @torch.compiler.disable
    def step(self, closure: Optional[Callable] = None, grad_scaler=None):
        if closure is None:
            raise TypeError("ESAM.step() needs a closure(indices) that returns per-sample losses "
                            "(see the ESAM docstring), or use first_step() / select() / second_step()")
        with self._stepping():
            return self._per_sample_step(closure, grad_scaler)

    def _per_sample_step(self, closure: Callable, grad_scaler):
        self.zero_grad()
        dropped = self._draw_dropped()
        self._swp_drawn = True
        try:
            for p in dropped:
                p.requires_grad_(False)
            # Every tensor left out (likely with few tensors): nothing to differentiate, e = 0.
            everything = len(dropped) == sum(p.requires_grad for p in self.flat.managed) + len(dropped)
            loss0 = per_sample_losses(self, closure, None, None, backward=True, allow_no_graph=everything,
                                      grad_scaler=grad_scaler)
        except BaseException:
            self._swp_drawn = False
            raise
        finally:
            for p in dropped:
                p.requires_grad_(True)
        batch = loss0.numel()
        if not unscale_and_check(self, grad_scaler, first_pass=True):
            self._swp_drawn = False
            return self._skip(loss0.mean())
        snapshot = self._decision_snapshot(grad_scaler)
        self.first_step()

        def second_pass():
            indices = None
            if self.gamma < 1.0:
                indices = self.select(loss0, per_sample_losses(self, closure, None, batch, backward=False))
            per_sample_losses(self, closure, indices, batch if indices is None else indices.numel(), backward=True,
                              grad_scaler=grad_scaler)
        if not self._second_pass(second_pass, grad_scaler, snapshot):
            return self._skip(loss0.mean())
        self.second_step()
        return loss0.mean()

    def first_step(self, zero_grad: bool = True) -> bool:
        """Two-call form: after the first backward on the whole batch. SWP is drawn here: the
        gradients of the tensors left out are zeroed (no time saved; ``step()`` saves it).
        Then run ``select(loss0, loss_perturbed)`` if you want SDS, the second pass, and
        ``second_step()``."""
        if not self._swp_drawn and self._phase is None:
            for p in self._draw_dropped():
                if p.grad is not None:
                    p.grad.zero_()
        self._swp_drawn = False
        return super().first_step(zero_grad)

    def select(self, loss0: torch.Tensor, loss_perturbed: torch.Tensor) -> Optional[torch.Tensor]:
        """SDS: the positions (sorted) of the ``ceil(gamma * B)`` samples whose loss rose most
        from ``loss0`` (at ``w``) to ``loss_perturbed`` (at ``w + e``); ``None`` when
        ``gamma == 1``. Ties go to the lower batch position (a stable descending sort), so the
        choice is the same on every device (ALGORITHMS.md, ESAM; ``topk`` picks ties differently
        on CUDA and CPU): a step whose SWP kept no tensor (all rises 0) keeps the first ``k``."""
        if loss0.shape != loss_perturbed.shape or loss0.dim() != 1:
            raise ValueError(f"select(): loss0 and loss_perturbed must be per-sample losses of one shape [B], "
                             f"got {tuple(loss0.shape)} and {tuple(loss_perturbed.shape)}")
        if self.gamma >= 1.0:
            self.sample_fraction = 1.0
            return None
        k = math.ceil(self.gamma * loss0.numel())
        self.sample_fraction = k / loss0.numel()
        rise = loss_perturbed.detach() - loss0.detach()
        return torch.sort(rise, descending=True, stable=True).indices[:k].sort().values

    @property
    def stats(self):
        return dict(super().stats, sample_fraction=self.sample_fraction, weight_fraction=self.weight_fraction)

    def _extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def _load_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
