"""The base optimizer's step taken inside the fused ops, for torch.optim.SGD and AdamW.

The base optimizer keeps owning its state: its per-parameter tensors (``momentum_buffer``;
``exp_avg``, ``exp_avg_sq``, ``step``) become views of flat buffers that the fused kernels
update in one pass. ``state_dict()``, LR schedulers and a fallback to ``base.step()`` (some
parameter got no gradient, an unsupported option) therefore keep working: after a fallback,
the state is gathered back into the flat buffers before the next fused step.

Sharded parameters (``shards.ShardBuffer``, FSDP2) keep their state tensors where torch's
optimizer would have them: one DTensor per parameter, shaped and sharded like it (what a
sharded checkpoint saves); the fused ops take lists of their local tensors.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch

from ..flat import FlatBuffer, segment_view
from ..ops.scalars import adamw_scalars, sgd_scalars
from ..shards import is_dtensor

__all__ = ["fused_base_for"]


def _is_float(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _FusedBase:
    keys: tuple = ()

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base
        self.flat_state: dict = {}     # id(buffer) -> {key: flat tensor, or list of local tensors}
        self.shard_state: dict = {}    # id(ShardBuffer) -> {key: the per-parameter state tensors}
        self.valid = False             # the base's state tensors are our views
        self.warned = False

    def invalidate(self) -> None:
        self.valid = False

    def _group_ok(self, group: dict) -> bool:
        raise NotImplementedError

    def prepare(self, buffers: List[FlatBuffer], groups: List[dict]) -> bool:
        """Whether this step can be fused; gathers the base's state into flat buffers if needed."""
        if not all(self._group_ok(groups[b.group_index]) for b in buffers):
            return False
        if self.valid:
            return True
        for b in buffers:
            if not self._gather(b):
                return False
        self.valid = True
        return True

    def _gather(self, buf: FlatBuffer) -> bool:
        """Make the base's state of ``buf``'s parameters views of flat tensors. False when the
        parameters are in different states (some stepped, some not): the base steps them."""
        states = [self.base.state.get(p) or {} for p in buf.params]
        have = [all(s.get(k) is not None for k in self.keys) for s in states]
        if any(have) and (not all(have) or not self._consistent(states)):
            self.flat_state.pop(id(buf), None)     # no flat copy beside the base's own state
            if not self.warned:
                self.warned = True
                warnings.warn(f"vsam_ext: the parameters' {type(self.base).__name__} states differ (some "
                              f"parameter missed steps), so the base step runs unfused (base.step())",
                              stacklevel=5)
            return False
        if buf.sharded:
            return self._gather_shards(buf, states, any(have))
        flat = self.flat_state.setdefault(id(buf), {k: buf.new_buffer() for k in self.keys})
        if not any(have):
            self._fresh(buf)
            return True
        for p, state, start in zip(buf.params, states, buf.offsets):
            for k in self.keys:
                view = segment_view(flat[k], start, p)
                if state[k] is not view:
                    view.copy_(state[k])
                    state[k] = view
        self._gathered(buf, states)
        return True

    def _gather_shards(self, buf, states, have: bool) -> bool:
        """The state of sharded parameters stays per parameter; fresh state is created here and
        handed to the base optimizer after the first fused step (as for flat buffers)."""
        if have:
            tensors = {k: [s[k] for s in states] for k in self.keys}
            self._gathered(buf, states)
        else:
            tensors = {k: [torch.zeros_like(p) for p in buf.params] for k in self.keys}
            self._fresh(buf)
        self.shard_state[id(buf)] = tensors
        self.flat_state[id(buf)] = {k: [t.to_local() if is_dtensor(t) else t for t in ts] for k, ts in tensors.items()}
        return True

    def _install(self, buf: FlatBuffer) -> None:
        if buf.sharded:
            for k, tensors in self.shard_state[id(buf)].items():
                for p, t in zip(buf.params, tensors):
                    self.base.state[p][k] = t
            return
        flat = self.flat_state[id(buf)]
        for p, start in zip(buf.params, buf.offsets):
            state = self.base.state[p]
            for k in self.keys:
                state[k] = segment_view(flat[k], start, p)

    def _fresh(self, buf: FlatBuffer) -> None:
        pass

    def _consistent(self, states) -> bool:
        return True

    def _gathered(self, buf: FlatBuffer, states) -> None:
        pass


