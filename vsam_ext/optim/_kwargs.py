"""The keyword arguments left over for the base optimizer, checked before it is built: a name
that is neither one of our optimizer's options nor an argument of the base optimizer is a
``TypeError`` that names our class, the name, the closest match and the base class (instead
of ``SGD.__init__() got an unexpected keyword argument``)."""
from __future__ import annotations

import difflib
import inspect
from typing import List

import torch

__all__ = ["check_base_kwargs", "our_options", "base_name"]

_NOT_OPTIONS = {"self", "params", "base_optimizer", "controller"}


def our_options(cls: type) -> List[str]:
    """The keyword options of the public optimizer ``cls`` (and of its subclasses' constructors
    up the MRO, up to the shared driver, which is not public)."""
    from ._driver import TwoPassOptimizer
    names: List[str] = []
    for klass in cls.__mro__:
        if klass is TwoPassOptimizer or not (isinstance(klass, type) and issubclass(klass, TwoPassOptimizer)):
            break
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in params if p.name not in _NOT_OPTIONS and p.name not in names
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names


def base_name(base: type) -> str:
    """``torch.optim.SGD`` for torch's own optimizers, else ``module.QualName``."""
    if getattr(torch.optim, base.__name__, None) is base:
        return f"torch.optim.{base.__name__}"
    return f"{base.__module__}.{base.__qualname__}"


def _base_arguments(base: type):
    """The base class's keyword arguments, or None when it takes any (``**kwargs``) or its
    signature cannot be read."""
    try:
        params = inspect.signature(base).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name != "params" and p.kind is not p.VAR_POSITIONAL]


def _hint(name: str, candidates: List[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_base_kwargs(optimizer, base_optimizer, base_kwargs: dict) -> None:
    """Refuse, before anything is built, the keyword arguments that neither ``optimizer``'s
    class nor ``base_optimizer`` (a class, or an instance: then none is taken) accepts."""
    if not base_kwargs:
        return
    owner = type(optimizer).__name__
    ours = our_options(type(optimizer))
    if isinstance(base_optimizer, torch.optim.Optimizer):
        names = ", ".join(f"{k!r}{_hint(k, ours)}" for k in sorted(base_kwargs))
        raise TypeError(f"{owner}() got keyword arguments it does not take: {names}; and base_optimizer is an "
                        f"instance ({type(base_optimizer).__name__}), so base optimizer arguments would be "
                        f"ignored: set them on the instance or pass the class")
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        return                                   # the driver says what base_optimizer must be
    theirs = _base_arguments(base_optimizer)
    if theirs is None:
        return
    unknown = [k for k in base_kwargs if k not in theirs]
    if not unknown:
        return
    base = base_name(base_optimizer)
    names = ", ".join(f"{k!r}{_hint(k, ours + theirs)}" for k in unknown)
    plural = "s" if len(unknown) > 1 else ""
    raise TypeError(f"{owner}() got an unexpected keyword argument{plural} {names}: neither a {owner} option "
                    f"({', '.join(ours)}) nor an argument of the base optimizer {base} ({', '.join(theirs)})")
