"""The reference backend: plain eager PyTorch on the flat buffers.

This is the oracle every fused backend is tested against, so it stays simple and obviously
right: maths in fp32 (fp64 for fp64 buffers), one rounding when a 16-bit result is written.
Every backend module provides these four functions with these signatures.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["segment_sumsq", "perturb", "restore_psf_stats", "reuse"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    x = _wide(x)
    return (x * x).sum().float()   # torch's cascade summation: accurate enough for an oracle


def segment_sumsq(x: torch.Tensor, bounds: Sequence[int],
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-segment sums of squares of ``x`` (of ``|weight| * x`` when given), in fp32.

    ``bounds`` are the segment boundaries: segment i is ``x[bounds[i]:bounds[i+1]]``."""
    if weight is not None:
        x = _wide(weight).abs() * _wide(x)
    sums = [_sumsq(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.stack(sums) if sums else torch.zeros(0, device=x.device)


def perturb(param: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, backup: torch.Tensor,
            adaptive: bool, grad_keep: Optional[torch.Tensor] = None) -> None:
    """SAM/ASAM ascent: ``backup <- param``; ``param <- param + scale * T^2 * grad`` with
    ``T = |param|`` when adaptive, else 1. ``scale`` is a 0-d fp32 device tensor
    (rho / (norm + eps)). When ``grad_keep`` is given, the gradient is copied into it."""
    backup.copy_(param)
    if grad_keep is not None:
        grad_keep.copy_(grad)
    w, g = _wide(param), _wide(grad)
    step = g * scale.to(w.dtype)
    if adaptive:
        step = step * w * w
    param.copy_(w + step)


def restore_psf_stats(param: torch.Tensor, backup: torch.Tensor, grad_sam: torch.Tensor,
                      psf: Optional[torch.Tensor], stat_start: int) -> Optional[torch.Tensor]:
    """After the second backward: ``param <- backup``. When ``psf`` is given it holds the first
    gradient ``g``; it becomes ``PSF = grad_sam - g``, and the result is the fp32 pair
    (sum g^2, sum PSF^2) over the elements ``[stat_start:]``."""
    param.copy_(backup)
    if psf is None:
        return None
    g_sq = _sumsq(psf[stat_start:])
    psf.copy_(_wide(grad_sam) - _wide(psf))
    return torch.stack([g_sq, _sumsq(psf[stat_start:])])


def reuse(grad: torch.Tensor, psf: torch.Tensor, coeff: float) -> None:
    """vSAM reuse (Eq. 17): ``grad <- grad + coeff * PSF``."""
    grad.copy_(_wide(grad) + coeff * _wide(psf))
