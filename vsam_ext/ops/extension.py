"""The compiled backends (``cpu``: C++/OpenMP, ``cuda``: CUDA C++), both in ``vsam_ext._C``.

The ops are registered with ``TORCH_LIBRARY(vsam_ext, ...)``; the dispatcher picks the CPU or
CUDA kernel from the tensors' device. These wrappers give them the reference's signatures.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _C  # noqa: F401  (registers torch.ops.vsam_ext.*)

__all__ = ["segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse", "sgd_step",
           "adamw_step", "has_kernel"]

_ops = torch.ops.vsam_ext


def has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("vsam_ext::perturb", dispatch_key)


def _stats(t: torch.Tensor) -> Optional[torch.Tensor]:
    return t if t.numel() else None


def segment_sumsq(x: torch.Tensor, bounds: Sequence[int], weight: Optional[torch.Tensor] = None,
                  eta: float = 0.0) -> torch.Tensor:
    return _ops.segment_sumsq(x, [int(b) for b in bounds], weight, float(eta))


def segment_gram(a: torch.Tensor, b: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    return _ops.segment_gram(a, b, [int(k) for k in bounds])


def segment_axpby(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                  bounds: Sequence[int]) -> torch.Tensor:
    return _ops.segment_axpby(y, x, alpha, beta, [int(k) for k in bounds])


def perturb(param, grad, scale, backup, adaptive: bool, grad_keep=None, eta: float = 0.0) -> None:
    _ops.perturb(param, grad, scale, backup, adaptive, grad_keep, float(eta))


def restore_psf_stats(param, backup, grad_sam, psf, stat_start: int):
    return _stats(_ops.restore_psf_stats(param, backup, grad_sam, psf, stat_start))


def reuse(grad, psf, coeff: float) -> None:
    _ops.reuse(grad, psf, coeff)


def sgd_step(param, grad, momentum_buffer, psf, backup, coeff, stat_start, lr, weight_decay, momentum,
             dampening, nesterov, maximize, first):
    return _stats(_ops.sgd_step(param, grad, momentum_buffer, psf, backup, coeff, stat_start, lr,
                                weight_decay, momentum, dampening, nesterov, maximize, first))


def adamw_step(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_start, lr, beta1, beta2, eps,
               weight_decay, step, maximize):
    return _stats(_ops.adamw_step(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_start, lr,
                                  beta1, beta2, eps, weight_decay, step, maximize))
