"""torch.optim's step plumbing for steps that do not go through an optimizer's own ``step()``.

``torch.optim.Optimizer.step`` runs under a profiling record (``Optimizer.step#SGD.step``),
between the step pre-hooks and post-hooks (the optimizer's and the global ones), and an LR
scheduler marks the optimizer as stepped (``_opt_called``; without it the scheduler warns that
``lr_scheduler.step()`` ran before ``optimizer.step()``). Two of our paths skip that ``step()``:

* the fused SGD/AdamW step does the base optimizer's maths in our kernels, never calling
  ``base_optimizer.step()``: ``run_as_step(base, fn)`` runs ``fn`` the way ``base.step()`` would;
* the two-call form (``first_step()`` / ``second_step()``) never calls the wrapper's ``step()``:
  ``pre_hooks`` at ``first_step()`` (before anything changes) and ``post_hooks`` at the end of
  ``second_step()``.
"""
from __future__ import annotations

from itertools import chain
from typing import Callable, TypeVar

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["run_as_step", "pre_hooks", "post_hooks"]

T = TypeVar("T")


def run_as_step(opt: torch.optim.Optimizer, fn: Callable[[], T]) -> T:
    """``fn()`` as ``opt.step()`` would run it: profiling record, pre-hooks, post-hooks, and the
    mark LR schedulers read. Returns what ``fn`` returns."""
    out = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: fn())(opt)
    opt._opt_called = True
    return out


def pre_hooks(opt: torch.optim.Optimizer) -> None:
    """The step pre-hooks, global then the optimizer's (their return values, new step
    arguments, have nothing to replace in the two-call form and are ignored)."""
    for hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        hook(opt, (opt,), {})


def post_hooks(opt: torch.optim.Optimizer) -> None:
    """The step post-hooks, the optimizer's then the global ones; marks the step as taken."""
    for hook in chain(opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        hook(opt, (opt,), {})
    opt._opt_called = True
