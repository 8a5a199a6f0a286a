"""A CPU stand-in for CUDA graphs, for ``vsam_ext.GraphedStep(..., graph_type=TracedGraph)``.

A CUDA graph replays the kernels it captured with the arguments they had then. ``TracedGraph``
records what a capture runs (every aten and vsam_ext op, its non-tensor arguments, and which
tensors it reads: those that existed before by address, those made inside by order of making)
and checks at every replay that the same ops run with the same arguments on the same tensors.
When that holds, a CUDA graph captured from the same code does the same work at each replay:
whatever the host changes between steps reaches the ops through tensors only. A host read
(``.item()``) inside is an error, as it is under capture. Unlike a CUDA graph the capture runs
the ops, so the first replay after a capture does nothing; a replay copies its outputs into the
tensors the capture returned (a graph's outputs are static).
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.trace = []
        self.made = {}                  # storage address -> order of making, inside this run
        self.count = 0

    def _canon(self, x):
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            who = ("made", self.made[ptr]) if ptr in self.made else ("before", ptr)
            return ("tensor", who, x.dtype, tuple(x.shape), tuple(x.stride()), x.storage_offset())
        if isinstance(x, float):
            return ("float", repr(x))   # NaN == NaN here
        return x if isinstance(x, (int, bool, str, type(None))) else repr(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise AssertionError(f"a host read ({func}) inside a captured region: a CUDA graph cannot capture it")
        entry = (str(func), tree_map(self._canon, args), tree_map(self._canon, kwargs))
        self.trace.append(entry)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made[t.untyped_storage().data_ptr()] = self.count
                self.count += 1
        return out


def _run(fn):
    with _Recorder() as rec:
        out = fn()
    return rec.trace, out


def _copy_into(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (list, tuple)):
        for s, n in zip(static, new):
            _copy_into(s, n)


class TracedGraph:
    """``capture(fn)`` runs and records ``fn``; ``replay()`` runs it again and asserts the same
    trace. ``replays`` counts the replays that ran and were checked."""

    def __init__(self, pool=None):
        self.pool = pool
        self.replays = 0

    def capture(self, fn):
        self.fn = fn
        self.trace, self.out = _run(fn)
        self.fresh = True
        return self.out

    def replay(self):
        if self.fresh:                  # the capture ran the ops already
            self.fresh = False
            return
        trace, out = _run(self.fn)
        if trace != self.trace:
            i = next((k for k, (a, b) in enumerate(zip(trace, self.trace)) if a != b), min(len(trace), len(self.trace)))
            raise AssertionError(f"replay {self.replays + 1} ran other work than the capture: op {i} of "
                                 f"{len(self.trace)} captured / {len(trace)} now\n  captured: "
                                 f"{self.trace[i] if i < len(self.trace) else None}\n  now:      "
                                 f"{trace[i] if i < len(trace) else None}")
        _copy_into(self.out, out)
        self.replays += 1
