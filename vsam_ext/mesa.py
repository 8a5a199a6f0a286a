"""MESA, Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022; the authors' code:
AngusDujw/SAF, ``MESA_train.py``): SAM's second pass replaced by a KL term against the logits of
an exponential moving average of the weights (ALGORITHMS.md, "SAF and MESA")."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._kl_term import (check_epoch, check_kl_arguments, check_logits, compute_dtype, kl_rows, state_values,
                       term_on)
from ._warn import warn_user
from .arguments import check

__all__ = ["MESA"]


class MESA:
    """MESA's loss and its EMA model, used with any optimizer: per step one forward and backward
    of the model and, inside the window, one no-grad forward of the EMA copy::

        mesa = vsam_ext.MESA(model, epochs=200)        # after moving the model to its device
        for epoch in range(200):                       # 0-based, as in the authors' loop
            for x, y in loader:
                loss = mesa.loss(model(x), y, x, epoch)
                opt.zero_grad(); loss.backward(); opt.step()
                mesa.update()                          # after every optimizer step

    ``loss(logits, targets, inputs, epoch)`` returns ``CE(logits, targets) + kl_term(...)``;
    ``kl_term(logits, inputs, epoch)`` the term alone. For ``kl_start_epoch < epoch <
    kl_end_epoch`` the term is

        lam * temperature^2 * (1/B) * sum_i KL(softmax(z_ema,i / T) || softmax(z_i / T))

    with ``z_ema = ema(inputs)`` under ``no_grad`` (``ema(*inputs)`` for a tuple); otherwise a
    zero scalar and no EMA forward. Computed as SAF's (float32 for 16-bit logits).

    The EMA (timm's ``ModelEmaV2``, which the authors' code uses): a deep copy of the model at
    construction, in eval mode (its BatchNorm layers use their running statistics, dropout is
    off) and with ``requires_grad=False``; ``update()`` sets every floating entry ``e`` of its
    ``state_dict`` to ``decay * e + (1 - decay) * m`` from the model's entry ``m`` (the same
    two products and sum as ModelEmaV2, so the same bits), matched by name (a tied tensor
    once: ModelEmaV2 steps it once per name). ``buffers``:
    ``"copy"`` (default, ALGORITHMS.md's rule: "buffers copied") copies floating buffers
    (BatchNorm running statistics) from the model; ``"average"`` averages them too, as timm's
    ModelEmaV2 itself does (ALGORITHMS.md and ModelEmaV2 disagree here; raised with the steering
    notes).
    Integer entries (``num_batches_tracked``) are copied: ModelEmaV2 pushes them through the
    float formula and truncates, and an eval-mode model does not read them. A float16/bfloat16
    model's EMA is kept in its dtype, as in timm: with ``decay = 0.9998`` changes below half a
    unit in the last place are lost, so train in float32 (autocast) as the authors' ``--amp``
    does. A ``DistributedDataParallel`` model is unwrapped (its ``.module`` is copied and read).

    Memory: one copy of the model's parameters and buffers on the model's device
    (``memory_bytes``).

    Arguments (checked through ``vsam_ext.arguments``; defaults: the authors' ``run.sh`` and
    ALGORITHMS.md):

    * ``model``: the ``nn.Module`` being trained, with at least one parameter.
    * ``epochs``: the run's length; epochs are numbered ``0 .. epochs - 1``. Int >= 1.
    * ``lam``: the term's weight (``--reinforce``), float >= 0. Default 0.8 (their script;
      the argparse default in ``MESA_train.py`` is 0.3).
    * ``temperature``: T, float > 0. Default 5.
    * ``decay``: the EMA decay d in [0, 1] (``--model-ema-decay``). Default 0.9998. It counts
      optimizer steps: the EMA's memory is about ``1 / (1 - d)`` = 5000 steps; scale it for a
      run much shorter than the authors' (the training tool does).
    * ``kl_start_epoch``, ``kl_end_epoch``: the term is on for ``start < epoch < end``; ints
      >= 0. Defaults 5 and None (= ``epochs``). A window that holds no epoch of the run gives a
      ``UserWarning``.
    * ``buffers`` (keyword): ``"copy"`` (default) or ``"average"``, above.

    Errors (``TypeError``/``ValueError`` naming the argument and what is allowed): a ``model``
    that is not a module or has no parameter; ``logits`` not a floating ``[B, C]`` tensor; an
    EMA output of another shape than ``logits``, or on another device (build MESA after moving
    the model); ``epoch`` not an int in ``[0, epochs)`` or below the last one seen;
    ``update()`` after the model's ``state_dict`` changed its names or shapes. A ``UserWarning``
    (once) when the term is on and ``update()`` was never called.

    ``state_dict()``: the EMA's ``state_dict`` (its tensors themselves), the number of updates
    and the last epoch seen; ``load_state_dict()`` checks names and shapes before changing
    anything.
    """

    def __init__(self, model: nn.Module, epochs: int, lam: float = 0.8, temperature: float = 5.0,
                 decay: float = 0.9998, kl_start_epoch: int = 5, kl_end_epoch: Optional[int] = None, *,
                 buffers: str = "copy") -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the model being trained), got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"model must have at least one parameter, got a {type(model).__name__} with none")
        self.decay = check("MESA", "decay", decay)
        self.buffers = check("MESA", "buffers", buffers)
        self.epochs, self.lam, self.temperature, self.kl_start_epoch, self.kl_end_epoch = check_kl_arguments(
            "MESA", epochs, lam, temperature, kl_start_epoch, kl_end_epoch)
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self._shapes = self._layout(model.state_dict())
        self.updates = 0
        self.last_epoch = -1
        self._warned = False

    @staticmethod
    def _layout(state: dict) -> dict:
        return {k: tuple(v.shape) for k, v in state.items()}

    @property
    def memory_bytes(self) -> int:
        """Bytes of the EMA copy's parameters and buffers."""
        seen, total = set(), 0
        for t in list(self.ema.parameters()) + list(self.ema.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def term_on(self, epoch: int) -> bool:
        """Whether ``epoch`` has the KL term (``kl_start_epoch < epoch < kl_end_epoch``)."""
        return term_on(epoch, self.kl_start_epoch, self.kl_end_epoch)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the model's current weights (after each optimizer step)."""
        source = self.model.state_dict()
        if self._layout(source) != self._shapes:
            raise ValueError("MESA.update: the model's state_dict names or shapes changed since MESA was built "
                             "(pass the model being trained, and build MESA after changing its layers)")
        d = self.decay
        for name, e, is_param in self._entries():
            m = source[name].to(e.device)
            if e.is_floating_point() and (is_param or self.buffers == "average"):
                e.copy_(d * e + (1.0 - d) * m)
            else:
                e.copy_(m)
        self.updates += 1

    def _entries(self):
        """The EMA's state_dict entries, each tensor once (a tied weight is updated once, where
        ModelEmaV2 steps it once per name): (name, tensor, is a parameter)."""
        keys = set(self.ema.state_dict())
        params = [(n, t, True) for n, t in self.ema.named_parameters()]
        return params + [(n, t, False) for n, t in self.ema.named_buffers() if n in keys]

    def reference(self, inputs) -> torch.Tensor:
        """The EMA model's logits on ``inputs`` (no grad; ``ema(*inputs)`` for a tuple)."""
        with torch.no_grad():
            return self.ema(*inputs) if isinstance(inputs, tuple) else self.ema(inputs)

    def kl_term(self, logits: torch.Tensor, inputs, epoch: int) -> torch.Tensor:
        """The KL term against the EMA's logits on ``inputs`` (a scalar; zero outside the window)."""
        check_logits("MESA", logits)
        epoch = check_epoch("MESA", epoch, self.last_epoch, self.epochs)
        term = torch.zeros((), dtype=compute_dtype(logits.dtype), device=logits.device)
        if self.term_on(epoch):
            if self.updates == 0 and not self._warned:
                self._warned = True
                warn_user("MESA: the KL term is on but update() was never called: the EMA model is still the "
                          "initial model (call mesa.update() after every optimizer step)")
            where = next(self.ema.parameters()).device
            if where != logits.device:
                raise ValueError(f"MESA: the EMA model is on {where}, the logits on {logits.device} (build MESA "
                                 f"after moving the model to its device)")
            ref = self.reference(inputs)
            if not isinstance(ref, torch.Tensor) or ref.shape != logits.shape:
                got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
                raise ValueError(f"MESA: the EMA model's output on inputs is {got}, the logits have shape "
                                 f"{tuple(logits.shape)}: pass the inputs the logits were computed from")
            term = self.lam * self.temperature ** 2 * kl_rows(logits, ref, self.temperature).mean()
        self.last_epoch = epoch
        return term

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, inputs, epoch: int) -> torch.Tensor:
        """``F.cross_entropy(logits, targets) + kl_term(logits, inputs, epoch)`` (the cross-entropy
        in the term's dtype)."""
        check_logits("MESA", logits)
        ce = F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets)
        return ce + self.kl_term(logits, inputs, epoch)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "updates": self.updates, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        ema, updates, last = state_values("MESA", state, ("ema", "updates", "last_epoch"))
        if not isinstance(ema, dict) or not all(isinstance(v, torch.Tensor) for v in ema.values()):
            raise TypeError("MESA.load_state_dict: ema must be a state_dict (names to tensors)")
        mine = self._layout(self.ema.state_dict())
        theirs = self._layout(ema)
        if theirs != mine:
            missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            shapes = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
            raise ValueError(f"MESA.load_state_dict: the EMA weights are of another model (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, other shapes {shapes[:5]})")
        for name, value in (("updates", updates), ("last_epoch", last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ValueError(f"MESA.load_state_dict: {name} must be an int, got {value!r}")
        if last >= self.epochs:
            raise ValueError(f"MESA.load_state_dict: last_epoch must be below epochs={self.epochs}, got {last}")
        self.ema.load_state_dict(ema)
        self.updates, self.last_epoch = updates, last
