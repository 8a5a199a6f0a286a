"""The shared two-pass driver: every optimizer of the package is this class plus a controller.

One step, on flat buffers (see ``vsam_ext.flat``):

    closure #1 -> g in the flat grad buffer
    controller.decide()  (host, no sync) -- cheap step? --> [reuse g + coeff*PSF] + base step
                                             | SAM step
    norm pass -> device scalar rho/(||g||+eps); perturb pass (saves the weights)
    closure #2 at w + e (BatchNorm running statistics frozen)
    restore pass [+ PSF + statistics] + base step with g_sam

For torch.optim.SGD and AdamW the restore (or the reuse) and the base step are one fused pass
(``_fused_base``); any other base optimizer runs ``base.step()`` on the final gradient.
Subclasses pick the controller and may override ``_record_psf`` and ``_reuse_coeff``. The
maths lives in the backend ops (``vsam_ext.ops``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional

import torch

from .. import ops
from .._warn import warn_user
from ..arguments import check
from ..flat import FlatParams
from . import _bn
from ._amp import unscale_and_check
from ._asam import resolve_adaptive
from ._ddp import check_perturbation, mean_across_ranks
from ._fused_base import fused_base_for
from ._kwargs import check_base_kwargs
from ._sharded_checkpoint import add_placeholders, loaded_base_state
from ._step_hooks import post_hooks, pre_hooks, run_as_step

__all__ = ["TwoPassOptimizer"]

EPS = 1e-12


def on_one_device(scalars: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """Per-buffer scalars moved to ``device`` (non-blocking) in the widest of their dtypes (fp64
    when any buffer is fp64), ready to be added up."""
    dtype = torch.float32
    for s in scalars:
        dtype = torch.promote_types(dtype, s.dtype)
    return [s.to(device, dtype, non_blocking=True) for s in scalars]


_FORMAT = 1


def check_rho(rho) -> float:
    return check("SAM", "rho", rho)


def _check_groups(groups) -> None:
    for i, group in enumerate(groups):
        lr = group.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not (lr >= 0):
            raise ValueError(f"lr must be >= 0, got {lr} (param group {i})")
        check_rho(group["rho"])
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be a bool in a param group, got {type(group['adaptive']).__name__} "
                            f"(param group {i}); the flavour is chosen on the optimizer")
        resolve_adaptive(group["adaptive"], group["eta"], "all")


class TwoPassOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that wraps a base optimizer (davda54/sam style)."""

    def __init__(self, params, base_optimizer, controller, *, rho: float = 0.05,
                 adaptive=False, eta: Optional[float] = None, adaptive_params=None,
                 model: Optional[torch.nn.Module] = None,
                 backend: Optional[str] = None, stat_tensors: Optional[int] = None, fused_base: bool = True,
                 perturbation: str = "global", param_storage: str = "flat", **base_kwargs) -> None:
        check_base_kwargs(self, base_optimizer, base_kwargs)     # a typo names our class, not the base's
        rho = check_rho(rho)
        check("SAM", "fused_base", fused_base)
        adaptive, eta, self._adaptive_filter = resolve_adaptive(adaptive, eta, adaptive_params)
        if "lr" in base_kwargs:
            _check_groups([{"lr": base_kwargs["lr"], "rho": rho, "adaptive": adaptive, "eta": eta}])
        self._bn_modules = _bn.batchnorm_modules(model)
        self._per_rank_ddp = check_perturbation(perturbation, model)
        self.controller = controller
        self.base_optimizer: Optional[torch.optim.Optimizer] = None
        self.flat = FlatParams(stat_tensors, in_place=check("SAM", "param_storage", param_storage) == "in_place")
        params = _param_list(params)
        ours = dict(rho=rho, adaptive=adaptive, eta=eta)
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            super().__init__(params, dict(ours, **base_kwargs))
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        elif isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"base_optimizer is an instance, so {sorted(base_kwargs)} would be ignored; "
                                f"set them on the instance or pass the class")
            _check_same_params(params, base_optimizer)
            super().__init__(params, dict(ours))
            self.base_optimizer = base_optimizer
            for group in base_optimizer.param_groups:
                for key, value in ours.items():
                    group.setdefault(key, value)
        else:
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class or an instance built on "
                            f"the same parameters, got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:          # an instance built on a list with repeats
            group["params"] = _unique(group["params"])
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        _check_groups(self.param_groups)
        self._built_adaptive: List[bool] = []
        for i, group in enumerate(self.param_groups):
            self._add_flat_group(i, group)
        if not self.flat.managed:
            raise ValueError("params: no parameter requires grad, so there is nothing to optimize")
        self.backend, self._ops = ops.resolve_dispatch(backend, [b.device for b in self.flat.buffers])
        self._fused_base = fused_base_for(self.base_optimizer) if fused_base else None
        self._phase: Optional[str] = None      # None, "sam" (between the passes) or "cheap"
        self.skipped_steps = 0                 # steps skipped for non-finite gradients (GradScaler)
        self._inactive: List[torch.Tensor] = []
        self._bn_flags: List[bool] = []
        self._in_step = False                  # inside step(): torch's wrapper runs our step hooks

    # -- torch.optim.Optimizer plumbing --------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if self.base_optimizer is None:        # called by torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("rho", "adaptive", "eta"):
            group.setdefault(key, self.defaults[key])
        _check_groups([group])
        self._add_flat_group(len(self.param_groups) - 1, group)
        if self._fused_base is not None:
            self._fused_base.invalidate()        # the new buffer's state is gathered on first use

    def _add_flat_group(self, index: int, group: dict) -> None:
        self._built_adaptive.append(group["adaptive"])
        self.flat.add_group(index, group["params"], self._adaptive_filter if group["adaptive"] else None)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place. The ``.grad`` of every parameter in the flat buffers is a
        view of one gradient buffer and stays one: a zero tensor, not None, and no memory is freed.
        ``set_to_none=True`` (torch's default) cannot drop them without undoing that layout, so it
        zeroes in place too and warns once; what None means to torch still holds for the step: a
        parameter that gets no gradient in the next backward is left untouched (no decay, no
        momentum). Parameters outside the buffers (frozen at construction) get None, and so do the
        parameters left in place (``param_storage="in_place"``, FSDP2), as torch does.
        ``model.zero_grad()`` works too (gradients set to None are pulled back in, with a copy)."""
        if set_to_none and not all(b.sharded for b in self.flat.buffers) \
                and not getattr(self, "_warned_set_to_none", False):
            self._warned_set_to_none = True
            warn_user(f"{type(self).__name__}.zero_grad(set_to_none=True): the gradients are views of one flat "
                      f"buffer, so they are zeroed in place (a zero tensor, not None; no memory is freed); a "
                      f"parameter that gets no gradient in the next backward is still skipped by the step, as "
                      f"with None. Call zero_grad() (set_to_none=False, our default) to silence this")
        self.flat.zero_grads()
        for p in self.flat.unmanaged:
            p.grad = None

    # -- the step ------------------------------------------------------------------------
    # torch.compile would trace the host bookkeeping (the controller's decision, the PSF record)
    # and lose attribute updates at its graph breaks; the steps run eagerly instead, so a compiled
    # opt.step equals the eager one. A compiled model inside the closure stays compiled.
    @torch.compiler.disable
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, grad_scaler=None):
        """One optimizer step. ``closure`` runs forward + backward and returns the loss; it is
        called twice on a SAM step, once otherwise; the loss of the first call is returned.

        ``grad_scaler``: a ``torch.amp.GradScaler`` whose ``scale(loss)`` the closure
        backpropagates (fp16); a step whose gradients overflow in either pass is skipped as a
        whole. Call ``grad_scaler.update()`` after the step (see ``_amp``).

        Raises ``TypeError`` without a closure, ``RuntimeError`` when the closure's backward
        reached no parameter (nothing changed then)."""
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step() needs a closure that runs forward + backward "
                            f"and returns the loss; or call first_step() / second_step() yourself "
                            f"(with a GradScaler: opt.step(closure, grad_scaler=scaler); scaler.update()). "
                            f"Trainers that call step() without a closure (GradScaler.step(opt), Lightning's "
                            f"'16-mixed', the HF Trainer) cannot run a second pass: see the README, "
                            f"'Frameworks: Lightning and accelerate'")
        with self._stepping():
            return self._step(torch.enable_grad()(closure), grad_scaler)

    @contextlib.contextmanager
    def _stepping(self):
        """Inside ``step()``: torch's wrapper of ``step`` runs the step hooks, so
        ``first_step``/``second_step`` do not run them again."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    def _step(self, closure: Callable[[], torch.Tensor], grad_scaler):
        self.zero_grad()
        if self._per_rank_ddp is not None:
            with self._per_rank_ddp.no_sync():
                loss = closure()
        else:
            loss = closure()
        if not self.flat.received_any():
            self.flat.check()                # a re-pointed parameter is the better diagnosis
        if not self.flat.received_any():
            raise RuntimeError(f"{type(self).__name__}.step(closure): no gradient reached any parameter; the "
                               f"closure must run the forward, call loss.backward() and return the loss "
                               f"(nothing was changed); or the model's parameters are no longer the ones the "
                               f"optimizer was built on (replaced, e.g. by load_state_dict(assign=True): build "
                               f"the optimizer after that). Gradients written into .grad by hand work with "
                               f"first_step() / second_step()")
        if not unscale_and_check(self, grad_scaler, first_pass=True):
            return self._skip(loss)
        snapshot = self._decision_snapshot(grad_scaler)
        if self.first_step() and not self._second_pass(closure, grad_scaler, snapshot):
            return self._skip(loss)
        self.second_step()
        return loss

    def _decision_snapshot(self, grad_scaler) -> Optional[dict]:
        """With a GradScaler, the controller's state before it decides: an overflow in the second
        pass undoes the decision. (Queued statistics belong to earlier steps: fed first, kept.)"""
        if grad_scaler is None:
            return None
        self._feed_stats()
        return self.controller.state_dict()

    def _second_pass(self, run: Callable[[], object], grad_scaler, snapshot: Optional[dict]) -> bool:
        """The second forward/backward at ``w + e``. If it raises, the weights and BatchNorm are
        put back and the error goes on; if its gradients overflowed (GradScaler), the perturbation
        and the controller's decision are undone and the result is False: skip the step."""
        try:
            run()
        except BaseException:
            self._abort()
            raise
        if not unscale_and_check(self, grad_scaler, first_pass=False):
            self._abort()
            self.controller.load_state_dict(snapshot)
            return False
        return True

    def _skip(self, loss):
        """A step with non-finite (overflowed) gradients: nothing changes but the count."""
        self.skipped_steps += 1
        self.zero_grad()
        return loss

    @torch.compiler.disable
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        """After the backward at ``w``: decide this step's kind. ``True``: the weights are now
        perturbed and the gradients zeroed: run one more forward+backward, then
        ``second_step()``. ``False``: call ``second_step()`` directly. (``zero_grad`` is
        accepted for davda54/sam compatibility; the gradients are always zeroed for pass 2.)"""
        if self._phase is not None:
            raise RuntimeError("first_step() called twice: call second_step() to finish the step first")
        if not self._in_step:                  # the two-call form: torch's step() plumbing is ours to run
            pre_hooks(self)
        self._inactive = self.flat.check()
        self._feed_stats(before_decide=True)
        if not self.controller.decide():
            if self._per_rank_ddp is not None:         # the base step needs the averaged gradient
                for b in self.flat.buffers:
                    mean_across_ranks(self._per_rank_ddp, b.grad)
            self._phase = "cheap"
            self.flat.accepting = False
            return False
        self._perturb()
        if self._per_rank_ddp is not None and self._keeps_grad:
            for b in self.flat.buffers:                # the PSF / g_v from the averaged g
                mean_across_ranks(self._per_rank_ddp, b.psf)
        self.zero_grad()
        self._bn_flags = _bn.freeze_running_stats(self._bn_modules)
        self._phase = "sam"
        return True

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Finish the step: restore the weights after a SAM step (or apply the cheap-step rule)
        and take the base optimizer's step. ``zero_grad=True`` zeroes the gradients after."""
        if self._phase is None:
            raise RuntimeError("second_step() called without first_step()")
        if self._phase == "cheap":
            self.flat.accepting = True
            if self.flat.late_grad:
                self.flat.late_grad = False
                self._phase = None
                raise RuntimeError("first_step() returned False, but a backward ran before second_step(): "
                                   "run the second forward/backward only when first_step() returns True "
                                   "(its gradients would have been added to this step's)")
        else:
            # The second backward may have replaced .grad (model.zero_grad() in the closure,
            # create_graph=True): pull such gradients into the flat buffer. A parameter counts
            # as without gradient only if it got none in either pass.
            missing = {id(p) for p in self.flat.check()}
            self._inactive = [p for p in self._inactive if id(p) in missing]
        # A parameter that got no gradient, or one unfrozen after construction (outside the flat
        # buffers), needs base.step(): the fused step covers exactly the flat buffers.
        fused = self._fused_base if (self._fused_base is not None and not self._inactive
                                     and not any(p.grad is not None for p in self.flat.unmanaged)
                                     and self._fused_base.prepare(self.flat.buffers, self.param_groups)) else None
        wants_psf = self.controller.wants_psf
        if self._phase == "sam":
            _bn.unfreeze_running_stats(self._bn_modules, self._bn_flags)
            self._after_second_pass()

            def passes():
                pairs = []
                for b in self.flat.buffers:
                    psf = b.psf if wants_psf else None
                    if fused is not None:
                        pairs.append(fused.step(self._ops, b, self.param_groups[b.group_index], psf, b.backup, 0.0))
                    else:
                        pairs.append(self._ops.restore_psf_stats(b.param, b.backup, b.grad, psf, b.stat_start))
                return pairs
        else:
            self._adjust_cheap_grad()
            coeff = self._reuse_coeff()

            def passes():
                for b in self.flat.buffers:
                    psf = b.psf if coeff != 0.0 else None
                    if fused is not None:
                        fused.step(self._ops, b, self.param_groups[b.group_index], psf, None, coeff)
                    elif psf is not None:
                        self._ops.reuse(b.grad, psf, coeff)
        # The fused passes are the base optimizer's step: its hooks, profiling record and
        # scheduler mark go with them, as base.step() would give them.
        pairs = run_as_step(self.base_optimizer, passes) if fused is not None else passes()
        self.flat.written()
        if self._phase == "sam" and wants_psf:
            self._record_psf(pairs)
        self._phase = None
        if fused is None:
            self._base_step()
        if zero_grad:
            self.zero_grad()
        if not self._in_step:
            post_hooks(self)

    def _grad_sumsq(self, scaled: bool = True) -> torch.Tensor:
        """``||T g||^2`` over every buffer (``T = 1`` unless ``scaled`` and ASAM), a 0-d tensor
        on the first buffer's device (no host sync), in the maths dtype: fp32, fp64 when a buffer
        is fp64 (ALGORITHMS.md, "Precision of the scalars")."""
        bufs = self.flat.buffers
        home = bufs[0].device
        sums = []
        for b in bufs:
            group = self.param_groups[b.group_index]
            if group["adaptive"] != self._built_adaptive[b.group_index]:
                raise ValueError(f"adaptive of param group {b.group_index} changed after the optimizer was built; "
                                 f"it decides the buffer layout, so build a new optimizer")
            weight = b.param if scaled and b.scaled else None
            # Per tensor, then added: the same sums, in the same order, as over tensor lists;
            # empty tensors are no segment of their own, so they change no rounding.
            bounds = list(dict.fromkeys(b.bounds()))
            sums.append(self._ops.segment_sumsq(b.grad, bounds, weight, group["eta"]).sum().reshape(1))
        return self._global(torch.cat(on_one_device(sums, home)).sum())

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        """A sum over the local elements made the sum over all of them: summed over the ranks
        that shard the parameters (FSDP2); unchanged otherwise."""
        group = self.flat.shard_group
        return local if group is None else group.all_reduce(local.contiguous())

    def _perturb(self, norm: Optional[torch.Tensor] = None, radius_factor: float = 1.0) -> None:
        """``w <- w + rho * T^2 g / (||T g|| + eps)`` on every buffer (``radius_factor``
        multiplies rho); the norm stays on the device."""
        if norm is None:
            norm = self._grad_sumsq().sqrt()
        keep = self._keeps_grad
        for b in self.flat.buffers:
            group = self.param_groups[b.group_index]
            scale = (group["rho"] * radius_factor / (norm + EPS)).to(b.device, ops.reference.maths_dtype(b.dtype),
                                                                     non_blocking=True)
            if b.backup is None:
                b.backup = b.new_buffer()
            if keep and b.psf is None:
                b.psf = b.new_buffer()
            self._ops.perturb(b.param, b.grad, scale, b.backup, b.scaled, b.psf if keep else None, group["eta"])
        self.flat.written()

    def _base_step(self) -> None:
        if self._fused_base is not None:
            self._fused_base.invalidate()    # base.step() may replace or create state tensors
        for p in self._inactive:             # got no gradient: the base optimizer skips it
            p.grad = None
        try:
            self.base_optimizer.step()
        finally:
            if self._inactive:
                for buf in self.flat.buffers:
                    if buf.sharded:
                        continue
                    for p, view in zip(buf.params, buf.grad_views):
                        p.grad = view
                self._inactive = []

    def _abort(self) -> None:
        """The second closure failed: put the weights and BatchNorm back, drop the step."""
        if self._phase == "sam":
            _bn.unfreeze_running_stats(self._bn_modules, self._bn_flags)
            for b in self.flat.buffers:
                b.load_weights(b.backup)
            self.flat.written()
            self._on_abort()
        self._phase = None
        self._inactive = []

    # -- hooks for subclasses ------------------------------------------------------------
    @property
    def _keeps_grad(self) -> bool:
        """Whether the perturbation copies ``g`` into each buffer's ``psf`` slot."""
        return self.controller.wants_psf

    def _after_second_pass(self) -> None:
        """After a SAM step's second backward, before the restore and the base step (the
        gradient buffers hold ``g_s``; ``psf`` holds ``g`` when ``_keeps_grad``)."""

    def _adjust_cheap_grad(self) -> None:
        """On a cheap step, before the base step: change the gradient in place."""

    def _record_psf(self, pairs) -> None:
        """After a SAM step of a controller that wants the PSF: the per-buffer statistics pairs."""

    def _reuse_coeff(self) -> float:
        """On a cheap step: the weight of the stored PSF added to the gradient (0: none)."""
        return 0.0

    def _on_abort(self) -> None:
        """A SAM step was abandoned after the perturbation (the second closure raised)."""

    def _feed_stats(self, before_decide: bool = False) -> list:
        return []

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # -- read-back and checkpoints -------------------------------------------------------
    @property
    def stats(self) -> Dict[str, object]:
        """A snapshot: steps, sam_steps, last_step_sam, quota, probability, backend, ..."""
        return dict(self.controller.stats(), backend=self.backend, skipped_steps=self.skipped_steps)

    def state_dict(self) -> dict:
        if self._phase is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): finish the step first")
        self._feed_stats()
        base = self.base_optimizer.state_dict()
        stateful = len(base["state"])
        placeholders = add_placeholders(self, base) if self.flat.shard_group is not None else []
        return {"base": base,
                "vsam_ext": {"format": _FORMAT, "optimizer": type(self).__name__,
                             "layout": self.flat.state_layout(),
                             "controller": self.controller.state_dict(),
                             "skipped_steps": self.skipped_steps,
                             "stateful_params": stateful, "placeholders": placeholders,
                             "extra": self._extra_state()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._phase is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(): finish the step first")
        ours = state_dict.get("vsam_ext") if isinstance(state_dict, dict) else None
        if ours is None or "base" not in state_dict:
            raise ValueError("state_dict: not a vsam_ext optimizer checkpoint (no 'vsam_ext' section)")
        if ours.get("format") != _FORMAT:
            raise ValueError(f"state_dict: checkpoint format {ours.get('format')} is not {_FORMAT}")
        if ours["optimizer"] != type(self).__name__:
            raise ValueError(f"state_dict: checkpoint is of {ours['optimizer']}, this optimizer is "
                             f"{type(self).__name__}")
        layout = _plain(ours["layout"])
        if layout != self.flat.state_layout():
            raise ValueError(f"state_dict: parameter layout {layout} (group, dtype, numel, tensor shapes per "
                             f"buffer) does not match this optimizer's {self.flat.state_layout()}")
        self._feed_stats()                   # drop nothing queued into the state we replace
        self.base_optimizer.load_state_dict(loaded_base_state(ours, state_dict["base"]))
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if self._fused_base is not None:
            self._fused_base.invalidate()
        self.controller.load_state_dict(ours["controller"])
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        self._load_extra_state(ours["extra"])


def _param_list(params) -> list:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, got a single tensor")
    params = list(params)
    if not params:
        raise ValueError("params: got an empty parameter list")
    if all(isinstance(x, dict) for x in params):
        return [dict(x, params=_tensor_list(x.get("params"))) for x in params]
    return _unique(params)


def _tensor_list(params) -> list:
    return _unique([params] if isinstance(params, torch.Tensor) else list(params or []))


def _unique(tensors: list) -> list:
    """A tensor listed twice in a group is one parameter (stepped once), first place kept."""
    seen = set()
    return [p for p in tensors if not (id(p) in seen or seen.add(id(p)))]


def _plain(obj):
    """Tuples to lists, recursively: a layout as saved compares with one as built."""
    return [_plain(x) for x in obj] if isinstance(obj, (list, tuple)) else obj


def _check_same_params(params: list, base: torch.optim.Optimizer) -> None:
    ours = [p for x in params for p in (x["params"] if isinstance(x, dict) else [x])]
    theirs = [p for g in base.param_groups for p in g["params"]]
    if {id(p) for p in ours} != {id(p) for p in theirs}:
        raise ValueError("params must be the parameters the base_optimizer instance was built on")
