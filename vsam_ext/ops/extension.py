"""The compiled backends (``cpu``: C++/OpenMP, ``cuda``: CUDA C++), both in ``vsam_ext._C``.

The ops are registered with ``TORCH_LIBRARY(vsam_ext, ...)``; the dispatcher picks the CPU or
CUDA kernel from the tensors' device. These wrappers give them the reference's signatures.

The ``*_list`` functions are the same ops over lists of tensors (any shapes, contiguous, one
dtype), in place, in one call: the flat op applied to each tensor viewed as 1-D; each tensor is
one segment; the statistics are over the tensors of index >= ``stat_first``. Kernels for CPU
tensors, and for CUDA tensors in a CUDA build (``vsam_ext.ops.lists`` checks which are there and
loops per tensor otherwise). Empty lists
are allowed and give what the flat op gives for an empty buffer: zeros(0) from the segment ops,
the statistics (0, 0) (fp32) when the call asks for them, else None.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import _C  # noqa: F401  (registers torch.ops.vsam_ext.*)
from . import fake  # noqa: F401,E402  (their fake kernels: torch.compile traces them)

__all__ = ["segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse", "sgd_step",
           "adamw_step", "has_kernel", "segment_sumsq_list", "segment_gram_list", "segment_axpby_list", "perturb_list",
           "restore_psf_stats_list", "reuse_list", "sgd_step_list", "adamw_step_list"]

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


def reuse(grad, psf, coeff: float, scalars=None) -> None:
    _ops.reuse(grad, psf, coeff, scalars)


def sgd_step(param, grad, momentum_buffer, psf, backup, coeff, stat_start, lr, weight_decay, momentum,
             dampening, nesterov, maximize, first, scalars=None):
    return _stats(_ops.sgd_step(param, grad, momentum_buffer, psf, backup, coeff, stat_start, lr,
                                weight_decay, momentum, dampening, nesterov, maximize, first, scalars))


def adamw_step(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_start, lr, beta1, beta2, eps,
               weight_decay, step, maximize, scalars=None):
    return _stats(_ops.adamw_step(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_start, lr,
                                  beta1, beta2, eps, weight_decay, step, maximize, scalars))


# -- tensor lists ------------------------------------------------------------------------------
def _list(ts) -> List[torch.Tensor]:
    return ts if isinstance(ts, list) else list(ts)


def _opt_list(ts) -> Optional[List[torch.Tensor]]:
    return None if ts is None else _list(ts)


def _no_tensors(*lists) -> bool:
    """Every tensor argument is an empty list (or None): torch's dispatcher, which chooses the
    kernel from the tensors, has none to look at, so these wrappers answer such calls."""
    return all(ts is None or len(ts) == 0 for ts in lists)


def _empty_stats(asked: bool) -> Optional[torch.Tensor]:
    return torch.zeros(2) if asked else None


def segment_sumsq_list(xs: Sequence[torch.Tensor], weights: Optional[Sequence[torch.Tensor]] = None,
                       eta: float = 0.0) -> torch.Tensor:
    xs, weights = _list(xs), _opt_list(weights)
    if _no_tensors(xs, weights):
        return torch.zeros(0)
    return _ops.segment_sumsq_list(xs, weights, float(eta))


def segment_gram_list(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    a, b = _list(a), _list(b)
    if _no_tensors(a, b):
        return torch.zeros(0, 3)
    return _ops.segment_gram_list(a, b)


def segment_axpby_list(ys: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], alpha: torch.Tensor,
                       beta: torch.Tensor) -> torch.Tensor:
    return _ops.segment_axpby_list(_list(ys), _list(xs), alpha, beta)


def perturb_list(params, grads, scale, backups, adaptive: bool, grad_keeps=None, eta: float = 0.0) -> None:
    _ops.perturb_list(_list(params), _list(grads), scale, _list(backups), bool(adaptive), _opt_list(grad_keeps),
                      float(eta))


def restore_psf_stats_list(params, backups, grad_sams, psfs, stat_first: int) -> Optional[torch.Tensor]:
    params, backups, grad_sams, psfs = _list(params), _list(backups), _list(grad_sams), _opt_list(psfs)
    if _no_tensors(params, backups, grad_sams, psfs):
        return _empty_stats(psfs is not None)
    return _stats(_ops.restore_psf_stats_list(params, backups, grad_sams, psfs, int(stat_first)))


def reuse_list(grads, psfs, coeff: float, scalars=None) -> None:
    grads, psfs = _list(grads), _list(psfs)
    if not _no_tensors(grads, psfs):
        _ops.reuse_list(grads, psfs, float(coeff), scalars)


def sgd_step_list(params, grads, momentum_buffers, psfs, backups, coeff, stat_first, lr, weight_decay, momentum,
                  dampening, nesterov, maximize, first, scalars=None) -> Optional[torch.Tensor]:
    lists = (_list(params), _list(grads), _opt_list(momentum_buffers), _opt_list(psfs), _opt_list(backups))
    if _no_tensors(*lists):
        if momentum != 0.0 and momentum_buffers is None:
            raise RuntimeError("momentum_buffer: required when momentum != 0")
        return _empty_stats(psfs is not None and backups is not None)
    return _stats(_ops.sgd_step_list(*lists, float(coeff), int(stat_first), float(lr), float(weight_decay),
                                     float(momentum), float(dampening), bool(nesterov), bool(maximize), bool(first),
                                     scalars))


def adamw_step_list(params, grads, exp_avgs, exp_avg_sqs, psfs, backups, coeff, stat_first, lr, beta1, beta2, eps,
                    weight_decay, step, maximize, scalars=None) -> Optional[torch.Tensor]:
    lists = (_list(params), _list(grads), _list(exp_avgs), _list(exp_avg_sqs), _opt_list(psfs), _opt_list(backups))
    if _no_tensors(*lists):
        if step < 1:
            raise RuntimeError(f"step: expected >= 1 (the count after this step's increment), got {step}")
        return _empty_stats(psfs is not None and backups is not None)
    return _stats(_ops.adamw_step_list(*lists, float(coeff), int(stat_first), float(lr), float(beta1), float(beta2),
                                       float(eps), float(weight_decay), int(step), bool(maximize), scalars))
