"""The whole optimizer step replayed from CUDA graphs: ``GraphedStep(opt, closure)``.

For small models and small batches a SAM step is mostly launch gaps. The controller decides on
the host, so a step is at most two graphs out of four, each captured once and then replayed as
the host decides:

* ``front``: zero the gradients, closure #1 (forward + backward at ``w``);
* ``sam``: the norm pass, the perturbation, closure #2 at ``w + e`` (BatchNorm running statistics
  frozen), the restore (+ PSF and statistics) fused with the base step;
* ``cheap`` with or without the PSF: the base step, fused with vSAM's reuse ``g + coeff * PSF``.

What changes from step to step on the host reaches the kernels through one float64 device tensor
per buffer, written before each replay (``vsam_ext.ops.scalars``): ``lr`` (an LR scheduler),
vSAM's reuse weight, AdamW's bias corrections. Everything else a graph bakes in (``rho``,
momentum, weight decay, betas, eps, the buffers' addresses) is compared before every call with
what was captured; a change re-captures the graphs after ``warmup_steps`` eager steps
(``captures`` counts the captures). The host bookkeeping (the controller, vSAM's statistics
queue, AdamW's step counts, the step hooks and the LR scheduler's mark) runs eagerly, as in
``opt.step(closure)``, so the results are the same bit for bit (python_tests/test_graphs.py).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, Optional

import torch

from .arguments import check
from .optim import _bn
from .optim._driver import TwoPassOptimizer
from .optim._step_hooks import run_as_step

__all__ = ["GraphedStep", "CudaGraph"]

# The device work of a step lives in these methods of the driver; a subclass that overrides one
# (LookSAM, AE-SAM, ESAM, AUSAM) does device work or host syncs of its own that the graphs
# below would not replay.
_DRIVER_METHODS = ("step", "first_step", "second_step", "_step", "_perturb", "_after_second_pass",
                   "_adjust_cheap_grad", "_keeps_grad", "_grad_sumsq")


class CudaGraph:
    """One ``torch.cuda.CUDAGraph``; the graphs of a ``GraphedStep`` share one memory pool."""

    def __init__(self, pool=None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], object]) -> object:
        """Records ``fn`` (nothing runs yet) and returns its outputs: static tensors that every
        ``replay()`` overwrites."""
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        self.pool = self.graph.pool()
        return out

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """``opt.step(closure)`` replayed from CUDA graphs (the closure's forward and backward
    included); call it once per training step in place of ``opt.step(closure)``.

    ``GraphedStep(opt, closure, warmup_steps=3)``:

    * ``opt``: a ``SAM``, ``PeriodicSAM`` or ``VSAM`` over ``torch.optim.SGD`` or ``AdamW`` with
      the fused base step (the default), flat parameter storage (the default), one CUDA device,
      no ``perturbation="per_rank"`` and no FSDP. Other family members (LookSAM, AE-SAM, ESAM,
      AUSAM) do device work or host reads of their own between the passes: ``TypeError``.
    * ``closure``: runs forward + backward on **static** tensors (copy each batch into the same
      input/target tensors, same shapes) and returns the loss; no host reads inside (no
      ``loss.item()``), every parameter gets a gradient. As ``torch.cuda.graphs``' whole-network
      capture requires.
    * ``warmup_steps``: eager ``opt.step(closure)`` calls (on a side stream) before the graphs
      are captured, an int >= 1; also after anything baked into the graphs changes.

    Returns the loss of the first pass: a tensor that the next call overwrites (``.item()`` or
    ``.clone()`` it to keep it). ``captures``: graphs captured so far (one to four per capture).
    No ``GradScaler`` (a skipped step needs a host read of the overflow flag): use bf16 autocast.
    ``graph_type``: the graph class (``CudaGraph``; the test suite passes a CPU stand-in that
    checks every replay would run the ops it captured).
    Errors: ``TypeError`` for an optimizer it cannot replay, ``RuntimeError`` when the closure
    left a parameter without a gradient at capture (nothing is replayed then).
    """

    def __init__(self, opt: TwoPassOptimizer, closure: Callable[[], torch.Tensor], *, warmup_steps: int = 3,
                 graph_type: Optional[type] = None) -> None:
        _check_supported(opt)
        if not callable(closure):
            raise TypeError(f"closure must be callable (forward + backward, returning the loss), got "
                            f"{type(closure).__name__}")
        self.opt = opt
        self.closure = closure
        self.warmup_steps = check("GraphedStep", "warmup_steps", warmup_steps)
        self.graph_type = graph_type or CudaGraph
        if self.graph_type is CudaGraph and not all(b.device.type == "cuda" for b in opt.flat.buffers):
            raise TypeError("GraphedStep: CUDA graphs need every parameter on a CUDA device")
        self.captures = 0
        self._graphs: Dict[object, tuple] = {}
        self._pool = None
        self._baked: Optional[tuple] = None
        self._eager_steps = 0
        self._scalars: Dict[int, torch.Tensor] = {}

    # -- one training step ----------------------------------------------------------------
    def __call__(self) -> torch.Tensor:
        opt = self.opt
        if opt._phase is not None:
            raise RuntimeError("GraphedStep: the optimizer is between first_step() and second_step()")
        if self._graphs and self._baked_now() != self._baked:
            self._graphs.clear()               # something a graph baked in changed: capture again
            self._eager_steps = 0
        if not self._graphs and (self._eager_steps < self.warmup_steps or not self._settled()):
            self._eager_steps += 1
            return self._eager_step()
        if not self._graphs:
            self._prepare()
        return run_as_step(opt, self._replayed_step)

    def _eager_step(self) -> torch.Tensor:
        if self.graph_type is not CudaGraph:
            return self.opt.step(self.closure)
        side = torch.cuda.Stream()               # torch.cuda.graphs: warm up on a side stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.opt.step(self.closure)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _replayed_step(self) -> torch.Tensor:
        opt, fused = self.opt, self.opt._fused_base
        loss = self._replay("front", self._front)
        opt._feed_stats(before_decide=True)
        if not fused.prepare(opt.flat.buffers, opt.param_groups):
            raise RuntimeError("GraphedStep: the base step can no longer be fused (a param group option "
                               "changed to one the fused step does not take); use opt.step(closure)")
        if opt.controller.decide():
            self._write_scalars(0.0)
            pairs = run_as_step(opt.base_optimizer, lambda: self._replay("sam", self._sam_tail))
            opt.flat.written()
            if opt.controller.wants_psf:
                opt._record_psf(list(pairs))
        else:
            coeff = opt._reuse_coeff()
            key = ("cheap", coeff != 0.0)
            self._write_scalars(coeff)
            run_as_step(opt.base_optimizer, lambda: self._replay(key, lambda: self._cheap_tail(coeff != 0.0)))
            opt.flat.written()
        for b in opt.flat.buffers:
            fused.advance(b, opt.param_groups[b.group_index])
        return loss

    # -- what the graphs hold ---------------------------------------------------------------
    def _front(self) -> torch.Tensor:
        self.opt.zero_grad()
        with torch.enable_grad():
            loss = self.closure()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"GraphedStep: the closure must return the loss tensor, got {type(loss).__name__}")
        return loss

    def _sam_tail(self) -> list:
        opt = self.opt
        opt._perturb()
        opt.zero_grad()
        flags = _bn.freeze_running_stats(opt._bn_modules)
        try:
            with torch.enable_grad():
                self.closure()
        finally:
            _bn.unfreeze_running_stats(opt._bn_modules, flags)
        wants_psf = opt.controller.wants_psf
        return [self._launch(b, b.psf if wants_psf else None, b.backup, 0.0) for b in opt.flat.buffers]

    def _cheap_tail(self, reuse: bool) -> None:
        for b in self.opt.flat.buffers:     # the reuse weight comes from the scalars (NaN: not read)
            self._launch(b, b.psf if reuse else None, None, math.nan if reuse else 0.0)

    def _launch(self, b, psf, backup, coeff: float):
        opt = self.opt
        return opt._fused_base.launch(opt._ops, b, opt.param_groups[b.group_index], psf, backup, coeff,
                                      self._scalars[id(b)])

    def _write_scalars(self, coeff: float) -> None:
        opt = self.opt
        for b in opt.flat.buffers:
            values = opt._fused_base.scalars(b, opt.param_groups[b.group_index], coeff)
            self._scalars[id(b)].copy_(torch.tensor(values, dtype=torch.float64))

    def _replay(self, key, fn: Callable[[], object]):
        entry = self._graphs.get(key)
        if entry is None:
            graph = self.graph_type(self._pool)
            out = graph.capture(fn)
            self._pool = graph.pool
            self.captures += 1
            if key == "front":
                self._check_front()
            entry = self._graphs[key] = (graph, out)
        entry[0].replay()
        return entry[1]

    # -- capture conditions --------------------------------------------------------------
    def _settled(self) -> bool:
        """The fused step runs the kernels it will run from now on (the base's state gathered,
        momentum buffers and AdamW state created)."""
        opt = self.opt
        fused = opt._fused_base
        return fused.prepare(opt.flat.buffers, opt.param_groups) and \
            all(fused.settled(b, opt.param_groups[b.group_index]) for b in opt.flat.buffers)

    def _prepare(self) -> None:
        """Before the first capture: every buffer a graph writes exists (outside the graphs' memory),
        and what the graphs bake in is noted."""
        opt = self.opt
        for b in opt.flat.buffers:
            if b.backup is None:
                b.backup = b.new_buffer()
            if opt._keeps_grad and b.psf is None:
                b.psf = b.new_buffer()
            n = len(opt._fused_base.scalars(b, opt.param_groups[b.group_index], 0.0))
            self._scalars[id(b)] = torch.zeros(n, dtype=torch.float64, device=b.device)
        self._baked = self._baked_now()

    def _check_front(self) -> None:
        opt = self.opt
        missing = opt.flat.check()
        late = [p for p in opt.flat.unmanaged if p.grad is not None]
        if missing or late:
            self._graphs.clear()
            raise RuntimeError(f"GraphedStep: the closure left {len(missing)} parameter(s) without a gradient"
                               f"{' and gave ' + str(len(late)) + ' frozen one(s) a gradient' if late else ''}; a "
                               f"replayed step updates exactly the parameters of the capture: use opt.step(closure)")

    def _baked_now(self) -> tuple:
        """What the graphs bake in: every group option but lr, the buffers and the state tensors."""
        opt = self.opt
        groups = tuple(tuple(sorted((k, repr(v)) for k, v in g.items() if k not in ("params", "lr")))
                       for g in opt.param_groups)
        fused = opt._fused_base
        ptrs = []
        for b in opt.flat.buffers:
            ptrs += [t.data_ptr() for t in (b.param, b.grad, b.psf, b.backup) if t is not None]
            for t in fused.flat_state.get(id(b), {}).values():
                ptrs.append(t.data_ptr())
        return groups, tuple(ptrs), fused.valid, len(opt.flat.buffers)


def _check_supported(opt) -> None:
    if not isinstance(opt, TwoPassOptimizer):
        raise TypeError(f"GraphedStep: opt must be a vsam_ext SAM, PeriodicSAM or VSAM, got {type(opt).__name__}")
    own = [m for m in _DRIVER_METHODS                # (torch wraps each class's step(): unwrapped)
           if inspect.unwrap(getattr(type(opt), m)) is not inspect.unwrap(getattr(TwoPassOptimizer, m))]
    if own:
        raise TypeError(f"GraphedStep: {type(opt).__name__} runs its own {', '.join(own)} (device work or host "
                        f"reads between the passes that a graph would not replay); SAM, PeriodicSAM and VSAM can "
                        f"be replayed, others use opt.step(closure)")
    if opt._fused_base is None:
        raise TypeError(f"GraphedStep: the base optimizer {type(opt.base_optimizer).__name__} runs its own step() "
                        f"(host code a graph cannot replay); use torch.optim.SGD or AdamW with fused_base=True")
    if opt._per_rank_ddp is not None or opt.flat.shard_group is not None:
        raise TypeError("GraphedStep: perturbation='per_rank' and FSDP2 are not supported")
    if any(b.sharded for b in opt.flat.buffers) or opt.flat.in_place:
        raise TypeError("GraphedStep: needs param_storage='flat' (the gradients' addresses must stay fixed)")
    if len({b.device for b in opt.flat.buffers}) != 1:
        raise TypeError("GraphedStep: every parameter must be on one device")
