"""Fused ops over flat buffers, one module per backend, behind one dispatch.

Backends: ``reference`` (eager torch, the oracle; always available). The fused ``cpu``,
``cuda`` and ``triton`` backends are not built yet. ``VSAM_EXT_BACKEND`` or the optimizer's
``backend=`` force one.
"""
from __future__ import annotations

import os
import types
from typing import Iterable, List, Optional, Tuple

import torch

from . import reference

__all__ = ["available_backends", "resolve_backend", "reference"]

_BACKENDS = {"reference": reference}


def available_backends() -> List[str]:
    """Backends this install provides."""
    return list(_BACKENDS)


def resolve_backend(name: Optional[str], devices: Iterable[torch.device] = ()) -> Tuple[str, types.ModuleType]:
    """The backend to use: ``name`` if given, else ``$VSAM_EXT_BACKEND``, else the best one for
    ``devices``. Unknown names raise ValueError listing what is available."""
    requested = name if name is not None else os.environ.get("VSAM_EXT_BACKEND") or None
    if requested is None or requested == "auto":
        return "reference", reference
    if not isinstance(requested, str) or requested not in _BACKENDS:
        source = "backend" if name is not None else "VSAM_EXT_BACKEND"
        raise ValueError(f"{source} must be one of {['auto'] + available_backends()}, got {requested!r}")
    return requested, _BACKENDS[requested]
