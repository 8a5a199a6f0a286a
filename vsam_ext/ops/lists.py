"""The ops over tensors wherever they live: lists of tensors instead of flat buffers.

Every op of ``reference`` has a list form ``<op>_list`` with the same maths per element:
the parameters, gradients and base-optimizer state are lists of tensors (FSDP2's local
shards, the base optimizer's own state tensors), updated in place; each tensor is one segment
of the segment ops; the statistics pair covers the tensors from ``stat_first`` on. A backend
module may provide them natively (the cpu backend: one op call, one parallel loop over all
tensors); ``per_tensor`` builds them for any backend from its flat ops, one call per tensor.

``Dispatch`` is what the optimizers call: the flat ops' signatures, taking either flat buffers
or lists (then the optimizer's own flat buffers, PSF and saved weights, are split into
per-tensor views), and the backend chosen per device type (a model on several devices runs
the fused backend of each).
"""
from __future__ import annotations

import types
from typing import Dict, List, Optional, Sequence

import torch

from . import reference

__all__ = ["per_tensor", "list_ops", "Dispatch"]

_LIST_OPS = ("segment_sumsq", "segment_gram", "segment_axpby", "perturb", "restore_psf_stats", "reuse",
             "sgd_step", "adamw_step")


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.view(-1)


def _item(ts, i):
    return None if ts is None else _flat(ts[i])


def _add_stats(parts: List[Optional[torch.Tensor]], like: torch.Tensor) -> Optional[torch.Tensor]:
    parts = [s for s in parts if s is not None]
    if not parts:
        return torch.zeros(2, dtype=reference.maths_dtype(like.dtype), device=like.device)
    return torch.stack(parts).sum(0)


def per_tensor(backend: types.ModuleType) -> types.SimpleNamespace:
    """The list forms of ``backend``'s ops as one flat-op call per non-empty tensor."""
    def sums(xs, one, width=None):
        md = reference.maths_dtype(xs[0].dtype) if xs else torch.float32
        dev = xs[0].device if xs else torch.device("cpu")
        shape = (len(xs),) if width is None else (len(xs), width)
        out = torch.zeros(shape, dtype=md, device=dev)
        for i, x in enumerate(xs):
            if x.numel():
                out[i] = one(i, x.numel())
        return out

    def segment_sumsq_list(xs, weights=None, eta=0.0):
        return sums(xs, lambda i, n: backend.segment_sumsq(_flat(xs[i]), [0, n], _item(weights, i), eta)[0])

    def segment_gram_list(a, b):
        return sums(a, lambda i, n: backend.segment_gram(_flat(a[i]), _flat(b[i]), [0, n])[0], 3)

    def segment_axpby_list(ys, xs, alpha, beta):
        return sums(ys, lambda i, n: backend.segment_axpby(_flat(ys[i]), _flat(xs[i]), alpha[i:i + 1],
                                                           beta[i:i + 1], [0, n])[0])

    def perturb_list(params, grads, scale, backups, adaptive, grad_keeps=None, eta=0.0):
        for i, p in enumerate(params):
            if p.numel():
                backend.perturb(_flat(p), _flat(grads[i]), scale, _flat(backups[i]), adaptive,
                                _item(grad_keeps, i), eta)

    def stats_over(params, stat_first, one):
        parts = []
        for i, p in enumerate(params):
            if p.numel():
                parts.append(one(i, 0 if i >= stat_first else p.numel()))
        return parts

    def restore_psf_stats_list(params, backups, grad_sams, psfs, stat_first):
        parts = stats_over(params, stat_first, lambda i, s: backend.restore_psf_stats(
            _flat(params[i]), _flat(backups[i]), _flat(grad_sams[i]), _item(psfs, i), s))
        return None if psfs is None else _add_stats(parts, params[0] if params else torch.zeros(0))

    def reuse_list(grads, psfs, coeff, scalars=None):
        for g, f in zip(grads, psfs):
            if g.numel():
                backend.reuse(_flat(g), _flat(f), coeff, scalars)

    def sgd_step_list(params, grads, momentum_buffers, psfs, backups, coeff, stat_first, *rest):
        parts = stats_over(params, stat_first, lambda i, s: backend.sgd_step(
            _flat(params[i]), _flat(grads[i]), _item(momentum_buffers, i), _item(psfs, i), _item(backups, i),
            coeff, s, *rest))
        restoring = backups is not None and psfs is not None
        return _add_stats(parts, params[0] if params else torch.zeros(0)) if restoring else None

    def adamw_step_list(params, grads, exp_avgs, exp_avg_sqs, psfs, backups, coeff, stat_first, *rest):
        parts = stats_over(params, stat_first, lambda i, s: backend.adamw_step(
            _flat(params[i]), _flat(grads[i]), _flat(exp_avgs[i]), _flat(exp_avg_sqs[i]), _item(psfs, i),
            _item(backups, i), coeff, s, *rest))
        restoring = backups is not None and psfs is not None
        return _add_stats(parts, params[0] if params else torch.zeros(0)) if restoring else None

    found = dict(locals())
    return types.SimpleNamespace(**{f"{op}_list": found[f"{op}_list"] for op in _LIST_OPS})


