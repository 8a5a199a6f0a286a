"""``warn_user``: a warning attributed to the user's line, however deep inside the package (and
torch's wrappers, e.g. ``torch.no_grad`` on ``first_step``) it is raised."""
from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_user"]

_INSIDE = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                for m in (sys.modules[__package__], torch))


def _stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by ``warn_user``'s caller that points at
    the first frame outside vsam_ext and torch."""
    frame, level = sys._getframe(2), 1            # the frame that called warn_user: level 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category=UserWarning) -> None:
    warnings.warn(message, category, stacklevel=_stacklevel() + 1)
