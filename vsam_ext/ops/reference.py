"""The reference backend: plain eager PyTorch on the flat buffers.

This is the oracle every fused backend is tested against, so it stays simple and obviously
right: maths in fp32 (fp64 for fp64 buffers), one rounding per stored result, every operation
on its own (torch runs ``a * b + c`` as two ops: no fused multiply-add), in the order written
here. Its element-wise results on CPU tensors define the bits that every backend must give
(ALGORITHMS.md, "Precision of the scalars"). Scalars (sums, norms, statistics) come back in the
maths dtype: fp32, fp64 for fp64 buffers.
Every backend module provides these functions with these signatures:

* ``segment_sumsq``      per-segment (per-tensor) sums of squares: the multi-tensor L2 norm
* ``segment_gram``       per-segment (sum a^2, sum a*b, sum b^2): LookSAM's projection (fp64 for fp64)
* ``segment_axpby``      per-segment ``y <- alpha_s * y + beta_s * x`` (+ the new sums of squares)
* ``perturb``            SAM/ASAM ascent, saving the weights (and, for vSAM, ``g``)
* ``restore_psf_stats``  restore the weights, form the PSF, last-L statistics
* ``reuse``              vSAM's ``g + coeff * PSF`` into the gradient (generic base optimizers)
* ``sgd_step``/``adamw_step``  the base step fused with either the reuse or the restore:
  one pass over the buffers per step, with torch.optim.SGD/AdamW's maths
"""
from __future__ import annotations

import math

from typing import Optional, Sequence

import numpy as np
import torch

from .scalars import check_scalars

__all__ = ["segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse", "sgd_step", "adamw_step"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def maths_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths and the scalars of a buffer of ``dtype`` are in: fp64 for fp64
    buffers, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded (IEEE 754) square root, what every backend's kernels compute. torch's
    CPU ``sqrt`` is not: on an AVX2 host (torch 2.13) 17 % of fp32 and 1.3 % of fp64 results were
    1 ulp off, so on CPU tensors numpy's (the processor's sqrt instruction) is used; CUDA's
    ``sqrt`` is correctly rounded."""
    if x.device.type != "cpu":
        return x.sqrt()
    return torch.from_numpy(np.sqrt(x.detach().contiguous().numpy()))


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    x = _wide(x)
    return (x * x).sum()   # in the maths dtype; torch's cascade summation: accurate enough for an oracle


def segment_sumsq(x: torch.Tensor, bounds: Sequence[int],
                  weight: Optional[torch.Tensor] = None, eta: float = 0.0) -> torch.Tensor:
    """Per-segment sums of squares of ``x`` (of ``(|weight| + eta) * x`` when ``weight`` is
    given: ASAM's ``T g``), shape ``(segments,)``, in fp32 (fp64 for fp64 buffers).

    ``bounds`` are the segment boundaries: segment i is ``x[bounds[i]:bounds[i+1]]``."""
    out = maths_dtype(x.dtype)
    if weight is not None:
        x = (_wide(weight).abs() + eta) * _wide(x)
    sums = [_sumsq(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=out, device=x.device)


def segment_gram(a: torch.Tensor, b: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Per segment, the triple (sum a^2, sum a*b, sum b^2): shape ``(segments, 3)``; fp32, but
    fp64 for fp64 buffers (LookSAM's projection cancels: its coefficient needs the precision)."""
    out = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = _wide(a), _wide(b)
    rows = [torch.stack([(a[i:j] * a[i:j]).sum(), (a[i:j] * b[i:j]).sum(), (b[i:j] * b[i:j]).sum()]).to(out)
            for i, j in zip(bounds[:-1], bounds[1:])]
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=out, device=a.device)


def segment_axpby(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                  bounds: Sequence[int]) -> torch.Tensor:
    """Per segment s: ``y <- alpha[s] * y + beta[s] * x`` (``alpha``, ``beta``: device tensors
    of one value per segment, in the maths dtype: fp32, fp64 for fp64 buffers). Returns the
    per-segment sums of squares of the new ``y`` (as stored, i.e. after rounding), in the maths
    dtype."""
    sums = []
    for s, (i, j) in enumerate(zip(bounds[:-1], bounds[1:])):
        yw, xw = _wide(y[i:j]), _wide(x[i:j])
        y[i:j].copy_(alpha[s].to(yw.dtype) * yw + beta[s].to(yw.dtype) * xw)
        sums.append(_sumsq(y[i:j]))
    return torch.stack(sums) if sums else torch.zeros(0, dtype=maths_dtype(y.dtype), device=y.device)


def check_scale(scale: torch.Tensor, param: torch.Tensor) -> None:
    """``scale`` of ``perturb``: one value in ``param``'s maths dtype on ``param``'s device."""
    want = maths_dtype(param.dtype)
    if scale.numel() != 1 or scale.dtype != want or scale.device != param.device:
        raise ValueError(f"perturb: scale must be one {want} value on {param.device} (the maths dtype of a "
                         f"{param.dtype} buffer), got {scale.numel()} {scale.dtype} value(s) on {scale.device}")


def perturb(param: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, backup: torch.Tensor,
            adaptive: bool, grad_keep: Optional[torch.Tensor] = None, eta: float = 0.0) -> None:
    """SAM/ASAM ascent: ``backup <- param``; ``param <- param + scale * T^2 * grad`` with
    ``T = |param| + eta`` when adaptive, else 1. ``scale`` is a 0-d device tensor in the maths
    dtype (fp32; fp64 for fp64 buffers): rho / (norm + eps). When ``grad_keep`` is given, the
    gradient is copied into it."""
    check_scale(scale, param)
    backup.copy_(param)
    if grad_keep is not None:
        grad_keep.copy_(grad)
    w, g = _wide(param), _wide(grad)
    step = g * scale
    if adaptive:
        t = w.abs() + eta
        step = step * t * t
    param.copy_(w + step)


