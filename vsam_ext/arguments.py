"""Every constructor argument of every optimizer (and of the loss-side ``SAF`` and ``MESA``) and
its allowed values: the one table the constructors (and the controllers they build) check
against. ``python_tests/test_arguments.py`` walks it. A violation is a ``TypeError`` (wrong
type) or ``ValueError`` (out of range) naming the argument, the value and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = ["Rule", "TABLE", "check", "check_int", "check_float", "Default", "is_default"]

INF = math.inf
Bound = Union[float, str]          # a number, or the name of another argument of the same call


class Default(int):
    """An int default that a constructor can tell from the same number passed by the caller:
    ``help()`` and IDEs show the number, while ``is_default`` says that nobody chose it (vSAM's
    ``window``, ``slices`` and ``warmup_steps``: scaled by ``total_steps`` when not chosen, and
    named as the default when they conflict)."""
    __slots__ = ()

    def __repr__(self) -> str:
        return int.__repr__(self)


def is_default(value) -> bool:
    return type(value) is Default


@dataclass(frozen=True)
class Rule:
    kind: str                      # "int", "float", "pair" (two finite numbers), "choice", "bool"
    low: Bound = -INF
    high: Bound = INF
    low_open: bool = False
    high_open: bool = False
    choices: Tuple = ()
    optional: bool = False         # None is allowed too (it means "the default")

    def describe(self) -> str:
        if self.kind in ("choice", "bool"):
            return "one of " + ", ".join(map(repr, self.choices or (False, True)))
        if self.kind == "pair":
            return "a pair of finite numbers"
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{self.kind} in {lo}{self.low}, {self.high}{hi}"


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_float(name: str, value, low: float, high: float, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = math.isfinite(value) or (high == INF and value == INF and not high_open)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


def _pair(name: str, value) -> Tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a pair of numbers, got {type(value).__name__} {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (two numbers), got {len(value)} values: {value!r}")
    return tuple(check_float(f"{name}[{i}]", v, -INF, INF, True, True) for i, v in enumerate(value))


_COMMON: Dict[str, Rule] = {
    "rho": Rule("float", 0.0, INF, high_open=True),
    "adaptive": Rule("choice", choices=(False, True, "official", "davda54")),
    "eta": Rule("float", 0.0, INF, high_open=True, optional=True),   # None: the flavour's default
    "perturbation": Rule("choice", choices=("global", "per_rank")),
    "fused_base": Rule("bool"),
    "param_storage": Rule("choice", choices=("flat", "in_place")),
}
_SEED = Rule("int", 0)
TABLE: Dict[str, Dict[str, Rule]] = {
    "SAM": dict(_COMMON),
    "PeriodicSAM": dict(_COMMON, period=Rule("int", 1)),
    "VSAM": dict(_COMMON, window=Rule("int", 2), slices=Rule("int", 1, "window"),
                 max_rate=Rule("float", 0.0, 1.0, low_open=True), lambdas=Rule("pair"),
                 reuse_decay=Rule("float", 0.0, 1.0, high_open=True), max_reuse=Rule("int", 0),
                 stat_tensors=Rule("int", 1), warmup_steps=Rule("int", 0), seed=_SEED,
                 total_steps=Rule("int", 1, optional=True)),
    "LookSAM": dict(_COMMON, k=Rule("int", 1), alpha=Rule("float", 0.0, INF, high_open=True)),
    "AESAM": dict(_COMMON, total_steps=Rule("int", 1), delta=Rule("float", 0.0, 1.0, high_open=True),
                  lambdas=Rule("pair")),
    "ESAM": dict(_COMMON, beta=Rule("float", 0.0, 1.0, low_open=True),
                 gamma=Rule("float", 0.0, 1.0, low_open=True), seed=_SEED),
    "AUSAM": dict(_COMMON, num_samples=Rule("int", 1), alpha=Rule("float", 0.0, 1.0, low_open=True),
                  f_min=Rule("float", 0.0, 1.0, low_open=True), f_max=Rule("float", "f_min", 1.0),
                  ramp_epochs=Rule("int", 0), seed=_SEED),
}
# SAF and MESA (vsam_ext/saf.py, mesa.py): loss-side objects, not optimizers; the same checks.
_KL = dict(epochs=Rule("int", 1), lam=Rule("float", 0.0, INF, high_open=True),
           temperature=Rule("float", 0.0, INF, low_open=True, high_open=True),
           kl_start_epoch=Rule("int", 0), kl_end_epoch=Rule("int", 0, optional=True))
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TABLE["SAF"] = dict(_KL, num_samples=Rule("int", 1), num_classes=Rule("int", 2), epochs_ago=Rule("int", 1),
                    dtype=Rule("choice", choices=_FLOATS))
TABLE["GraphedStep"] = dict(warmup_steps=Rule("int", 1))   # vsam_ext/graphs.py
TABLE["MESA"] = dict(_KL, decay=Rule("float", 0.0, 1.0), buffers=Rule("choice", choices=("average", "copy")))


def check(owner: str, name: str, value, **others):
    """``value`` if it is allowed for ``owner``'s argument ``name`` (a bound naming another
    argument is looked up in ``others``), else a TypeError/ValueError saying what is allowed."""
    rule = TABLE[owner][name]
    if value is None and rule.optional:
        return None

    def bound(b):
        return others[b] if isinstance(b, str) else b
    if rule.kind == "int":
        high = bound(rule.high)
        return check_int(name, value, int(bound(rule.low)), None if high == INF else int(high))
    if rule.kind == "float":
        return check_float(name, value, bound(rule.low), bound(rule.high), rule.low_open, rule.high_open)
    if rule.kind == "pair":
        return _pair(name, value)
    allowed = rule.choices or (False, True)
    if not any(value is c or (type(value) is type(c) and value == c) for c in allowed):
        err = TypeError if rule.kind == "bool" else ValueError
        raise err(f"{name} must be {rule.describe()}, got {value!r}")
    return value
