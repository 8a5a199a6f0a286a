"""AUSAM (Deng et al., AAAI 2025): SAM on a subset of each batch, drawn by per-sample importance
(ALGORITHMS.md, "AUSAM")."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..arguments import check
from ..controller import EveryStep
from ..importance import ImportanceTable
from ._amp import unscale_and_check
from ._driver import TwoPassOptimizer
from ._per_sample import per_sample_losses

__all__ = ["AUSAM"]


class AUSAM(TwoPassOptimizer):
    """AUSAM around any ``torch.optim`` base optimizer.

    ``step(closure, sample_ids)``: ``sample_ids`` are the batch's dataset indices (wrap the
    dataset in ``vsam_ext.IndexedDataset``); the closure follows the per-sample contract of
    ``vsam_ext.optim._per_sample``. While any sample of the batch has never been seen (the
    first epoch), the whole batch is used; afterwards ``ceil(alpha * B)`` samples are drawn
    without replacement, with probabilities from their importances (running mean of
    ``|l(w+e) - l(w)|``) min-max scaled into ``[f_min, f_max(t)]``, and both SAM passes run on
    them. ``f_max(t)`` ramps from ``f_min`` to ``f_max`` over the first ``ramp_epochs`` epochs,
    counted as samples stepped over / ``num_samples``.

    The table (``num_samples`` float64 sums and int64 counts) lives on the host; each step
    reads the previous step's per-sample losses there (on CUDA: one wait per step, at the start
    of the next step). Memory on the device: one parameter-sized buffer (saved weights).
    Two-call form: ``positions = begin(sample_ids)``, the first pass on those positions,
    ``first_step()``, the second pass, ``second_step()``, ``record(loss0, loss1)``.

    * ``num_samples``: the training set's size (the ids run over ``[0, num_samples)``), an
      int >= 1 (required).
    * ``alpha``: the fraction of each batch drawn, in (0, 1]. Default 0.5.
    * ``f_min``, ``f_max``: the range the importances are scaled into, ``0 < f_min <= f_max <=
      1``. Defaults 0.1 and 0.5.
    * ``ramp_epochs``: epochs over which ``f_max(t)`` ramps up from ``f_min``, an int >= 0.
      Default 30.
    * ``rho``: SAM radius, a float >= 0. Default 0.05.
    * ``seed``: the seed of the draw's ``torch.Generator``, an int >= 0. Default 0.
    * ``adaptive``, ``eta``, ``adaptive_params``, ``model``, ``backend``, ``fused_base``,
      ``perturbation``, ``param_storage`` (keyword), and ``**base_kwargs``: as for ``SAM`` (ASAM flavour, offset and
      tensors; the module whose BatchNorm statistics the perturbed pass leaves alone; backend;
      torch SGD/AdamW step fused in; DDP perturbation, where ``"per_rank"`` is not built for
      this method yet (a ``ValueError``); the base optimizer's arguments).

    Errors as for ``SAM``.
    """

    def __init__(self, params, base_optimizer, num_samples: int, alpha: float = 0.5, f_min: float = 0.1,
                 f_max: float = 0.5, ramp_epochs: int = 30, rho: float = 0.05, seed: int = 0,
                 *, adaptive: Union[bool, str] = False, eta: Optional[float] = None,
                 adaptive_params: Union[None, str, Callable] = None, model: Optional[torch.nn.Module] = None,
                 backend: Optional[str] = None, fused_base: bool = True, perturbation: str = "global",
                 param_storage: str = "flat",
                 **base_kwargs) -> None:
        self._table = ImportanceTable(check("AUSAM", "num_samples", num_samples))
        self.alpha = check("AUSAM", "alpha", alpha)
        self.f_min = check("AUSAM", "f_min", f_min)
        self.f_max = check("AUSAM", "f_max", f_max, f_min=self.f_min)
        self.ramp_epochs = check("AUSAM", "ramp_epochs", ramp_epochs)
        self._generator = torch.Generator().manual_seed(check("AUSAM", "seed", seed))
        self.samples_seen = 0
        self.sample_fraction = 1.0
        self._batch_ids: Optional[torch.Tensor] = None     # between begin() and record()
        self._pending = None                               # the last record(), applied lazily
        if perturbation == "per_rank":
            raise ValueError(f"perturbation='per_rank' is not built for {type(self).__name__} yet "
                             f"(its data selection is per rank already)")
        super().__init__(params, base_optimizer, EveryStep(), rho=rho, adaptive=adaptive, eta=eta,
                         adaptive_params=adaptive_params, model=model, backend=backend, fused_base=fused_base,
                         perturbation=perturbation, param_storage=param_storage, **base_kwargs)

    @property
    def table(self) -> ImportanceTable:
        """The importance table, with the last step's update applied."""
        self._apply_pending()
        return self._table

    @property
    def epoch(self) -> int:
        return self.samples_seen // self._table.num_samples

    def current_f_max(self) -> float:
        ramp = 1.0 if self.ramp_epochs == 0 else min(1.0, self.epoch / self.ramp_epochs)
        return self.f_min + (self.f_max - self.f_min) * ramp

    def _apply_pending(self) -> None:
        if self._pending is not None:
            ids, change, copied = self._pending
            self._pending = None
            if copied is not None:
                copied.synchronize()
            self._table.update(ids, change)

    def begin(self, sample_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The positions in the batch to train on this step (sorted), ``None`` for all of them."""
        ids = self._table.check_ids(sample_ids)
        self._apply_pending()
        positions = self._table.select(ids, self.alpha, self.f_min, self.current_f_max(), self._generator)
        self._batch_ids = ids if positions is None else ids[positions]
        self.samples_seen += ids.numel()
        self.sample_fraction = 1.0 if positions is None else positions.numel() / ids.numel()
        return positions

    def record(self, loss0: torch.Tensor, loss1: torch.Tensor) -> None:
        """After ``second_step()``: the per-sample losses of the two passes (at ``w`` and at
        ``w + e``) of the samples ``begin()`` chose, for their importances."""
        if self._batch_ids is None:
            raise RuntimeError("record() without begin(sample_ids)")
        n = self._batch_ids.numel()
        if loss0.shape != (n,) or loss1.shape != (n,):
            raise ValueError(f"record(): expected two per-sample losses of shape [{n}], got "
                             f"{tuple(loss0.shape)} and {tuple(loss1.shape)}")
        change, copied = (loss1.detach() - loss0.detach()).abs(), None
        if change.device.type == "cuda":      # read on the host at the next begin(), not now
            change = torch.empty(n, dtype=change.dtype, pin_memory=True).copy_(change, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self._pending = (self._batch_ids, change, copied)
        self._batch_ids = None

    @torch.compiler.disable
    def step(self, closure: Optional[Callable] = None, sample_ids: Optional[torch.Tensor] = None,
             grad_scaler=None):
        if closure is None or sample_ids is None:
            raise TypeError("AUSAM.step(closure, sample_ids) needs a closure(indices) that returns per-sample "
                            "losses and the batch's dataset indices (see vsam_ext.IndexedDataset)")
        with self._stepping():
            return self._per_sample_step(closure, sample_ids, grad_scaler)

    def _per_sample_step(self, closure: Callable, sample_ids: torch.Tensor, grad_scaler):
        seen = self.samples_seen
        positions = self.begin(sample_ids)
        expected = len(sample_ids) if positions is None else positions.numel()
        if positions is not None:
            positions = positions.to(self.flat.buffers[0].device, non_blocking=True)
        self.zero_grad()
        try:
            loss0 = per_sample_losses(self, closure, positions, expected, backward=True, grad_scaler=grad_scaler)
            if not unscale_and_check(self, grad_scaler, first_pass=True):
                return self._skip_batch(loss0, seen)
            snapshot = self._decision_snapshot(grad_scaler)
            self.first_step()
            second = []                         # the per-sample losses at w + e

            def second_pass():
                second.append(per_sample_losses(self, closure, positions, expected, backward=True,
                                                grad_scaler=grad_scaler))
            if not self._second_pass(second_pass, grad_scaler, snapshot):
                return self._skip_batch(loss0, seen)
        except BaseException:
            self._batch_ids = None
            raise
        (loss1,) = second
        self.second_step()
        self.record(loss0, loss1)
        return loss0.mean()

    def _skip_batch(self, loss0: torch.Tensor, seen: int):
        """An overflowed step: the batch counts as not stepped over (the draw is not undone)."""
        self._batch_ids = None
        self.samples_seen = seen
        return self._skip(loss0.mean())

    @property
    def stats(self):
        return dict(super().stats, sample_fraction=self.sample_fraction, epoch=self.epoch,
                    f_max=self.current_f_max())

    def _extra_state(self) -> dict:
        self._apply_pending()
        return {"table": self._table.state_dict(), "samples_seen": self.samples_seen,
                "generator": self._generator.get_state()}

    def _load_extra_state(self, state: dict) -> None:
        self._pending = None
        self._table.load_state_dict(state["table"])
        self.samples_seen = int(state["samples_seen"])
        self._generator.set_state(state["generator"])
