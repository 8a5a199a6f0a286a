"""Device scalars for the fused steps: what a captured (CUDA graph) step reads at replay.

A CUDA graph replays its kernels with the arguments they were captured with, so a host float
(``lr`` after a scheduler step, vSAM's decaying reuse weight, AdamW's bias corrections) would
be replayed stale. ``reuse``, ``sgd_step`` and ``adamw_step`` (flat and list forms, every
backend) therefore take an optional ``scalars`` tensor: 1-D, contiguous, float64, on the
parameters' device, holding the host doubles the op would otherwise derive from its float
arguments, in this order:

* ``reuse``:      ``[coeff]``
* ``sgd_step``:   ``[coeff, lr]``
* ``adamw_step``: ``[coeff, 1 - lr * weight_decay, lr / (1 - beta1 ** step), sqrt(1 - beta2 ** step)]``

When given, these values replace the ones from the float arguments (the kernels round each to
the maths dtype once, as they round the host doubles), so the results are bit-identical to the
call with floats. The float arguments still choose the kernel: ``coeff != 0`` (with ``psf``)
selects the reuse rule, and AdamW's ``step`` must be >= 1. The host writes new values into the
tensor before each replay (``vsam_ext.graphs``).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

__all__ = ["SIZES", "reuse_scalars", "sgd_scalars", "adamw_scalars", "check_scalars"]

SIZES = {"reuse": 1, "sgd_step": 2, "adamw_step": 4}


def reuse_scalars(coeff: float) -> List[float]:
    return [float(coeff)]


def sgd_scalars(coeff: float, lr: float) -> List[float]:
    return [float(coeff), float(lr)]


def adamw_scalars(coeff: float, lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> List[float]:
    """In double, in the order and with the operations of the CUDA and CPU kernels' host code
    (``std::pow``, ``std::sqrt``: the same libm as Python's ``**`` and ``math.sqrt``)."""
    lr, beta1, beta2, step = float(lr), float(beta1), float(beta2), float(step)
    return [float(coeff), 1.0 - lr * float(weight_decay), lr / (1.0 - math.pow(beta1, step)),
            math.sqrt(1.0 - math.pow(beta2, step))]


def check_scalars(op: str, scalars: Optional[torch.Tensor], device: torch.device) -> None:
    """``scalars`` of ``op``: None, or ``SIZES[op]`` float64 values, contiguous, 1-D, on ``device``."""
    if scalars is None:
        return
    n = SIZES[op]
    if not isinstance(scalars, torch.Tensor) or scalars.dtype != torch.float64 or scalars.dim() != 1 \
            or scalars.numel() != n or not scalars.is_contiguous() or scalars.device != torch.device(device):
        got = (f"{tuple(scalars.shape)} {scalars.dtype} on {scalars.device}" if isinstance(scalars, torch.Tensor)
               else type(scalars).__name__)
        raise ValueError(f"{op}: scalars must be a contiguous 1-D float64 tensor of {n} value(s) on {device} "
                         f"(vsam_ext.ops.scalars), got {got}")
