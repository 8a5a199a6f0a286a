"""The closure contract of the data-selecting optimizers (ESAM, AUSAM).

``closure(indices)``: ``indices`` is ``None`` (the whole batch) or a 1-D int64 tensor of
positions in the batch, sorted ascending. The closure runs the forward on those samples and
returns their per-sample losses (shape ``[len(indices)]``, or ``[B]`` for ``None``) without
calling backward: the optimizer runs ``losses.mean().backward()`` when it needs gradients and
calls the closure under ``torch.no_grad()`` when it only needs the losses::

    def closure(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

__all__ = ["per_sample_losses"]

_CONTRACT = ("the closure must take `indices` (None or positions in the batch) and return one loss per "
             "selected sample, e.g. F.cross_entropy(out, y, reduction='none'), without calling backward")


def per_sample_losses(opt, closure: Callable, indices: Optional[torch.Tensor], expected: Optional[int],
                      backward: bool, allow_no_graph: bool = False, grad_scaler=None) -> torch.Tensor:
    """Call ``closure(indices)``, check what it returns, and when ``backward`` run the mean's
    backward (through ``grad_scaler.scale`` when given; skipped when ``allow_no_graph`` and
    nothing in the losses requires grad). Returns the detached losses."""
    name = type(opt).__name__
    try:
        inspect.signature(closure).bind(indices)
    except TypeError:
        raise TypeError(f"{name}: the closure cannot be called as closure(indices); {_CONTRACT}") from None
    except ValueError:
        pass                                # no signature to read (a builtin): the call decides
    flat = opt.flat
    flat.accepting = False                  # a gradient arriving now means the closure ran backward
    try:
        if backward:
            with torch.enable_grad():
                out = closure(indices)
        else:
            with torch.no_grad():
                out = closure(indices)
    finally:
        flat.accepting = True
        ran_backward, flat.late_grad = flat.late_grad, False
    if ran_backward:
        raise RuntimeError(f"{name}: the closure ran backward itself; {_CONTRACT}")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: the closure returned {type(out).__name__}; {_CONTRACT}")
    if out.dim() != 1 or (expected is not None and out.numel() != expected):
        want = "[B]" if expected is None else f"[{expected}]"
        raise ValueError(f"{name}: the closure returned losses of shape {tuple(out.shape)}, expected {want} "
                         f"(indices={'None' if indices is None else f'{indices.numel()} positions'}); {_CONTRACT}")
    if out.numel() == 0:
        raise ValueError(f"{name}: the closure returned no losses (an empty batch)")
    if backward and not (allow_no_graph and not out.requires_grad):
        if not out.requires_grad:
            raise RuntimeError(f"{name}: the closure returned losses that do not require grad (detached, or "
                               f"computed under no_grad); {_CONTRACT}")
        mean = out.mean()
        (grad_scaler.scale(mean) if grad_scaler is not None else mean).backward()
    return out.detach()
