"""Host-side sampling controllers: which steps take SAM's second forward/backward.

Pure Python on purpose (no torch): the rules are unit-testable alone, and a decision never
waits for the device. The exact rules are in ``ALGORITHMS.md`` (shared with the developers);
the comments below name the equations of the vSAM paper (arXiv 2403.08821).

Every controller has the same small interface:

* ``decide() -> bool``: called once per optimizer step, before the step's work; ``True`` means
  "take a SAM step" (second forward/backward), ``False`` a cheap step.
* ``wants_psf``: whether the optimizer must form the PSF and feed statistics back.
* ``needs_stats()``: ``True`` when the next ``decide()`` reads the statistics, so the optimizer
  must hand over every pending ``push_stats`` first (vSAM: only at a window boundary).
* ``state_dict()`` / ``load_state_dict()``: plain Python values, random state included.
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Deque, Iterable, List, Optional, Sequence, Tuple

from .arguments import Default, check, check_float, check_int, is_default

__all__ = ["EveryStep", "Periodic", "VSAMController", "AESAMController", "robust_var", "mean_change_rate",
           "vsam_schedule", "AUTHORS_WARMUP_STEPS"]

# The authors' CIFAR warm-up: three epochs of 391 steps (batch 128).
AUTHORS_WARMUP_STEPS = 1173
_WINDOW, _SLICES = Default(50), Default(5)
_WARMUP = Default(AUTHORS_WARMUP_STEPS)


# The argument checks live in one table (vsam_ext.arguments); the old names stay for imports.
_check_int, _check_float = check_int, check_float


def robust_var(values: Iterable[float], slices: int) -> float:
    """Eq. 8: sort, cut into ``slices`` equal slices (the top remainder left out), mean of the
    slices' unbiased variances. Non-finite values are ignored; fewer than ``2*slices`` values
    give 0 (so with ``slices > window / 2`` the variance term never acts: H holds K values)."""
    h = sorted(v for v in values if math.isfinite(v))
    if len(h) < 2 * slices:
        return 0.0
    n = len(h) // slices
    total = 0.0
    for i in range(slices):
        part = h[i * n:(i + 1) * n]
        mean = sum(part) / n
        total += sum((v - mean) ** 2 for v in part) / (n - 1)
    return total / slices


def mean_change_rate(history: Sequence[float]) -> float:
    """Eq. 9-10 / 12-13: mean relative change over consecutive pairs, clamped to [-1, 1].

    A pair with a zero or non-finite denominator, or a non-finite value, is skipped; with no
    usable pair the rate is 0. The clamp applies to the mean, not to each term."""
    rates: List[float] = []
    for prev, cur in zip(history, list(history)[1:]):
        if prev == 0 or not (math.isfinite(prev) and math.isfinite(cur)):
            continue
        rates.append((cur - prev) / prev)
    mean = sum(rates) / len(rates) if rates else 0.0
    if math.isnan(mean):          # +inf and -inf rates (overflowing finite pairs): no signal
        return 0.0
    return min(1.0, max(-1.0, mean))


def vsam_schedule(total_steps: int, warmup_steps: Optional[int] = None, window: Optional[int] = None,
                  warmup_frac: float = 0.1, min_windows: int = 10) -> Tuple[int, int, float]:
    """vSAM's warm-up and window scaled to a run of ``total_steps`` optimizer steps (the rule of
    ``VSAM(total_steps=...)`` and of the training tool): warm-up ``round(warmup_frac * total)``,
    window K = (steps after warm-up) // ``min_windows`` clamped to [10, 50] (50: the authors'
    CIFAR value; 10 = 2 x slices, below which the robust variance never acts). A ``warmup_steps``
    or ``window`` given wins. Returns (warm-up, K, number of windows after warm-up)."""
    if warmup_steps is None:
        warmup_steps = int(round(warmup_frac * total_steps))
    post = max(0, total_steps - warmup_steps)
    if window is None:
        window = min(50, max(10, post // min_windows))
    return warmup_steps, window, post / window


class EveryStep:
    """Plain SAM: every step is a SAM step."""

    wants_psf = False

    def __init__(self) -> None:
        self.steps = 0
        self.sam_steps = 0
        self.last_step_sam = False

    def _rule(self) -> bool:
        return True

    def decide(self) -> bool:
        sample = self._rule()
        self.steps += 1
        self.sam_steps += sample
        self.last_step_sam = sample
        return sample

    def needs_stats(self) -> bool:
        return False

    def stats(self) -> dict:
        return {"steps": self.steps, "sam_steps": self.sam_steps, "last_step_sam": self.last_step_sam,
                "quota": None, "probability": 1.0}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sam_steps": self.sam_steps, "last_step_sam": self.last_step_sam}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.sam_steps = int(state["sam_steps"])
        self.last_step_sam = bool(state["last_step_sam"])


class Periodic(EveryStep):
    """SAM-k: a SAM step when ``steps % period == 0`` (steps counted before this one)."""

    def __init__(self, period: int) -> None:
        super().__init__()
        self.period = check("PeriodicSAM", "period", period)

    def _rule(self) -> bool:
        return self.steps % self.period == 0

    def stats(self) -> dict:
        return {**super().stats(), "probability": 1.0 / self.period}


class VSAMController:
    """vSAM's variation-based sampling (ALGORITHMS.md, "vSAM", with its listed deviations).

    The optimizer calls ``decide()`` once per step and, after every SAM step, hands over the
    two statistics with ``push_stats(psf_norm, grad_norm)``. Pushes may be deferred (the
    optimizer batches device->host reads), but must all arrive before a ``decide()`` for which
    ``needs_stats()`` is True: only the window boundary reads them.
    """

    wants_psf = True

    def __init__(self, window: int = _WINDOW, slices: int = _SLICES, max_rate: float = 0.8,
                 lambdas: Sequence[float] = (0.13, 0.13), warmup_steps: int = _WARMUP,
                 seed: int = 0, *, total_steps: Optional[int] = None) -> None:
        """``total_steps``: the run's length in optimizer steps, or None (unknown). When given,
        the warm-up and the window that were not given are scaled to it (``vsam_schedule``);
        without it they default to the authors' CIFAR values (1173 and 50)."""
        self.total_steps = check("VSAM", "total_steps", total_steps)
        window = check("VSAM", "window", window)
        warmup = check("VSAM", "warmup_steps", warmup_steps)
        if self.total_steps is not None:
            warmup, window, _ = vsam_schedule(self.total_steps, None if is_default(warmup_steps) else warmup,
                                              None if is_default(window) else window)
        self.window = int(window)
        self.slices = self._check_slices(slices)
        self.max_rate = check("VSAM", "max_rate", max_rate)
        if math.floor(self.window * self.max_rate) < 1:
            raise ValueError(f"max_rate: window * max_rate must be >= 1 so that a window can hold one "
                             f"SAM step, got window={self.window}, max_rate={max_rate}")
        self.lambdas = check("VSAM", "lambdas", lambdas)
        self.warmup_steps = int(warmup)
        # Neither warmup_steps nor total_steps given: the authors' 1173 steps, said once (decide()).
        self.warmup_is_default = self.total_steps is None and is_default(warmup_steps)
        self._warned_warmup = False
        if self.total_steps is not None and self.warmup_steps >= self.total_steps:
            from ._warn import warn_user
            warn_user(f"VSAM: warmup_steps={self.warmup_steps} >= total_steps={self.total_steps}: the whole run is "
                      f"warm-up, i.e. plain SAM on every step; leave warmup_steps out to have it scaled to the "
                      f"run (10 % of total_steps), or give a smaller one")
        self.seed = check("VSAM", "seed", seed)
        self.rng = random.Random(seed)
        self.t = 0            # steps taken
        self.j = 0            # post-warm-up steps
        self.s = 1.0          # quota: SAM steps wanted per window
        self.q = 0            # SAM steps taken in the current window
        self.p = self.s / self.window
        self.c_r = 0.0
        self.c_v = 0.0
        self.sam_steps = 0
        self.last_step_sam = False
        self.H: Deque[float] = deque(maxlen=self.window)   # PSF norms
        self.R: Deque[float] = deque(maxlen=self.window)   # PSF norm / gradient norm
        self.V: Deque[float] = deque(maxlen=self.window)   # robust variance of H
        self.nonfinite_stats = 0                           # statistics pairs kept out of H, R, V

    def _check_slices(self, slices) -> int:
        """``slices <= window``; a conflict with the default names it and the fix."""
        try:
            return int(check("VSAM", "slices", slices, window=self.window))
        except ValueError as err:
            if not is_default(slices):
                raise
            raise ValueError(f"slices must be <= window, got slices={int(slices)} (the default: the authors' value, "
                             f"for window=50) with window={self.window}: pass slices= as well, e.g. "
                             f"window={self.window}, slices={max(1, self.window // 2)} (slices <= window // 2 lets "
                             f"the robust variance act: it needs 2 * slices PSF norms in a window), or use a "
                             f"window of at least {2 * int(slices)}") from err

    @property
    def max_quota(self) -> int:
        return math.floor(self.window * self.max_rate)

    def needs_stats(self) -> bool:
        return self.t >= self.warmup_steps and (self.j + 1) % self.window == 0

    def decide(self) -> bool:
        if self.t < self.warmup_steps:
            if self.warmup_is_default and not self._warned_warmup:
                self._warn_default_warmup()
            sample = True
        else:
            K = self.window
            self.j += 1
            if self.j % K == 0:                       # window boundary, Eq. 14-15
                self.c_r = mean_change_rate(self.R)
                self.c_v = mean_change_rate(self.V)
                lam_r, lam_v = self.lambdas
                s = self.s * (1.0 + lam_r * self.c_r + lam_v * self.c_v)
                self.s = min(max(s, 1.0), float(self.max_quota))
                self.p = self.s / K
                self.q = 0
            quota_left = math.floor(self.s) - self.q
            # U() is drawn only when quota is left, so equal seeds give equal decisions.
            sample = (quota_left > 0 and self.rng.random() < self.p) or (K - self.j % K <= quota_left)
            if sample:
                self.q += 1
        self.t += 1
        self.sam_steps += sample
        self.last_step_sam = sample
        return sample

    def _warn_default_warmup(self) -> None:
        """The one-time notice: the first step taken by this controller while it is in the
        authors' default warm-up (neither ``warmup_steps`` nor ``total_steps`` given)."""
        from ._warn import warn_user
        self._warned_warmup = True
        left = self.warmup_steps - self.t
        warn_user(f"VSAM: warmup_steps was not given, so it is the authors' {self.warmup_steps} steps (3 "
                  f"CIFAR-10 epochs at batch 128): the next {left} steps are all plain SAM steps, and a run of "
                  f"up to {self.warmup_steps} steps never samples. Size it to your run with "
                  f"total_steps= (the run's length in optimizer steps, e.g. epochs * len(loader): warm-up "
                  f"10 % of it, window scaled to it) or warmup_steps= (warmup_steps={self.warmup_steps} "
                  f"keeps the authors' value and silences this); stats['warmup_steps_left'] counts down")

    def push_stats(self, psf_norm: float, grad_norm: float) -> None:
        """Record one SAM step's norms over the last L tensors (Eq. 11).

        A pair with a non-finite norm, or a zero gradient norm (no ratio), never reaches the
        histories: it is dropped and counted in ``nonfinite_stats``. (ALGORITHMS.md keeps such
        values in the histories and skips them in the rates; keeping them out altogether is
        the library's reliability rule, so one bad step cannot occupy window slots.)"""
        psf_norm, grad_norm = float(psf_norm), float(grad_norm)
        ratio = psf_norm / grad_norm if grad_norm != 0.0 else math.nan
        if not (math.isfinite(psf_norm) and math.isfinite(ratio)):
            self.nonfinite_stats += 1
            return
        self.H.append(psf_norm)
        self.R.append(ratio)
        self.V.append(robust_var(self.H, self.slices))

    def stats(self) -> dict:
        return {"steps": self.t, "sam_steps": self.sam_steps, "last_step_sam": self.last_step_sam,
                "quota": self.s, "probability": self.p, "window_sam_steps": self.q,
                "change_ratio": self.c_r, "change_variance": self.c_v,
                "in_warmup": self.t < self.warmup_steps, "warmup_steps": self.warmup_steps,
                "warmup_steps_left": max(0, self.warmup_steps - self.t), "total_steps": self.total_steps,
                "nonfinite_stats": self.nonfinite_stats}

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"window": self.window, "t": self.t, "j": self.j, "s": self.s, "q": self.q, "p": self.p,
                "c_r": self.c_r, "c_v": self.c_v, "sam_steps": self.sam_steps,
                "last_step_sam": self.last_step_sam,
                "H": list(self.H), "R": list(self.R), "V": list(self.V),
                "nonfinite_stats": self.nonfinite_stats, "rng": [version, list(internal), gauss],
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "warmup_is_default": self.warmup_is_default}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("window", self.window)) != self.window:
            raise ValueError(f"state_dict: saved with window={state['window']}, this controller has "
                             f"window={self.window}")
        for key in ("t", "j", "q", "sam_steps"):
            setattr(self, key, int(state[key]))
        for key in ("s", "p", "c_r", "c_v"):
            setattr(self, key, float(state[key]))
        self.last_step_sam = bool(state["last_step_sam"])
        self.nonfinite_stats = int(state.get("nonfinite_stats", 0))
        # The run's schedule goes with it (as torch restores the param groups' hyper-parameters);
        # a checkpoint written before these fields existed keeps the constructor's.
        if "warmup_steps" in state:
            self.warmup_steps = int(check("VSAM", "warmup_steps", int(state["warmup_steps"])))
            total = state.get("total_steps")
            self.total_steps = None if total is None else int(check("VSAM", "total_steps", int(total)))
            self.warmup_is_default = bool(state.get("warmup_is_default", False))
        for key in ("H", "R", "V"):
            getattr(self, key).clear()
            getattr(self, key).extend(float(v) for v in state[key])
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(v) for v in internal), gauss))


