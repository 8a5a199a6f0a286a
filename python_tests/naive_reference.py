"""Naive eager oracle for vsam_ext, written straight from /work/shared/ALGORITHMS.md.

Deliberately plain: per-parameter Python loops, dicts keyed by parameter, Python floats
for every statistic, no flat buffers, no fusion, no laziness.  Norms are accumulated in
float64 (at least as precise as the spec's "fp32 accumulation"), so in float64 tests the
oracle is the exact math up to rounding.

Every driver below works on a ``model`` (an ``nn.Module``), the list of parameters handed
to the optimizer, and an ordinary ``torch.optim`` base optimizer built on those parameters.
The gradients are produced by a closure ``closure()`` that does
``loss = f(model(x), y); loss.backward(); return loss``; the oracle sets every ``.grad`` to
``None`` before each closure call, so each call yields exactly the gradient at the current
weights.

Spec readings taken where ALGORITHMS.md leaves room (marked "READING" in the code):

* R1  ``c_r``/``c_v``: the clamp to [-1, 1] is applied to the *mean* of the relative
      changes, not to each term ("mean_i ... over consecutive pairs, clamped to [-1, 1]").
* R2  A usable pair needs both values finite and a non-zero denominator; the mean is taken
      over the usable pairs only; no usable pair -> rate 0.
* R3  Histories are bounded FIFO buffers of at most K (= window) values; a push beyond K
      drops the oldest value.  ``robust_var`` is evaluated on ``H`` *after* the new norm was
      pushed (and the oldest dropped), then pushed into ``V``.
* R4  The window boundary test is ``j % K == 0`` *after* ``j += 1``, so the first window
      after warm-up has K-1 steps (j = 1..K-1), later windows K steps.
* R5  ``U()`` is drawn whenever ``quota_left > 0`` (even when the "force" clause would
      sample anyway), because the spec's expression evaluates ``U() < p`` first.
* R6  Warm-up steps are SAM steps and push their statistics (brief), and leave ``PSF``
      and its age ``a = 0`` just like any sampling step.  ``j`` does not advance during
      warm-up.
* R7  Reuse: ``a`` is incremented first, then ``g <- g + zeta**a * PSF`` if a PSF exists
      and ``a <= max_reuse`` (so the first reuse step after a sample uses ``zeta**1``).
      ``zeta = 0`` adds ``0 * PSF`` (which leaves ``g`` unchanged for finite PSF).
* R8  ``n_g`` and ``n_psf`` use the last ``L`` tensors among the parameters that require
      grad, in ``param_groups`` order; ``L`` larger than the number of tensors means all.
      ``n_psf / n_g`` with ``n_g == 0`` is pushed as ``inf`` (or ``nan`` for 0/0) and is
      then skipped by R2.
* R9  ``s`` is clamped as ``min(max(x, 1), floor(K * max_rate))`` and ``p = s / K``.
* R10 ASAM (``adaptive=True`` here): ``T = |w|`` (eta = 0, every tensor): the davda54
      flavour, ``adaptive="davda54"`` in the package. The official flavour (``eta = 0.01``,
      weight tensors only; the package's ``adaptive=True``) is modelled in naive_family.py.
* R11 BatchNorm protection (``model`` given): all buffers of ``model`` are saved before
      the perturbed pass and copied back after it, so running_mean / running_var /
      num_batches_tracked are exactly as after the first (unperturbed) pass.
* R12 The PSF is taken from the raw gradients (``g_s - g``) before the base optimizer
      adds weight decay; the SAM base step uses ``g_s`` itself.
* R13 (the reliability issue, a rule on top of ALGORITHMS.md) A statistics pair with a
      non-finite norm or ratio (``n_g == 0``) is not pushed into H, R, V at all.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional

import torch

EPS = 1e-12


# ----------------------------------------------------------------------------- helpers

def trainable(params) -> List[torch.Tensor]:
    """Parameters that require grad, in the given (registration / param_groups) order."""
    return [p for p in params if p.requires_grad]


def global_norm(tensors) -> float:
    """L2 norm over a collection of tensors, accumulated in float64, as a Python float."""
    total = 0.0
    for t in tensors:
        if t is None:
            continue
        total += float((t.detach().double() ** 2).sum())
    return math.sqrt(total)


def compute_grads(params: List[torch.Tensor], closure: Callable[[], torch.Tensor]):
    """Zero (to None) the grads, run the closure once, return (loss, {p: grad clone})."""
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = closure()
    grads = {}
    for p in params:
        grads[p] = None if p.grad is None else p.grad.detach().clone()
    return loss, grads


def save_buffers(model) -> Optional[Dict[str, torch.Tensor]]:
    if model is None:
        return None
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def restore_buffers(model, saved) -> None:
    if model is None or saved is None:
        return
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(saved[name])


def set_grads_and_step(params, grads, base) -> None:
    for p in params:
        g = grads[p]
        p.grad = None if g is None else g.clone()
    base.step()


# ----------------------------------------------------------------------------- SAM

def naive_sam_step(params, base, closure, rho: float, adaptive: bool = False, model=None):
    """One SAM (or ASAM) step.  Returns (loss at w, g, g_s) with g, g_s dicts per param.

    1. g = grad L(w)
    2. e = rho * g / (||g|| + eps)           (ASAM: rho * T^2 g / (||T g|| + eps), T = |w|)
       w <- w + e
    3. g_s = grad L(w + e)                    (buffers of `model` restored afterwards)
    4. w <- saved w                           (exact copy back)
    5. base step with g_s
    """
    params = trainable(params)
    loss, g = compute_grads(params, closure)

    saved_w = {p: p.detach().clone() for p in params}
    e = {}
    if adaptive:
        # READING R10: T = |w| at the unperturbed weights, eta = 0, every tensor.
        T = {p: saved_w[p].abs() for p in params}
        n = global_norm([T[p] * g[p] for p in params if g[p] is not None])
        for p in params:
            if g[p] is None:
                continue
            e[p] = rho * (T[p] * T[p] * g[p]) / (n + EPS)
    else:
        n = global_norm([g[p] for p in params if g[p] is not None])
        for p in params:
            if g[p] is None:
                continue
            e[p] = rho * g[p] / (n + EPS)

    with torch.no_grad():
        for p in params:
            if p in e:
                p.add_(e[p])

    saved_buf = save_buffers(model)  # READING R11
    _, g_s = compute_grads(params, closure)
    restore_buffers(model, saved_buf)

    with torch.no_grad():
        for p in params:
            p.copy_(saved_w[p])

    set_grads_and_step(params, g_s, base)
    return loss, g, g_s


def naive_base_step(params, base, closure):
    """One plain base-optimizer step with the gradient at w."""
    params = trainable(params)
    loss, g = compute_grads(params, closure)
    set_grads_and_step(params, g, base)
    return loss, g


class NaiveSAM:
    """Every step a SAM step."""

    def __init__(self, params, base, rho=0.05, adaptive=False, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.rho = rho
        self.adaptive = adaptive
        self.model = model
        self.decisions: List[bool] = []

    def step(self, closure):
        loss, _, _ = naive_sam_step(self.params, self.base, closure, self.rho,
                                    self.adaptive, self.model)
        self.decisions.append(True)
        return loss


class NaivePeriodicSAM:
    """SAM step when steps % k == 0 (steps counted before the step), base step otherwise."""

    def __init__(self, params, base, period, rho=0.05, adaptive=False, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.period = period
        self.rho = rho
        self.adaptive = adaptive
        self.model = model
        self.steps = 0
        self.decisions: List[bool] = []

    def step(self, closure):
        if self.steps % self.period == 0:
            loss, _, _ = naive_sam_step(self.params, self.base, closure, self.rho,
                                        self.adaptive, self.model)
            self.decisions.append(True)
        else:
            loss, _ = naive_base_step(self.params, self.base, closure)
            self.decisions.append(False)
        self.steps += 1
        return loss


# ----------------------------------------------------------------------------- vSAM stats

def robust_var(H: List[float], w: int) -> float:
    """Sort ascending; w consecutive slices of floor(len/w) values (remainder at the top
    left out); unbiased variance of each slice; mean of those.  < 2w values -> 0."""
    n = len(H)
    if n < 2 * w:
        return 0.0
    srt = sorted(H)
    m = n // w
    variances = []
    for i in range(w):
        sl = srt[i * m:(i + 1) * m]
        mean = sum(sl) / len(sl)
        variances.append(sum((x - mean) ** 2 for x in sl) / (len(sl) - 1))
    return sum(variances) / len(variances)


def mean_rate(X: List[float]) -> float:
    """mean_i (X[i+1] - X[i]) / X[i] over usable consecutive pairs, clamped to [-1, 1]."""
    terms = []
    for a, b in zip(X[:-1], X[1:]):
        # READING R2: skip a pair with a non-finite value or a zero denominator.
        if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
            continue
        terms.append((b - a) / a)
    if not terms:
        return 0.0
    m = sum(terms) / len(terms)
    # READING R1: clamp the mean, not each term.
    return min(max(m, -1.0), 1.0)


class NaiveVSAM:
    """vSAM exactly as in ALGORITHMS.md ("Each step", "SAM step", "Reuse step")."""

    def __init__(self, params, base, rho=0.05, window=50, slices=5, max_rate=0.8,
                 lambdas=(0.13, 0.13), reuse_decay=0.7, max_reuse=6, stat_tensors=10,
                 warmup_steps=1173, seed=0, model=None, adaptive=False):
        self.params = trainable(list(params))
        self.base = base
        self.rho = rho
        self.K = window
        self.w = slices
        self.max_rate = max_rate
        self.l1, self.l2 = lambdas
        self.zeta = reuse_decay
        self.max_reuse = max_reuse
        self.L = stat_tensors
        self.warmup = warmup_steps
        self.model = model
        self.adaptive = adaptive
        self.rng = random.Random(seed)

        self.t = 0
        self.j = 0
        self.s = 1.0
        self.q = 0
        self.p = self.s / self.K
        self.H: List[float] = []
        self.R: List[float] = []
        self.V: List[float] = []
        self.psf: Optional[Dict[torch.Tensor, torch.Tensor]] = None
        self.a = 0
        self.c_r = 0.0
        self.c_v = 0.0

        # per-step records
        self.decisions: List[bool] = []
        self.quotas: List[float] = []
        self.probs: List[float] = []
        self.sam_steps = 0

    # -- pieces ---------------------------------------------------------------------
    def _push(self, hist: List[float], value: float) -> None:
        hist.append(value)
        while len(hist) > self.K:  # READING R3
            hist.pop(0)

    def _stat_params(self):
        # READING R8: last L tensors among those requiring grad.
        return self.params[-self.L:] if self.L < len(self.params) else list(self.params)

    def _sam(self, closure):
        loss, g, g_s = naive_sam_step(self.params, self.base, closure, self.rho,
                                      self.adaptive, self.model)
        # READING R12: PSF = g_s - g from raw gradients.
        self.psf = {}
        for p in self.params:
            if g[p] is None or g_s[p] is None:
                continue
            self.psf[p] = g_s[p] - g[p]
        self.a = 0
        sp = self._stat_params()
        n_g = global_norm([g[p] for p in sp if g[p] is not None])
        n_psf = global_norm([self.psf[p] for p in sp if p in self.psf])
        if n_g == 0:
            ratio = float("nan") if n_psf == 0 else float("inf")
        else:
            ratio = n_psf / n_g
        self.sam_steps += 1
        if not (math.isfinite(n_psf) and math.isfinite(ratio)):
            return loss     # READING R13: a non-finite pair never reaches H, R, V (issue "Reliability")
        self._push(self.H, n_psf)
        self._push(self.R, ratio)
        self._push(self.V, robust_var(self.H, self.w))
        return loss

    def _reuse(self, closure):
        loss, g = compute_grads(self.params, closure)
        self.a += 1  # READING R7
        if self.psf is not None and self.a <= self.max_reuse:
            coef = self.zeta ** self.a
            for p in self.params:
                if p in self.psf and g[p] is not None:
                    g[p] = g[p] + coef * self.psf[p]
        set_grads_and_step(self.params, g, self.base)
        return loss

    # -- the step ---------------------------------------------------------------------
    def step(self, closure):
        if self.t < self.warmup:
            loss = self._sam(closure)  # READING R6
            self.t += 1
            self._record(True)
            return loss

        self.j += 1
        K = self.K
        if self.j % K == 0:  # READING R4
            self.c_r = mean_rate(self.R)
            self.c_v = mean_rate(self.V)
            x = self.s * (1.0 + self.l1 * self.c_r + self.l2 * self.c_v)
            hi = math.floor(K * self.max_rate)
            self.s = min(max(x, 1.0), hi)  # READING R9
            self.p = self.s / K
            self.q = 0
        quota_left = math.floor(self.s) - self.q

        sample = False
        if quota_left > 0:  # READING R5
            sample = self.rng.random() < self.p
        if not sample:
            sample = (K - (self.j % K)) <= quota_left

        if sample:
            loss = self._sam(closure)
            self.q += 1
        else:
            loss = self._reuse(closure)
        self.t += 1
        self._record(sample)
        return loss

    def _record(self, sam: bool) -> None:
        self.decisions.append(sam)
        self.quotas.append(self.s)
        self.probs.append(self.p)

    @property
    def stats(self):
        return {
            "steps": self.t,
            "sam_steps": self.sam_steps,
            "last_step_sam": self.decisions[-1] if self.decisions else False,
            "quota": self.s,
            "probability": self.p,
        }
