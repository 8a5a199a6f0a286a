"""Fake (meta) kernels of the ``vsam_ext`` ops, so that torch.compile traces them.

Without a fake kernel, torch.compile (dynamo, AOT autograd, ``torch.export``) cannot run an op
on fake tensors and breaks the graph at it. These functions give what the C++ kernels
(``csrc/cpu_ops.cpp``, ``csrc/cuda_ops.cu``) return, and nothing else: no data is read or
written. Which arguments an op mutates is in its schema (``Tensor(a!)``,
``csrc/registration.cpp``), so functionalization needs nothing from here.

What the kernels return (``maths``: float64 for float64 tensors, else float32):

* ``segment_sumsq``, ``segment_axpby``: ``(nseg,)`` in maths, ``nseg = len(bounds) - 1``; the
  list forms ``(len(list),)``; ``segment_gram``: ``(nseg, 3)``, lists ``(len(list), 3)``.
* the statistics (``restore_psf_stats``, ``sgd_step``, ``adamw_step``): ``(2,)`` in maths when
  they are computed (a ``psf``, and for the steps a ``backup`` too), else "no statistics": an
  empty float32 tensor. All on the first buffer's device.
* empty lists: the kernels' answers for no tensors (float32 on the CPU; for
  ``segment_axpby_list`` the CUDA kernel takes dtype and device from ``alpha``).

``own_storage_alias`` has none on purpose: it hides an alias from the schema, so it must never
be traced (``csrc/alias.cpp``).

Imported by ``extension`` once ``vsam_ext._C`` has defined the ops.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["FAKE_OPS"]

FAKE_OPS = ("segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse",
            "sgd_step", "adamw_step", "segment_sumsq_list", "segment_gram_list", "segment_axpby_list",
            "perturb_list", "restore_psf_stats_list", "reuse_list", "sgd_step_list", "adamw_step_list")

_CPU = torch.device("cpu")


def _maths(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _nseg(bounds: Sequence[int]) -> int:
    return max(len(bounds) - 1, 0)


def _sums(like: Optional[torch.Tensor], *shape: int) -> torch.Tensor:
    """Per-segment sums: in ``like``'s maths dtype on its device; float32 on the CPU without one."""
    if like is None:
        return torch.empty(shape, dtype=torch.float32, device=_CPU)
    return like.new_empty(shape, dtype=_maths(like))


def _stats(like: Optional[torch.Tensor], computed: bool) -> torch.Tensor:
    """The statistics pair when ``computed``, else "no statistics" (empty float32); on ``like``'s
    device, float32 on the CPU without one (empty lists)."""
    if like is None:
        return torch.empty(2 if computed else 0, dtype=torch.float32, device=_CPU)
    if computed:
        return like.new_empty(2, dtype=_maths(like))
    return like.new_empty(0, dtype=torch.float32)


def _first(ts: List[torch.Tensor]) -> Optional[torch.Tensor]:
    return ts[0] if len(ts) else None


def _register(name: str):
    return torch.library.register_fake(f"vsam_ext::{name}")


# -- flat buffers ---------------------------------------------------------------------------------
@_register("segment_sumsq")
def _segment_sumsq(x, bounds, weight, eta=0.0):
    return _sums(x, _nseg(bounds))


@_register("segment_gram")
def _segment_gram(a, b, bounds):
    return _sums(a, _nseg(bounds), 3)


@_register("segment_axpby")
def _segment_axpby(y, x, alpha, beta, bounds):
    return _sums(y, _nseg(bounds))


@_register("perturb")
def _perturb(param, grad, scale, backup, adaptive, grad_keep, eta=0.0):
    return None


@_register("restore_psf_stats")
def _restore_psf_stats(param, backup, grad_sam, psf, stat_start):
    return _stats(param, psf is not None)


@_register("reuse")
def _reuse(grad, psf, coeff, scalars=None):
    return None


@_register("sgd_step")
def _sgd_step(param, grad, momentum_buffer, psf, backup, coeff, stat_start, lr, weight_decay, momentum,
              dampening, nesterov, maximize, first, scalars=None):
    return _stats(param, psf is not None and backup is not None)


@_register("adamw_step")
def _adamw_step(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_start, lr, beta1, beta2, eps,
                weight_decay, step, maximize, scalars=None):
    return _stats(param, psf is not None and backup is not None)


# -- tensor lists ---------------------------------------------------------------------------------
@_register("segment_sumsq_list")
def _segment_sumsq_list(x, weight, eta=0.0):
    return _sums(_first(x), len(x))


@_register("segment_gram_list")
def _segment_gram_list(a, b):
    return _sums(_first(a), len(a), 3)


@_register("segment_axpby_list")
def _segment_axpby_list(y, x, alpha, beta):
    if len(y) == 0 and alpha.device.type != "cpu":     # the CUDA kernel: alpha's dtype and device
        return alpha.new_empty(0)
    return _sums(_first(y), len(y))


@_register("perturb_list")
def _perturb_list(param, grad, scale, backup, adaptive, grad_keep, eta=0.0):
    return None


@_register("restore_psf_stats_list")
def _restore_psf_stats_list(param, backup, grad_sam, psf, stat_first):
    return _stats(_first(param), psf is not None)


@_register("reuse_list")
def _reuse_list(grad, psf, coeff, scalars=None):
    return None


@_register("sgd_step_list")
def _sgd_step_list(param, grad, momentum_buffer, psf, backup, coeff, stat_first, lr, weight_decay, momentum,
                   dampening, nesterov, maximize, first, scalars=None):
    return _stats(_first(param), psf is not None and backup is not None)


@_register("adamw_step_list")
def _adamw_step_list(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_first, lr, beta1, beta2, eps,
                     weight_decay, step, maximize, scalars=None):
    return _stats(_first(param), psf is not None and backup is not None)
