"""Fused ops over flat buffers, one module per backend, behind one dispatch.

Backends, each a module with the functions of ``reference`` and the same results:

* ``reference`` eager torch, the oracle; always available.
* ``cpu``       C++/OpenMP in ``vsam_ext._C`` (CPU tensors); when the extension is built.
* ``cuda``      CUDA C++ in ``vsam_ext._C`` (CUDA tensors); when built against a CUDA torch.
* ``triton``    Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Default: CUDA tensors -> cuda, else triton, else reference; CPU tensors -> cpu, else
reference. ``backend=`` on the optimizer or ``$VSAM_EXT_BACKEND`` force one; a fallback from
what the default would have chosen is announced once with a warning.
"""
from __future__ import annotations

import os
import types
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from . import reference

__all__ = ["available_backends", "resolve_backend", "resolve_dispatch", "backend_module", "reference"]


def _load() -> Dict[str, types.ModuleType]:
    found = {"reference": reference}
    errors = {}
    try:
        from . import extension
        if extension.has_kernel("CPU"):
            found["cpu"] = extension
        if extension.has_kernel("CUDA"):
            found["cuda"] = extension
    except (ImportError, OSError) as exc:    # not built, or built against another torch
        errors["cpu"] = errors["cuda"] = exc
    try:
        from . import triton_backend
        if triton_backend.usable():
            found["triton"] = triton_backend
    except ImportError as exc:
        errors["triton"] = exc
    return found, errors


_BACKENDS, _LOAD_ERRORS = _load()
_warned = set()


def available_backends() -> List[str]:
    """Backends this install provides."""
    return list(_BACKENDS)


def backend_module(name: str) -> types.ModuleType:
    return _BACKENDS[name]


def _default_order(device_type: str) -> List[str]:
    return ["cuda", "triton", "reference"] if device_type == "cuda" else ["cpu", "reference"]


def resolve_backend(name: Optional[str], devices: Iterable[torch.device] = ()) -> Tuple[str, types.ModuleType]:
    """The backend to use: ``name`` if given, else ``$VSAM_EXT_BACKEND``, else the best one for
    ``devices``. Unknown or unavailable names raise ValueError listing what is available."""
    from_env = name is None and bool(os.environ.get("VSAM_EXT_BACKEND"))
    requested = name if name is not None else os.environ.get("VSAM_EXT_BACKEND") or None
    if requested is not None and requested != "auto":
        if not isinstance(requested, str) or requested not in _BACKENDS:
            source = "VSAM_EXT_BACKEND" if from_env else "backend"
            raise ValueError(f"{source} must be one of {['auto'] + available_backends()}, got {requested!r}")
        return requested, _BACKENDS[requested]
    types_ = {torch.device(d).type for d in devices} or {"cpu"}
    device_type = "cuda" if "cuda" in types_ else "cpu"
    order = _default_order(device_type)
    if len(types_) > 1:              # mixed devices: only the reference runs everywhere
        order = ["reference"]
    return _best(order, device_type)


def _best(order: List[str], device_type: str) -> Tuple[str, types.ModuleType]:
    chosen = next(b for b in order if b in _BACKENDS)
    if chosen != order[0] and (device_type, chosen) not in _warned:
        _warned.add((device_type, chosen))
        why = _LOAD_ERRORS.get(order[0], "not built in this install")
        warnings.warn(f"vsam_ext: backend {order[0]!r} is unavailable for {device_type} tensors ({why}); "
                      f"using {chosen!r}", stacklevel=3)
    return chosen, _BACKENDS[chosen]


def resolve_dispatch(name: Optional[str], devices: Iterable[torch.device] = ()) -> Tuple[str, "Dispatch"]:
    """The ops an optimizer calls (``lists.Dispatch``: flat buffers or tensor lists) and their
    label: ``name`` (or ``$VSAM_EXT_BACKEND``) for every device when given, else the best backend
    per device type, so a model on several devices (CPU and CUDA) runs each device's fused
    backend; the label is then e.g. ``"cuda+cpu"``."""
    from .lists import Dispatch
    kinds = list(dict.fromkeys(torch.device(d).type for d in devices)) or ["cpu"]
    if len(kinds) == 1 or (name or os.environ.get("VSAM_EXT_BACKEND") or "auto") != "auto":
        label, module = resolve_backend(name, devices if len(kinds) == 1 else [torch.device(kinds[0])])
        return label, Dispatch({kind: module for kind in kinds})
    chosen = {kind: _best(_default_order(kind), kind) for kind in kinds}
    return "+".join(label for label, _ in chosen.values()), Dispatch({k: m for k, (_, m) in chosen.items()})