class FusedSGD(_FusedBase):
    """torch.optim.SGD: momentum, dampening, nesterov, weight decay, maximize."""

    keys = ("momentum_buffer",)

    def __init__(self, base: torch.optim.Optimizer) -> None:
        super().__init__(base)
        self.first = {}                # id(FlatBuffer) -> the momentum buffer starts at this step

    def _group_ok(self, group: dict) -> bool:
        return (_is_float(group["lr"]) and not group.get("differentiable", False)
                and group.get("fused") in (None, False))

    def _fresh(self, buf: FlatBuffer) -> None:
        self.first[id(buf)] = True

    def _gathered(self, buf: FlatBuffer, states) -> None:
        self.first[id(buf)] = False

    def prepare(self, buffers, groups) -> bool:
        if not all(_is_float(groups[b.group_index]["momentum"]) for b in buffers):
            return False
        if all(groups[b.group_index]["momentum"] == 0 for b in buffers):
            return all(self._group_ok(groups[b.group_index]) for b in buffers)
        return super().prepare(buffers, groups)

    def step(self, ops, buf: FlatBuffer, group: dict, psf, backup, coeff: float):
        stats = self.launch(ops, buf, group, psf, backup, coeff)
        self.advance(buf, group)
        return stats

    def launch(self, ops, buf: FlatBuffer, group: dict, psf, backup, coeff: float, scalars=None):
        """The fused op alone, no bookkeeping (what a captured step records). With ``scalars``
        (``sgd_scalars``) lr and coeff are read from the device; the floats passed are NaN, so a
        kernel that read them instead would show it."""
        momentum = group["momentum"]
        first = self.first.get(id(buf), True)
        mbuf = self.flat_state[id(buf)]["momentum_buffer"] if momentum != 0 else None
        lr = group["lr"] if scalars is None else math.nan
        return ops.sgd_step(buf.param, buf.grad, mbuf, psf, backup, coeff, buf.stat_start, lr,
                            group["weight_decay"], momentum, group["dampening"], group["nesterov"],
                            group["maximize"], first, scalars)

    def advance(self, buf: FlatBuffer, group: dict) -> None:
        """After the op: the momentum buffers exist from the first step on."""
        if group["momentum"] != 0 and self.first.get(id(buf), True):
            self.first[id(buf)] = False
            self._install(buf)

    def scalars(self, buf: FlatBuffer, group: dict, coeff: float) -> List[float]:
        """This step's device scalars (``vsam_ext.ops.scalars``)."""
        return sgd_scalars(coeff, group["lr"])

    def settled(self, buf: FlatBuffer, group: dict) -> bool:
        """Whether the next steps run the same kernels (no first step to come)."""
        return group["momentum"] == 0 or not self.first.get(id(buf), True)


class FusedAdamW(_FusedBase):
    """torch.optim.AdamW (and Adam without weight decay): no amsgrad, capturable or fused."""

    keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, base: torch.optim.Optimizer) -> None:
        super().__init__(base)
        self.steps = {}                # id(FlatBuffer) -> (per-parameter step tensor, count)

    def _group_ok(self, group: dict) -> bool:
        decoupled = isinstance(self.base, torch.optim.AdamW) or group.get("decoupled_weight_decay", False) \
            or group["weight_decay"] == 0
        return (decoupled and _is_float(group["lr"]) and not group.get("amsgrad", False)
                and not group.get("capturable", False) and group.get("fused") in (None, False)
                and not group.get("differentiable", False) and all(_is_float(b) for b in group["betas"]))

    def _fresh(self, buf: FlatBuffer) -> None:
        self.steps[id(buf)] = (torch.zeros(len(buf.params), dtype=torch.float32), 0)

    def _consistent(self, states) -> bool:
        steps = {float(s["step"]) for s in states if torch.is_tensor(s.get("step")) and s["step"].device.type == "cpu"}
        return len(steps) == 1 and all(torch.is_tensor(s.get("step")) for s in states)

    def _gathered(self, buf: FlatBuffer, states) -> None:
        count = int(float(states[0]["step"]))
        steps = torch.full((len(buf.params),), float(count), dtype=torch.float32)
        for i, state in enumerate(states):
            state["step"] = steps[i]
        self.steps[id(buf)] = (steps, count)

    def step(self, ops, buf: FlatBuffer, group: dict, psf, backup, coeff: float):
        stats = self.launch(ops, buf, group, psf, backup, coeff)
        self.advance(buf, group)
        return stats

    def launch(self, ops, buf: FlatBuffer, group: dict, psf, backup, coeff: float, scalars=None):
        """The fused op alone, no bookkeeping (what a captured step records). With ``scalars``
        (``adamw_scalars``) the lr-dependent values and the bias corrections are read from the
        device; the lr passed is NaN and the step count 1, so a kernel that used them would show it."""
        count = self.steps[id(buf)][1]
        flat = self.flat_state[id(buf)]
        beta1, beta2 = group["betas"]
        lr, step = (group["lr"], count + 1) if scalars is None else (math.nan, 1)
        return ops.adamw_step(buf.param, buf.grad, flat["exp_avg"], flat["exp_avg_sq"], psf, backup, coeff,
                              buf.stat_start, lr, beta1, beta2, group["eps"], group["weight_decay"],
                              step, group["maximize"], scalars)

    def advance(self, buf: FlatBuffer, group: dict) -> None:
        """After the op: the step count, and the base's per-parameter 'step' (CPU tensors)."""
        steps, count = self.steps[id(buf)]
        count += 1
        steps.add_(1.0)
        self.steps[id(buf)] = (steps, count)
        if count == 1:
            self._install(buf)
            for i, p in enumerate(buf.params):
                self.base.state[p]["step"] = steps[i]

    def scalars(self, buf: FlatBuffer, group: dict, coeff: float) -> List[float]:
        """This step's device scalars (``vsam_ext.ops.scalars``), for step count + 1."""
        beta1, beta2 = group["betas"]
        return adamw_scalars(coeff, group["lr"], beta1, beta2, group["weight_decay"], self.steps[id(buf)][1] + 1)

    def settled(self, buf: FlatBuffer, group: dict) -> bool:
        return self.steps.get(id(buf), (None, 0))[1] >= 1


def fused_base_for(base: torch.optim.Optimizer) -> Optional[_FusedBase]:
    """The fused adapter for ``base``, or None when its step must run as ``base.step()``."""
    if type(base) is torch.optim.SGD:
        return FusedSGD(base)
    if type(base) in (torch.optim.AdamW, torch.optim.Adam):
        return FusedAdamW(base)
    return None