def list_ops(backend: types.ModuleType, device_type: str = "cpu"):
    """``backend``'s own list ops when it has them all for ``device_type`` (the compiled
    extension may have them for one device type only), else the per-tensor loop."""
    native = all(hasattr(backend, f"{op}_list") for op in _LIST_OPS)
    if native and hasattr(backend, "has_kernel"):     # the compiled extension: kernels per device type
        key = "CUDA" if device_type == "cuda" else "CPU"
        native = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"vsam_ext::{op}_list", key) for op in _LIST_OPS)
    return backend if native else per_tensor(backend)


def _tensor_ranges(bounds: Sequence[int], sizes: Sequence[int]) -> List[range]:
    """Element bounds over the concatenated tensors as ranges of tensor indices; every bound must
    fall on a tensor boundary."""
    at = {0: 0}
    total = 0
    for i, n in enumerate(sizes):
        total += n
        at[total] = i + 1
    try:
        return [range(at[a], at[b]) for a, b in zip(bounds[:-1], bounds[1:])]
    except KeyError:
        raise ValueError(f"bounds {list(bounds)} do not fall on the tensor boundaries of sizes {list(sizes)}") from None


def _split(t, sizes: Sequence[int]):
    """A flat buffer of ours as per-tensor views; a list as it is; None stays None."""
    if t is None or isinstance(t, (list, tuple)):
        return t
    return list(t.view(-1).split(list(sizes)))