def restore_psf_stats(param: torch.Tensor, backup: torch.Tensor, grad_sam: torch.Tensor,
                      psf: Optional[torch.Tensor], stat_start: int) -> Optional[torch.Tensor]:
    """After the second backward: ``param <- backup``. When ``psf`` is given it holds the first
    gradient ``g``; it becomes ``PSF = grad_sam - g``, and the result is the pair
    (sum g^2, sum PSF^2) over the elements ``[stat_start:]`` in the maths dtype."""
    param.copy_(backup)
    if psf is None:
        return None
    g_sq = _sumsq(psf[stat_start:])
    psf.copy_(_wide(grad_sam) - _wide(psf))
    return torch.stack([g_sq, _sumsq(psf[stat_start:])])


def reuse(grad: torch.Tensor, psf: torch.Tensor, coeff: float, scalars: Optional[torch.Tensor] = None) -> None:
    """vSAM reuse (Eq. 17): ``grad <- grad + coeff * PSF``. ``scalars``: ``[coeff]`` as a device
    tensor (``vsam_ext.ops.scalars``), used instead of the float."""
    check_scalars("reuse", scalars, grad.device)
    coeff = coeff if scalars is None else _device_scalar(scalars, 0, grad.dtype)
    grad.copy_(_wide(grad) + coeff * _wide(psf))


def _device_scalar(scalars: torch.Tensor, i: int, dtype: torch.dtype) -> torch.Tensor:
    """``scalars[i]`` (a host double on the device) rounded once to the maths dtype of ``dtype``
    buffers: the rounding a Python float gets as a torch op's scalar argument."""
    return scalars[i].to(maths_dtype(dtype))


def _final_grad(param, grad, psf, backup, coeff, stat_start: int, maximize: bool, reuse: bool):
    """The gradient a fused base step uses, and the statistics when it restores.

    Restore mode (``backup`` given, after a SAM step's second backward): the weights come back
    from ``backup``, ``psf`` (if given) becomes ``grad - psf`` with the statistics, and the
    gradient is ``grad`` (= g_sam). Otherwise: ``grad + coeff * psf`` (the reuse rule) when
    ``psf`` is given, else ``grad``."""
    stats = None
    if backup is not None:
        stats = restore_psf_stats(param, backup, grad, psf, stat_start)
        d = _wide(grad)
    elif psf is not None and reuse:
        d = _wide(grad) + coeff * _wide(psf)
    else:
        d = _wide(grad)
    return (-d if maximize else d), stats


def sgd_step(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor],
             psf: Optional[torch.Tensor], backup: Optional[torch.Tensor], coeff: float, stat_start: int,
             lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first: bool, scalars: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """torch.optim.SGD's step on the final gradient (see ``_final_grad``); ``first``: the
    momentum buffer is initialised to the gradient (torch's ``buf is None`` case). The grad
    buffer is not written. Returns the statistics pair in restore mode with ``psf``, else None.
    ``scalars``: ``[coeff, lr]`` as a device tensor (``vsam_ext.ops.scalars``), used instead of
    the floats (which still choose the rule: ``coeff != 0``)."""
    check_scalars("sgd_step", scalars, param.device)
    reuse_rule = coeff != 0.0
    if scalars is not None:
        coeff, lr = (_device_scalar(scalars, i, param.dtype) for i in range(2))
    d, stats = _final_grad(param, grad, psf, backup, coeff, stat_start, maximize, reuse_rule)
    w = _wide(param)
    if weight_decay != 0.0:
        d = d + weight_decay * w
    if momentum != 0.0:
        buf = d if first else momentum * _wide(momentum_buffer) + (1.0 - dampening) * d
        momentum_buffer.copy_(buf)
        d = d + momentum * buf if nesterov else buf
    param.copy_(w - lr * d)
    return stats


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               psf: Optional[torch.Tensor], backup: Optional[torch.Tensor], coeff: float, stat_start: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               maximize: bool, scalars: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """torch.optim.AdamW's step (no amsgrad) on the final gradient (see ``_final_grad``);
    ``step`` is the step count after this step's increment (1 on the first step). ``scalars``:
    ``[coeff, 1 - lr * weight_decay, lr / (1 - beta1 ** step), sqrt(1 - beta2 ** step)]`` as a
    device tensor (``vsam_ext.ops.scalars``), used instead of the floats."""
    if step < 1:
        raise RuntimeError(f"step: expected >= 1 (the count after this step's increment), got {step}")
    check_scalars("adamw_step", scalars, param.device)
    reuse_rule = coeff != 0.0
    decay, step_size, bc2_sqrt = 1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step)
    if scalars is not None:
        coeff, decay, step_size, bc2_sqrt = (_device_scalar(scalars, i, param.dtype) for i in range(4))
    d, stats = _final_grad(param, grad, psf, backup, coeff, stat_start, maximize, reuse_rule)
    w = _wide(param) * decay
    m = _wide(exp_avg) + (1.0 - beta1) * (d - _wide(exp_avg))
    v = beta2 * _wide(exp_avg_sq) + (1.0 - beta2) * d * d
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    denom = sqrt_rn(v) / bc2_sqrt + eps
    param.copy_(w - step_size * m / denom)
    return stats
