"""Naive eager oracles for the rest of the SAM family (ASAM flavours, LookSAM, AE-SAM, ESAM,
AUSAM), written straight from /work/shared/ALGORITHMS.md ("SAM", "The rest of the family") and
the API notes of issue 6 (which pin down the randomness and the ordering).

Written without looking at the package's implementation.  Same style as naive_reference.py:
per-parameter Python loops, dicts keyed by parameter, norms accumulated in float64, Python
floats for every scalar statistic, no flat buffers, no fusion.  Before every forward/backward
the oracle sets each ``.grad`` to ``None``, so each pass yields exactly the gradient at the
current weights.

Two closure conventions:

* LookSAM, AE-SAM, ASAM (``NaiveASAM``): ``closure()`` runs forward + backward, returns the
  (mean) loss -- as for SAM.
* ESAM, AUSAM: ``closure(indices)`` with ``indices`` None (whole batch) or a 1-D int64 tensor of
  sorted batch positions; it returns the PER-SAMPLE losses and does NOT call backward.  The
  oracle calls ``.mean().backward()`` itself when it needs gradients and calls the closure under
  ``torch.no_grad()`` when it only needs losses.

Spec readings taken where the text leaves room (marked "READING" in the code):

* F1  ASAM flags: ``adaptive=False`` -> plain SAM (eta / filter ignored).  ``True`` or
      ``"official"`` -> eta = 0.01, T only on tensors with ``p.dim() >= 2``; ``"davda54"`` ->
      eta = 0, T on every tensor.  ``eta=`` / ``adaptive_params=`` ("weights" | "all" |
      callable(tensor) -> bool) override the flavour's values.  T = |w| + eta is taken at the
      unperturbed weights; filtered-out tensors use T = 1 both in the norm and in the numerator:
      ``e = r * T^2 g / (||T g|| + eps)`` with the norm over all tensors.
* F2  A tensor without a gradient in the first pass (``.grad is None``) is treated as g = 0:
      it is not perturbed and contributes nothing to the norm.
* F3  BatchNorm (``model`` given): every buffer of ``model`` is saved right after the first
      (unperturbed) pass and copied back after the last perturbed pass, so the perturbed
      pass(es) -- including ESAM's no-grad selection pass -- leave no trace in the buffers.
* F4  LookSAM: per tensor, ``cos(g, g_s) = <g, g_s> / (||g|| ||g_s||)`` and
      ``g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||`` (float64 scalars); a tensor with
      ``||g|| == 0`` or ``||g_s|| == 0`` gets ``g_v = g_s`` (cos taken as 0).  g_v is taken
      from the raw gradients (before the base optimizer adds weight decay).  On other steps
      ``g <- g + alpha * ||g|| / (||g_v|| + eps) * g_v`` for every tensor that has a g_v.
* F5  AE-SAM: ``n = sum_p sum(g_p^2)`` in float64 (squares summed, not a squared sqrt);
      ``t/T`` is clamped to at most 1; the statistics are updated before the comparison;
      a non-finite n leaves mu / sigma2 untouched and gives a base step.
* F6  ESAM: ``u = torch.rand(n_tensors, generator=gen)`` is drawn each step iff beta != 1
      (no draw when beta == 1); tensor i is kept iff ``u[i] < beta``.  If every tensor is
      dropped, the first-pass loss has no graph: no backward, g = 0, e = 0.
      ``k = ceil(gamma * B)`` with ``B = len(l0)``; ``d = l1 - l0`` in the loss dtype;
      ``idx`` = the k positions with the largest d, ties to the lower position (ALGORITHMS.md's
      tie rule), sorted ascending.  Returned loss: ``l0.mean()``.
* F7  AUSAM: ``epoch = samples_before // N`` with ``samples_before`` the sum of full batch
      sizes (not of the selected subsets) over all earlier steps; the ramp uses Python floats;
      ``s``, ``p`` are float64; ``k = ceil(alpha * B)``; when the draw is taken the
      index tensor is passed even if it is the whole batch (alpha = 1).  The table update
      uses ``|l1 - l0|`` computed in the loss dtype then cast to float64, added with
      ``index_add_`` (one count per occurrence).  The returned loss is ``l0.mean()``.
      ``stats["epoch"]`` is the current epoch after the last step, i.e.
      ``samples_seen // N`` counting that step's batch (the epoch the next step falls in);
      the API note only says "epoch" (next to "sample_fraction (last step)"), so this is a
      reading; the epoch each step used is recorded in ``.epochs``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

# The plain helpers shared with the SAM/vSAM oracle (same float64 norms, same buffer handling).
from naive_reference import global_norm, restore_buffers, save_buffers, trainable  # noqa: F401

EPS = 1e-12


# ----------------------------------------------------------------------------- helpers

def sq_sum(t: Optional[torch.Tensor]) -> float:
    """Sum of squares of a tensor, float64, as a Python float (0 for None)."""
    if t is None:
        return 0.0
    return float((t.detach().double() ** 2).sum())


def tnorm(t: Optional[torch.Tensor]) -> float:
    return math.sqrt(sq_sum(t))


def tdot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() * b.detach().double()).sum())


def clear_grads(params) -> None:
    for p in params:
        p.grad = None


def collect_grads(params) -> Dict[torch.Tensor, Optional[torch.Tensor]]:
    return {p: (None if p.grad is None else p.grad.detach().clone()) for p in params}


def plain_pass(params, closure: Callable[[], torch.Tensor]):
    """closure() does forward + backward.  Returns (loss, {p: grad or None})."""
    clear_grads(params)
    with torch.enable_grad():
        loss = closure()
    return loss, collect_grads(params)


def per_sample_pass(params, closure, indices, backward: bool = True):
    """closure(indices) returns per-sample losses; mean().backward() when asked.

    Returns (per-sample losses detached, {p: grad or None} or None)."""
    clear_grads(params)
    if backward:
        with torch.enable_grad():
            losses = closure(indices)
            loss = losses.mean()
            if loss.requires_grad:  # READING F6: all tensors dropped -> no graph, no backward
                loss.backward()
        return losses.detach().clone(), collect_grads(params)
    with torch.no_grad():
        losses = closure(indices)
    return losses.detach().clone(), None


def base_step_with(params, grads, base) -> None:
    for p in params:
        g = grads.get(p)
        p.grad = None if g is None else g.clone()
    base.step()


# ----------------------------------------------------------------------------- ASAM flags

def weights_only(p: torch.Tensor) -> bool:
    return p.dim() >= 2


def all_tensors(p: torch.Tensor) -> bool:
    return True


def resolve_adaptive(adaptive=False, eta=None, adaptive_params=None):
    """-> None (plain SAM) or (eta, filter).  READING F1."""
    if adaptive is False or adaptive is None:
        return None
    if adaptive is True or adaptive == "official":
        e, filt = 0.01, weights_only
    elif adaptive == "davda54":
        e, filt = 0.0, all_tensors
    else:
        raise ValueError(f"unknown adaptive flavour {adaptive!r}")
    if eta is not None:
        e = float(eta)
    if adaptive_params is not None:
        if adaptive_params == "weights":
            filt = weights_only
        elif adaptive_params == "all":
            filt = all_tensors
        elif callable(adaptive_params):
            filt = adaptive_params
        else:
            raise ValueError(f"unknown adaptive_params {adaptive_params!r}")
    return (e, filt)


def perturbation(params, g, radius: float, asam) -> Dict[torch.Tensor, torch.Tensor]:
    """e = radius * g / (||g|| + eps)   or (ASAM) radius * T^2 g / (||T g|| + eps).

    T = |w| + eta at the current (unperturbed) weights on the tensors the filter accepts,
    T = 1 elsewhere.  Tensors without a gradient get no entry (READING F2)."""
    e = {}
    if asam is None:
        n = global_norm([g[p] for p in params if g.get(p) is not None])
        for p in params:
            if g.get(p) is None:
                continue
            e[p] = radius * g[p] / (n + EPS)
        return e
    eta, filt = asam
    T = {}
    for p in params:
        if g.get(p) is None:
            continue
        T[p] = (p.detach().abs() + eta) if filt(p) else None
    tg = [(g[p] if T[p] is None else T[p] * g[p]) for p in T]
    n = global_norm(tg)
    for p in T:
        if T[p] is None:
            e[p] = radius * g[p] / (n + EPS)
        else:
            e[p] = radius * (T[p] * T[p] * g[p]) / (n + EPS)
    return e


class _Perturbed:
    """Context: w <- w + e on enter (weights saved first), w <- saved w on exit.
    Buffers of ``model`` saved on enter and restored on exit (READING F3)."""

    def __init__(self, params, e, model):
        self.params, self.e, self.model = params, e, model

    def __enter__(self):
        self.saved_w = {p: p.detach().clone() for p in self.params}
        self.saved_buf = save_buffers(self.model)
        with torch.no_grad():
            for p in self.params:
                if p in self.e:
                    p.add_(self.e[p])
        return self

    def __exit__(self, *exc):
        restore_buffers(self.model, self.saved_buf)
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.saved_w[p])
        return False


def _stats_common(steps, sam_steps, decisions):
    return {"steps": steps, "sam_steps": sam_steps,
            "last_step_sam": decisions[-1] if decisions else False}


# ----------------------------------------------------------------------------- ASAM

class NaiveASAM:
    """SAM every step with the ASAM flags of the API (READING F1).  closure() -> loss."""

    def __init__(self, params, base, rho=0.5, adaptive="official", eta=None,
                 adaptive_params=None, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.rho = rho
        self.asam = resolve_adaptive(adaptive, eta, adaptive_params)
        self.model = model
        self.decisions: List[bool] = []

    def step(self, closure):
        loss, g = plain_pass(self.params, closure)
        e = perturbation(self.params, g, self.rho, self.asam)
        with _Perturbed(self.params, e, self.model):
            _, g_s = plain_pass(self.params, closure)
        base_step_with(self.params, g_s, self.base)
        self.decisions.append(True)
        return loss

    @property
    def stats(self):
        return _stats_common(len(self.decisions), sum(self.decisions), self.decisions)


# ----------------------------------------------------------------------------- LookSAM

class NaiveLookSAM:
    """LookSAM (Liu et al. 2022).  Own step counter from 0; steps % k == 0 -> refresh."""

    def __init__(self, params, base, k=5, alpha=0.7, rho=0.05, adaptive=False, eta=None,
                 adaptive_params=None, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.k = k
        self.alpha = alpha
        self.rho = rho
        self.asam = resolve_adaptive(adaptive, eta, adaptive_params)
        self.model = model
        self.steps = 0
        self.gv: Dict[torch.Tensor, torch.Tensor] = {}
        self.decisions: List[bool] = []
        # records of the last refresh, for the self-checks
        self.last_g: Dict = {}
        self.last_gs: Dict = {}

    def step(self, closure):
        if self.steps % self.k == 0:
            loss, g = plain_pass(self.params, closure)
            e = perturbation(self.params, g, self.rho, self.asam)
            with _Perturbed(self.params, e, self.model):
                _, g_s = plain_pass(self.params, closure)
            gv = {}
            for p in self.params:
                if g[p] is None or g_s[p] is None:
                    continue
                ng, ngs = tnorm(g[p]), tnorm(g_s[p])
                # READING F4
                if ng == 0.0 or ngs == 0.0:
                    cos = 0.0
                else:
                    cos = tdot(g[p], g_s[p]) / (ng * ngs)
                coef = 0.0 if ng == 0.0 else ngs * cos / ng
                gv[p] = g_s[p] - coef * g[p]
            self.gv = gv
            self.last_g, self.last_gs = g, g_s
            base_step_with(self.params, g_s, self.base)
            self.decisions.append(True)
        else:
            loss, g = plain_pass(self.params, closure)
            for p in self.params:
                if g[p] is None or p not in self.gv:
                    continue
                coef = self.alpha * tnorm(g[p]) / (tnorm(self.gv[p]) + EPS)
                g[p] = g[p] + coef * self.gv[p]
            base_step_with(self.params, g, self.base)
            self.decisions.append(False)
        self.steps += 1
        return loss

    @property
    def stats(self):
        return _stats_common(self.steps, sum(self.decisions), self.decisions)


# ----------------------------------------------------------------------------- AE-SAM

class NaiveAESAM:
    """AE-SAM (Jiang et al. 2023): SAM step iff n >= mu + c_t * sigma."""

    def __init__(self, params, base, total_steps, delta=0.9, lambdas=(-1.0, 1.0), rho=0.05,
                 adaptive=False, eta=None, adaptive_params=None, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.T = total_steps
        self.delta = delta
        self.l1, self.l2 = lambdas
        self.rho = rho
        self.asam = resolve_adaptive(adaptive, eta, adaptive_params)
        self.model = model
        self.t = 0
        self.mu = 0.0
        self.sigma2 = 0.0
        self.decisions: List[bool] = []
        self.ns: List[float] = []
        self.mus: List[float] = []
        self.sigmas: List[float] = []
        self.cs: List[float] = []

    def step(self, closure):
        loss, g = plain_pass(self.params, closure)
        n = sum(sq_sum(g[p]) for p in self.params)  # READING F5
        r = min(self.t / self.T, 1.0)
        c = r * self.l1 + (1.0 - r) * self.l2
        if math.isfinite(n):
            d = self.delta
            self.mu = d * self.mu + (1.0 - d) * n
            self.sigma2 = d * self.sigma2 + (1.0 - d) * (n - self.mu) ** 2
            sam = n >= self.mu + c * math.sqrt(self.sigma2)
        else:
            sam = False
        self.ns.append(n)
        self.mus.append(self.mu)
        self.sigmas.append(math.sqrt(self.sigma2))
        self.cs.append(c)
        if sam:
            e = perturbation(self.params, g, self.rho, self.asam)
            with _Perturbed(self.params, e, self.model):
                _, g_s = plain_pass(self.params, closure)
            base_step_with(self.params, g_s, self.base)
        else:
            base_step_with(self.params, g, self.base)
        self.decisions.append(sam)
        self.t += 1
        return loss

    @property
    def stats(self):
        st = _stats_common(self.t, sum(self.decisions), self.decisions)
        st["mu"] = self.mu
        st["sigma"] = math.sqrt(self.sigma2)
        return st


# ----------------------------------------------------------------------------- ESAM

class NaiveESAM:
    """ESAM (Du et al. 2022a): stochastic weight perturbation + sharpness-sensitive data
    selection.  closure(indices) -> per-sample losses, no backward."""

    def __init__(self, params, base, beta=0.5, gamma=0.5, rho=0.05, seed=0, adaptive=False,
                 eta=None, adaptive_params=None, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.beta = beta
        self.gamma = gamma
        self.rho = rho
        self.asam = resolve_adaptive(adaptive, eta, adaptive_params)
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)
        self.t = 0
        self.decisions: List[bool] = []
        self.kept: List[List[bool]] = []          # per step, per tensor
        self.selected: List[Optional[torch.Tensor]] = []  # per step: idx or None
        self.l0s: List[torch.Tensor] = []
        self.l1s: List[Optional[torch.Tensor]] = []
        self.sample_fraction = 1.0
        self.weight_fraction = 1.0

    def step(self, closure):
        params = self.params
        n_t = len(params)
        # 1. SWP  (READING F6)
        if self.beta != 1:
            u = torch.rand(n_t, generator=self.gen)
            keep = [bool(u[i] < self.beta) for i in range(n_t)]
        else:
            keep = [True] * n_t
        dropped = [p for p, k in zip(params, keep) if not k]
        for p in dropped:
            p.requires_grad_(False)
        try:
            # 2. first pass at w
            l0, g = per_sample_pass(params, closure, None, backward=True)
        finally:
            for p in dropped:
                p.requires_grad_(True)
        for p in dropped:
            g[p] = None  # no gradient: not perturbed (READING F2)
        # 3. perturb with radius rho / beta
        e = perturbation(params, g, self.rho / self.beta, self.asam)
        B = l0.shape[0]
        with _Perturbed(params, e, self.model):
            # 4. SDS
            if self.gamma != 1:
                l1, _ = per_sample_pass(params, closure, None, backward=False)
                k = math.ceil(self.gamma * B)
                d = l1 - l0
                # largest rise first, ties to the lower position: a plain Python sort by key
                ranked = sorted(range(B), key=lambda i: (-float(d[i]), i))
                idx = torch.tensor(sorted(ranked[:k]), dtype=torch.long, device=d.device)
            else:
                l1, idx = None, None
            # 5. second pass at w + e on the selected samples
            _, g_s = per_sample_pass(params, closure, idx, backward=True)
        base_step_with(params, g_s, self.base)

        self.kept.append(keep)
        self.selected.append(idx)
        self.l0s.append(l0)
        self.l1s.append(l1)
        self.sample_fraction = (B if idx is None else len(idx)) / B
        self.weight_fraction = sum(keep) / n_t
        self.decisions.append(True)
        self.t += 1
        return l0.mean()

    @property
    def stats(self):
        st = _stats_common(self.t, sum(self.decisions), self.decisions)
        st["sample_fraction"] = self.sample_fraction
        st["weight_fraction"] = self.weight_fraction
        return st


# ----------------------------------------------------------------------------- AUSAM

class NaiveAUSAM:
    """AUSAM (Deng et al. 2025): SAM on an importance-sampled subset of each batch.
    step(closure, sample_ids); closure(indices) -> per-sample losses, no backward."""

    def __init__(self, params, base, num_samples, alpha=0.5, f_min=0.1, f_max=0.5,
                 ramp_epochs=30, rho=0.05, seed=0, adaptive=False, eta=None,
                 adaptive_params=None, model=None):
        self.params = trainable(list(params))
        self.base = base
        self.N = num_samples
        self.alpha = alpha
        self.f_min = f_min
        self.f_max = f_max
        self.ramp_epochs = ramp_epochs
        self.rho = rho
        self.asam = resolve_adaptive(adaptive, eta, adaptive_params)
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)
        # the importance table
        self.sum = torch.zeros(num_samples, dtype=torch.float64)
        self.count = torch.zeros(num_samples, dtype=torch.float64)
        self.samples_before = 0
        self.t = 0
        self.decisions: List[bool] = []
        self.selected: List[Optional[torch.Tensor]] = []   # batch positions or None
        self.epochs: List[int] = []
        self.fmax_ts: List[float] = []
        self.probs: List[Optional[torch.Tensor]] = []
        self.sample_fraction = 1.0

    def f_max_t(self, epoch: int) -> float:
        if self.ramp_epochs == 0:
            return self.f_max
        return self.f_min + (self.f_max - self.f_min) * min(1.0, epoch / self.ramp_epochs)

    def step(self, closure, sample_ids):
        params = self.params
        ids = torch.as_tensor(sample_ids).detach().cpu().long().reshape(-1)
        B = ids.numel()
        epoch = self.samples_before // self.N  # READING F7
        fmt = self.f_max_t(epoch)
        if bool((self.count[ids] == 0).any()):
            idx, prob = None, None
        else:
            imp = self.sum[ids] / self.count[ids]
            lo, hi = imp.min(), imp.max()
            if bool(hi > lo):
                s = self.f_min + (imp - lo) / (hi - lo) * (fmt - self.f_min)
            else:
                s = torch.ones(B, dtype=torch.float64)
            prob = s / s.sum()
            k = math.ceil(self.alpha * B)
            pos = torch.multinomial(prob, k, replacement=False, generator=self.gen)
            idx = pos.sort().values
        # first pass at w
        l0, g = per_sample_pass(params, closure, idx, backward=True)
        e = perturbation(params, g, self.rho, self.asam)
        with _Perturbed(params, e, self.model):
            l1, g_s = per_sample_pass(params, closure, idx, backward=True)
        base_step_with(params, g_s, self.base)
        # table update for the selected samples
        sel = ids if idx is None else ids[idx]
        delta = (l1 - l0).abs().double()
        self.sum.index_add_(0, sel, delta)
        self.count.index_add_(0, sel, torch.ones(sel.numel(), dtype=torch.float64))

        self.samples_before += B
        self.selected.append(idx)
        self.epochs.append(epoch)
        self.fmax_ts.append(fmt)
        self.probs.append(prob)
        self.sample_fraction = (B if idx is None else idx.numel()) / B
        self.decisions.append(True)
        self.t += 1
        return l0.mean()

    def importance(self) -> torch.Tensor:
        """sum / count (nan where never seen)."""
        return self.sum / self.count

    @property
    def stats(self):
        st = _stats_common(self.t, sum(self.decisions), self.decisions)
        st["sample_fraction"] = self.sample_fraction
        st["epoch"] = self.samples_before // self.N  # READING F7
        return st
