"""Deferred device->host reads of the controller's statistics.

A SAM step produces two floats on the device. Reading them at once would stall the host
until the device catches up, every step. Instead each pair is copied, non-blocking, into a
slot of a pinned host buffer, and the slots are read together only when the controller needs
them (a window boundary) or the buffer is full: one synchronisation per window at most.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["DeferredStats"]


class DeferredStats:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self._host: Optional[torch.Tensor] = None
        self._event = None

    def __len__(self) -> int:
        return self.count

    def full(self) -> bool:
        return self.count >= self.capacity

    def push(self, pair: torch.Tensor) -> None:
        """Queue a 2-element device tensor (fp32, or fp64 for fp64 models: the host slots take
        the first pair's dtype, so the copy is a plain memcpy). The caller drains before it is full."""
        if self._host is None:
            self._host = torch.empty(self.capacity, 2, dtype=pair.dtype,
                                     pin_memory=pair.device.type == "cuda")
        if pair.device.type == "cuda":
            self._host[self.count].copy_(pair, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(pair.device))
        else:
            self._host[self.count].copy_(pair)
        self.count += 1

    def drain(self) -> List[Tuple[float, float]]:
        """Every queued pair, oldest first; waits for the last copy if it is still in flight."""
        if self.count == 0:
            return []
        if self._event is not None:
            # The one intended wait (once per window): exempt from torch's sync debug mode, so
            # that mode can prove there is no other.
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                self._event.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            self._event = None
        values = [tuple(row) for row in self._host[:self.count].tolist()]
        self.count = 0
        return values