class Dispatch:
    """The ops the optimizers call: flat buffers or lists, the backend per device type."""

    def __init__(self, backends: Dict[str, types.ModuleType]) -> None:
        self.backends = backends
        self._lists = {kind: list_ops(m, kind) for kind, m in backends.items()}

    def _flat_backend(self, t: torch.Tensor) -> types.ModuleType:
        return self.backends[t.device.type]

    def _list_backend(self, ts: Sequence[torch.Tensor]):
        kind = ts[0].device.type if ts else "cpu"
        return self._lists.get(kind) or self._lists[next(iter(self._lists))]

    @staticmethod
    def _sizes(ts) -> List[int]:
        return [t.numel() for t in ts]

    @staticmethod
    def _by_range(per: torch.Tensor, bounds, sizes) -> torch.Tensor:
        ranges = _tensor_ranges(bounds, sizes)
        if len(ranges) == len(sizes) and all(len(r) == 1 for r in ranges):
            return per
        return torch.stack([per[r.start:r.stop].sum(0) for r in ranges]) if ranges else per[:0]

    @staticmethod
    def _stat_first(stat_start: int, sizes) -> int:
        total = 0
        for i, n in enumerate(sizes):
            if total >= stat_start:
                return i
            total += n
        return len(sizes)

    def segment_sumsq(self, x, bounds, weight=None, eta: float = 0.0):
        if not isinstance(x, list):
            return self._flat_backend(x).segment_sumsq(x, bounds, weight, eta)
        sizes = self._sizes(x)
        per = self._list_backend(x).segment_sumsq_list(x, _split(weight, sizes), eta)
        return self._by_range(per, bounds, sizes)

    def segment_gram(self, a, b, bounds):
        if not isinstance(b, list) and not isinstance(a, list):
            return self._flat_backend(a).segment_gram(a, b, bounds)
        ref = b if isinstance(b, list) else a
        sizes = self._sizes(ref)
        per = self._list_backend(ref).segment_gram_list(_split(a, sizes), _split(b, sizes))
        return self._by_range(per, bounds, sizes)

    def segment_axpby(self, y, x, alpha, beta, bounds):
        if not isinstance(x, list) and not isinstance(y, list):
            return self._flat_backend(y).segment_axpby(y, x, alpha, beta, bounds)
        ref = x if isinstance(x, list) else y
        sizes = self._sizes(ref)
        ranges = _tensor_ranges(bounds, sizes)
        counts = torch.tensor([len(r) for r in ranges], device=alpha.device)
        per = self._list_backend(ref).segment_axpby_list(
            _split(y, sizes), _split(x, sizes), alpha.repeat_interleave(counts, output_size=len(sizes)),
            beta.repeat_interleave(counts, output_size=len(sizes)))   # output_size: no host sync on CUDA
        return self._by_range(per, bounds, sizes)

    def perturb(self, param, grad, scale, backup, adaptive, grad_keep=None, eta: float = 0.0):
        if not isinstance(param, list):
            return self._flat_backend(param).perturb(param, grad, scale, backup, adaptive, grad_keep, eta)
        sizes = self._sizes(param)
        self._list_backend(param).perturb_list(param, grad, scale, _split(backup, sizes), adaptive,
                                                      _split(grad_keep, sizes), eta)

    def restore_psf_stats(self, param, backup, grad_sam, psf, stat_start: int):
        if not isinstance(param, list):
            return self._flat_backend(param).restore_psf_stats(param, backup, grad_sam, psf, stat_start)
        sizes = self._sizes(param)
        return self._list_backend(param).restore_psf_stats_list(
            param, _split(backup, sizes), grad_sam, _split(psf, sizes), self._stat_first(stat_start, sizes))

    def reuse(self, grad, psf, coeff: float, scalars=None):
        if not isinstance(grad, list):
            return self._flat_backend(grad).reuse(grad, psf, coeff, scalars)
        sizes = self._sizes(grad)
        self._list_backend(grad).reuse_list(grad, _split(psf, sizes), coeff, scalars)

    def sgd_step(self, param, grad, momentum_buffer, psf, backup, coeff, stat_start, *rest):
        if not isinstance(param, list):
            return self._flat_backend(param).sgd_step(param, grad, momentum_buffer, psf, backup, coeff,
                                                      stat_start, *rest)
        sizes = self._sizes(param)
        return self._list_backend(param).sgd_step_list(
            param, grad, _split(momentum_buffer, sizes), _split(psf, sizes), _split(backup, sizes), coeff,
            self._stat_first(stat_start, sizes), *rest)

    def adamw_step(self, param, grad, exp_avg, exp_avg_sq, psf, backup, coeff, stat_start, *rest):
        if not isinstance(param, list):
            return self._flat_backend(param).adamw_step(param, grad, exp_avg, exp_avg_sq, psf, backup, coeff,
                                                        stat_start, *rest)
        sizes = self._sizes(param)
        return self._list_backend(param).adamw_step_list(
            param, grad, _split(exp_avg, sizes), _split(exp_avg_sq, sizes), _split(psf, sizes),
            _split(backup, sizes), coeff, self._stat_first(stat_start, sizes), *rest)
