"""What SAF and MESA share (ALGORITHMS.md, "SAF and MESA"): the KL term against reference
logits, its epoch window, and the checks of the epoch and the logits.

    term = lam * T^2 * (1/B) * sum_i KL( softmax(z_ref,i / T) || softmax(z_i / T) )

computed with ``log_softmax`` (the authors' code takes ``softmax(...).log()``: the same value,
without its underflow to -inf), in float32 for float16/bfloat16 logits (as autocast runs
softmax) and in the logits' dtype otherwise. No gradient flows into ``z_ref``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._warn import warn_user
from .arguments import check

__all__ = ["compute_dtype", "kl_rows", "term_on", "check_epoch", "check_logits", "check_kl_arguments",
           "state_values"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kl_rows(logits: torch.Tensor, ref: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(ref_i / T) || softmax(logits_i / T))`` per row, shape ``[B]``, in
    ``compute_dtype(logits.dtype)``; differentiable in ``logits`` only."""
    dtype = compute_dtype(logits.dtype)
    log_q = F.log_softmax(logits.to(dtype) / temperature, dim=1)
    p = F.softmax(ref.detach().to(dtype) / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(dim=1)


def term_on(epoch: int, start: int, end: int) -> bool:
    """The authors' window: the term is on for ``start < epoch < end`` (0-based epochs)."""
    return start < epoch < end


def check_kl_arguments(owner: str, epochs, lam, temperature, kl_start_epoch, kl_end_epoch
                       ) -> Tuple[int, float, float, int, int]:
    """The shared arguments checked through the arguments table, ``kl_end_epoch`` None resolved
    to ``epochs``; a ``UserWarning`` when no epoch of the run has the term."""
    epochs = check(owner, "epochs", epochs)
    lam = check(owner, "lam", lam)
    temperature = check(owner, "temperature", temperature)
    start = check(owner, "kl_start_epoch", kl_start_epoch)
    end = check(owner, "kl_end_epoch", kl_end_epoch)
    end = epochs if end is None else end
    if start + 1 >= min(end, epochs):            # no e in [0, epochs) with start < e < end
        warn_user(f"{owner}: the KL term is on for no epoch of this run (it is on for kl_start_epoch={start} < "
                  f"epoch < kl_end_epoch={end}, epochs numbered 0 to epochs-1={epochs - 1}); the loss is plain "
                  f"cross-entropy throughout")
    return epochs, lam, temperature, start, end


def check_epoch(owner: str, epoch, last: int, epochs: int) -> int:
    """``epoch`` if it is an int in ``[max(last, 0), epochs)``, else a TypeError/ValueError."""
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"{owner}: epoch must be an int (the 0-based epoch number), got "
                        f"{type(epoch).__name__} {epoch!r}")
    if epoch < 0 or epoch >= epochs:
        raise ValueError(f"{owner}: epoch must be in [0, epochs={epochs}) (0-based: the first epoch is 0), "
                         f"got {epoch}")
    if epoch < last:
        raise ValueError(f"{owner}: epoch must not go backwards: got {epoch} after epoch {last} (to resume an "
                         f"earlier run, build a new object and load_state_dict its checkpoint)")
    return epoch


def check_logits(owner: str, logits, num_classes: Optional[int] = None) -> torch.Tensor:
    """``logits`` if it is a floating ``[B, C]`` tensor with ``B >= 1`` (and ``C == num_classes``)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{owner}: logits must be a tensor of shape [batch, classes], got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{owner}: logits must be a floating-point tensor (float16, bfloat16, float32, float64), "
                        f"got dtype {logits.dtype}")
    classes = "classes" if num_classes is None else f"num_classes={num_classes}"
    if logits.dim() != 2 or logits.shape[0] == 0 or (num_classes is not None and logits.shape[1] != num_classes):
        raise ValueError(f"{owner}: logits must have shape [batch >= 1, {classes}], got {tuple(logits.shape)}")
    if num_classes is None and logits.shape[1] < 2:
        raise ValueError(f"{owner}: logits must have at least 2 classes, got shape {tuple(logits.shape)}")
    return logits


def state_values(owner: str, state, keys: Tuple[str, ...]) -> tuple:
    """``state[k]`` for each of ``keys``, or a ValueError saying what ``load_state_dict`` expects."""
    if not isinstance(state, dict) or not set(keys) <= set(state):
        got = type(state).__name__ + (f" with keys {sorted(state)}" if isinstance(state, dict) else "")
        raise ValueError(f"{owner}.load_state_dict: expected {owner}.state_dict() (keys {', '.join(keys)}), "
                         f"got {got}")
    return tuple(state[k] for k in keys)