class AESAMController(EveryStep):
    """AE-SAM (Jiang et al. 2023): a SAM step when the squared gradient norm is large compared
    with its running mean and standard deviation (ALGORITHMS.md, "AE-SAM").

    The optimizer hands over ``n = ||g||^2`` with ``push_norm(n)`` before each ``decide()``.
    A non-finite ``n`` leaves the running moments untouched and gives a cheap step.
    """

    def __init__(self, total_steps: int, delta: float = 0.9, lambdas: Sequence[float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.total_steps = check("AESAM", "total_steps", total_steps)
        self.delta = check("AESAM", "delta", delta)
        self.lambdas = check("AESAM", "lambdas", lambdas)
        self.mu = 0.0
        self.var = 0.0
        self.skipped = 0           # non-finite norms kept out of the moments
        self._norm: Optional[float] = None

    def needs_stats(self) -> bool:
        return True

    def push_norm(self, n: float) -> None:
        self._norm = float(n)

    def threshold_coeff(self) -> float:
        frac = min(1.0, self.steps / self.total_steps)
        return frac * self.lambdas[0] + (1.0 - frac) * self.lambdas[1]

    def _rule(self) -> bool:
        n, self._norm = self._norm, None
        if n is None:
            raise RuntimeError("AESAMController.decide() needs push_norm(n) first")
        if not math.isfinite(n):
            self.skipped += 1
            return False
        self.mu = self.delta * self.mu + (1.0 - self.delta) * n
        self.var = self.delta * self.var + (1.0 - self.delta) * (n - self.mu) ** 2
        return n >= self.mu + self.threshold_coeff() * math.sqrt(self.var)

    def stats(self) -> dict:
        return {**super().stats(), "probability": None, "mu": self.mu, "sigma": math.sqrt(self.var),
                "nonfinite_skipped": self.skipped}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mu": self.mu, "var": self.var, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mu, self.var, self.skipped = float(state["mu"]), float(state["var"]), int(state["skipped"])
