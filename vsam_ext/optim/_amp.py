"""fp16 mixed precision: ``torch.amp.GradScaler`` inside a two-pass step.

The closure scales its loss (``scaler.scale(loss).backward()``); ``step(closure,
grad_scaler=scaler)`` unscales each pass's gradients before anything reads them (the SAM norm,
the decision, the PSF) and skips the step as a whole when either pass overflowed: the weights
are restored, the base optimizer and the controller are left as they were. The scaler learns
of an overflow in either pass, so ``scaler.update()`` (the caller's, after the step) lowers the
scale as usual. Each check reads one flag on the host, as ``GradScaler.step`` itself does.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["unscale_and_check"]


def unscale_and_check(opt, scaler: Optional["torch.amp.GradScaler"], first_pass: bool) -> bool:
    """Unscale this pass's gradients in place; ``True`` when they are all finite."""
    if scaler is None or not scaler.is_enabled():
        return True
    if first_pass:
        scaler.unscale_(opt)                  # every parameter's .grad, records the overflow
        found = scaler._found_inf_per_device(opt)
    else:
        # unscale_ runs once per step; the second pass's gradients are unscaled here, and
        # the overflow flags recorded for the first pass are updated in place.
        found = scaler._found_inf_per_device(opt)
        inv = 1.0 / scaler.get_scale()
        for b in opt.flat.buffers:
            flag = found.get(b.device)
            if flag is None:
                flag = found[b.device] = torch.zeros(1, device=b.device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                b.grad if b.sharded else [b.grad], flag, torch.full((1,), inv, dtype=torch.float32, device=b.device))
    group = opt.flat.shard_group
    if group is not None:                    # FSDP2: an overflow on any rank skips the step on all
        for v in found.values():
            group.all_reduce(v, op="max")
    return not any(bool(v.item()) for v in found.values())
