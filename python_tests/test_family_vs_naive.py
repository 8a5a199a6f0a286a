"""The rest of the SAM family (ASAM flavours, LookSAM, AE-SAM, ESAM, AUSAM) against the
independent eager oracles in naive_family.py, plus schedule-level facts checked from what the
closure sees.

The oracle self-checks at the top run without the package.  The package tests fail (not skip)
when a class is missing.  Models are tiny and run on CPU in float64 (one float32 run per
method where cheap); tolerances: parameters within 1e-6 relative per tensor (float64), 2e-5
(float32).  Failure messages name the first differing step and the quantity.
"""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import naive_family as nf  # noqa: E402
import naive_reference as naive  # noqa: E402
from test_against_naive import (  # noqa: E402
    F32, F64, all_equal, cnn_batch, make_closure, make_cnn, make_mlp, mlp_batch, worst_rel,
    _to_bool, _to_float)

REL_TOL = 1e-6
F32_TOL = 2e-5
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
BACKENDS = ["default", "reference"]


def _pkg():
    """Import the package under test; an ImportError makes the test FAIL (not skip)."""
    import vsam_ext  # noqa: F401
    return vsam_ext


def _bk(backend):
    return {} if backend == "default" else {"backend": backend}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- closures / data

def make_ps_closure(model, x, y, log=None, snap=False):
    """Per-sample closure of the ESAM/AUSAM contract: closure(indices) -> losses, no backward.

    Each call appends to ``log`` what it saw: the indices, whether grad mode was on, each
    parameter's requires_grad, the per-sample losses; with ``snap`` also the weights and
    the .grad of every parameter at entry."""
    params = list(model.parameters())

    def closure(indices=None):
        ent = {}
        if log is not None:
            ent["indices"] = None if indices is None else indices.detach().clone()
            ent["grad_enabled"] = torch.is_grad_enabled()
            ent["requires_grad"] = [p.requires_grad for p in params]
            if snap:
                ent["weights"] = [p.detach().clone() for p in params]
                ent["grads"] = [None if p.grad is None else p.grad.detach().clone()
                                for p in params]
            log.append(ent)
        xi, yi = (x, y) if indices is None else (x[indices], y[indices])
        losses = F.cross_entropy(model(xi), yi, reduction="none")
        if log is not None:
            ent["losses"] = losses.detach().clone()
        return losses
    return closure


def _idx_list(t):
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _call_signature(log):
    return [(_idx_list(e["indices"]), bool(e["grad_enabled"])) for e in log]


_AU_TEACHER = torch.randn(8, 4, generator=torch.Generator().manual_seed(777), dtype=F64)


def make_dataset(N, kind="mlp", seed=4242):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        X = torch.randn(N, 8, generator=g, dtype=F64)
        Y = (X @ _AU_TEACHER + 0.5 * torch.randn(N, 4, generator=g, dtype=F64)).argmax(1)
    else:
        X = torch.randn(N, 2, 8, 8, generator=g, dtype=F64)
        Y = torch.randint(0, 3, (N,), generator=g)
    return X, Y


def epoch_batches(N, B, steps, seed=99):
    """Batches of dataset indices: a seeded permutation per epoch, cut into batches of B
    (the last batch of an epoch is smaller when B does not divide N)."""
    out, ep = [], 0
    while len(out) < steps:
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + ep))
        out += [perm[i:i + B] for i in range(0, N, B)]
        ep += 1
    return out[:steps]


def random_batches(N, B, steps, seed=31):
    """Batches of B distinct indices drawn independently each step (samples may stay unseen
    for a while)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N, generator=g)[:B] for _ in range(steps)]


def ausam_data(N, B, steps, kind="mlp", dtype=F64, batches="epoch"):
    X, Y = make_dataset(N, kind)
    X = X.to(dtype)
    bl = epoch_batches(N, B, steps) if batches == "epoch" else random_batches(N, B, steps)

    def data(i):
        ids = bl[i]
        return X[ids], Y[ids], ids.clone()
    return data


# ----------------------------------------------------------------------------- driver

def run_family(model_fn, data_fn, make_pkg, make_ref, steps, *, mode="plain", tol=REL_TOL,
               stats_keys=(), stats_rtol=1e-6, expect_calls=None):
    """Drive package optimizer and oracle on identical copies of one model, step by step.

    mode "plain": closure() does forward + backward (SAM contract); decision = closure calls.
    mode "ps": per-sample closure(indices) (ESAM); mode "ausam": the same + sample_ids.
    For "ps"/"ausam" the sequence of closure calls (indices, grad mode) of the package must
    equal the oracle's.
    """
    m_pkg = model_fn()
    m_ref = copy.deepcopy(m_pkg)
    opt = make_pkg(m_pkg)
    ref = make_ref(m_ref)
    res = {"pkg_dec": [], "ref_dec": [], "first_decision": None, "first_param": None,
           "first_stats": None, "first_loss": None, "first_calls": None, "max_rel": 0.0,
           "pkg_logs": [], "ref_logs": []}

    for i in range(steps):
        if mode == "plain":
            x, y = data_fn(i)
            calls = [0]
            loss_p = opt.step(make_closure(m_pkg, x, y, calls))
            loss_r = ref.step(make_closure(m_ref, x, y))
            pkg_dec, ref_dec = calls[0] == 2, ref.decisions[-1]
            if calls[0] not in (1, 2) and res["first_calls"] is None:
                res["first_calls"] = (i, f"closure called {calls[0]} times")
            if (expect_calls is not None and calls[0] != expect_calls(i)
                    and res["first_calls"] is None):
                res["first_calls"] = (i, f"closure called {calls[0]} times, expected "
                                         f"{expect_calls(i)}")
        else:
            if mode == "ausam":
                x, y, ids = data_fn(i)
            else:
                x, y = data_fn(i)
            lp_log, lr_log = [], []
            cp = make_ps_closure(m_pkg, x, y, lp_log)
            cr = make_ps_closure(m_ref, x, y, lr_log)
            if mode == "ausam":
                loss_p = opt.step(cp, ids.clone())
                loss_r = ref.step(cr, ids.clone())
            else:
                loss_p = opt.step(cp)
                loss_r = ref.step(cr)
            res["pkg_logs"].append(lp_log)
            res["ref_logs"].append(lr_log)
            sp, sr = _call_signature(lp_log), _call_signature(lr_log)
            pkg_dec, ref_dec = sp, sr
            if sp != sr and res["first_calls"] is None:
                res["first_calls"] = (i, f"closure calls (indices, grad_enabled): package {sp} "
                                         f"vs naive {sr}")
            for e in lp_log:
                t = e["indices"]
                if t is not None and (t.dtype != torch.int64 or t.dim() != 1) \
                        and res["first_calls"] is None:
                    res["first_calls"] = (i, f"indices dtype {t.dtype} dim {t.dim()}")

        res["pkg_dec"].append(pkg_dec)
        res["ref_dec"].append(ref_dec)
        if pkg_dec != ref_dec and res["first_decision"] is None:
            res["first_decision"] = (i, pkg_dec, ref_dec)

        lp, lr = _to_float(loss_p), _to_float(loss_r)
        if not abs(lp - lr) <= tol * max(1.0, abs(lr)) and res["first_loss"] is None:
            res["first_loss"] = (i, lp, lr)

        name, err = worst_rel(m_pkg, m_ref)
        res["max_rel"] = max(res["max_rel"], err)
        if not err <= tol and res["first_param"] is None:
            res["first_param"] = (i, name, err)

        st, rs = opt.stats, ref.stats
        problems = []
        if _to_bool(st["last_step_sam"]) != rs["last_step_sam"]:
            problems.append(f"stats['last_step_sam']={st['last_step_sam']} vs naive "
                            f"{rs['last_step_sam']}")
        for key in ("steps", "sam_steps"):
            if int(_to_float(st[key])) != rs[key]:
                problems.append(f"stats['{key}']={st[key]} vs naive {rs[key]}")
        for key in stats_keys:
            a, b = _to_float(st[key]), float(rs[key])
            if not abs(a - b) <= stats_rtol * abs(b):
                problems.append(f"stats['{key}']={a!r} vs naive {b!r}")
        if problems and res["first_stats"] is None:
            res["first_stats"] = (i, problems)

    res["opt"], res["ref"], res["m_pkg"], res["m_ref"] = opt, ref, m_pkg, m_ref
    return res


def assert_clean(res, label=""):
    msgs = []
    if res["first_calls"] is not None:
        i, what = res["first_calls"]
        msgs.append(f"step {i}: {what}")
    if res["first_decision"] is not None:
        i, p, r = res["first_decision"]
        msgs.append(f"step {i}: first decision/selection mismatch: package {p} vs naive {r}")
    if res["first_stats"] is not None:
        i, probs = res["first_stats"]
        msgs.append(f"step {i}: first stats mismatch: " + "; ".join(probs))
    if res["first_loss"] is not None:
        i, lp, lr = res["first_loss"]
        msgs.append(f"step {i}: first returned-loss mismatch: package {lp!r} vs naive {lr!r}")
    if res["first_param"] is not None:
        i, name, err = res["first_param"]
        msgs.append(f"step {i}: first parameter mismatch: {name} rel err {err:.3e} "
                    f"(max over run {res['max_rel']:.3e})")
    assert not msgs, (label + ": " if label else "") + " | ".join(msgs)


def _sgd(m):
    return torch.optim.SGD(m.parameters(), **SGD_KW)


def _bare_sgd_run(m, steps, data_fn=mlp_batch):
    b = _sgd(m)
    for i in range(steps):
        x, y = data_fn(i)
        b.zero_grad()
        make_closure(m, x, y)()
        b.step()


# ============================================================================ oracle self-checks
# No package needed: the oracles against naive_reference.py, plain torch and each other.

def test_oracle_perturbation_formula_official_asam():
    """e for the official flavour, against a flat hand computation."""
    m = make_mlp()
    x, y = mlp_batch(0)
    make_closure(m, x, y)()
    params = list(m.parameters())
    g = {p: p.grad.clone() for p in params}
    rho = 0.5
    e = nf.perturbation(params, g, rho, nf.resolve_adaptive(True))
    Ts = [(p.detach().abs() + 0.01) if p.dim() >= 2 else torch.ones_like(p) for p in params]
    n = torch.cat([(T * g[p]).flatten() for T, p in zip(Ts, params)]).norm().item()
    for T, p in zip(Ts, params):
        want = rho * T * T * g[p] / (n + 1e-12)
        assert torch.allclose(e[p], want, rtol=1e-12, atol=0), p.shape
    # the biases get e proportional to g (T = 1)
    for p in params:
        if p.dim() == 1:
            assert torch.allclose(e[p], rho * g[p] / (n + 1e-12), rtol=1e-12, atol=0)


def test_oracle_asam_davda54_equals_naive_reference():
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    a = nf.NaiveASAM(m1.parameters(), _sgd(m1), rho=0.5, adaptive="davda54")
    b = naive.NaiveSAM(m2.parameters(), _sgd(m2), rho=0.5, adaptive=True)
    for i in range(10):
        x, y = mlp_batch(i)
        a.step(make_closure(m1, x, y))
        b.step(make_closure(m2, x, y))
    assert worst_rel(m1, m2)[1] < 1e-13


def test_oracle_asam_flags():
    def run(**kw):
        m = make_mlp()
        o = nf.NaiveASAM(m.parameters(), _sgd(m), rho=0.5, **kw)
        for i in range(5):
            x, y = mlp_batch(i)
            o.step(make_closure(m, x, y))
        return m

    off, dav = run(adaptive=True), run(adaptive="davda54")
    assert worst_rel(off, dav)[1] > 1e-4, "official and davda54 flavours should differ"
    assert all_equal(off, run(adaptive="official")) is None
    # official with the filter widened to every tensor and eta=0 is davda54
    assert worst_rel(run(adaptive="official", eta=0.0, adaptive_params="all"), dav)[1] < 1e-13
    # a filter that accepts no tensor is plain SAM
    m_sam = make_mlp()
    s = naive.NaiveSAM(m_sam.parameters(), _sgd(m_sam), rho=0.5)
    for i in range(5):
        x, y = mlp_batch(i)
        s.step(make_closure(m_sam, x, y))
    assert worst_rel(run(adaptive=True, adaptive_params=lambda t: False), m_sam)[1] < 1e-13
    # eta matters
    assert worst_rel(run(adaptive=True, eta=0.1), off)[1] > 1e-6


def test_oracle_looksam_alpha0_equals_periodic_sam():
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    a = nf.NaiveLookSAM(m1.parameters(), _sgd(m1), k=3, alpha=0.0, rho=0.05)
    b = naive.NaivePeriodicSAM(m2.parameters(), _sgd(m2), period=3, rho=0.05)
    for i in range(13):
        x, y = mlp_batch(i)
        a.step(make_closure(m1, x, y))
        b.step(make_closure(m2, x, y))
    assert a.decisions == b.decisions == [i % 3 == 0 for i in range(13)]
    assert worst_rel(m1, m2)[1] < 1e-13


def test_oracle_looksam_gv_orthogonal_and_alpha_matters():
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    a = nf.NaiveLookSAM(m1.parameters(), _sgd(m1), k=3, alpha=0.7, rho=0.05)
    b = naive.NaivePeriodicSAM(m2.parameters(), _sgd(m2), period=3, rho=0.05)
    for i in range(8):
        x, y = mlp_batch(i)
        a.step(make_closure(m1, x, y))
        b.step(make_closure(m2, x, y))
        if i % 3 == 0:
            for p in a.params:
                g, gs, gv = a.last_g[p].double(), a.last_gs[p].double(), a.gv[p].double()
                # g_v is g_s minus its projection on g: orthogonal to g, g_s - g_v || g
                assert abs(float((gv * g).sum())) <= 1e-10 * g.norm() * gs.norm()
                proj = gs - gv
                cosine = float((proj * g).sum()) / (proj.norm() * g.norm()).item()
                assert abs(abs(cosine) - 1.0) < 1e-9
    assert worst_rel(m1, m2)[1] > 1e-6


def test_oracle_aesam_always_and_never():
    # thresholds that always fire -> SAM; never fire -> the bare base optimizer
    m1, m2, m3, m4 = make_mlp(), make_mlp(), make_mlp(), make_mlp()
    always = nf.NaiveAESAM(m1.parameters(), _sgd(m1), total_steps=10, lambdas=(-1e9, -1e9))
    sam = naive.NaiveSAM(m2.parameters(), _sgd(m2), rho=0.05)
    never = nf.NaiveAESAM(m3.parameters(), _sgd(m3), total_steps=10, lambdas=(1e9, 1e9))
    for i in range(12):
        x, y = mlp_batch(i)
        always.step(make_closure(m1, x, y))
        sam.step(make_closure(m2, x, y))
        never.step(make_closure(m3, x, y))
    _bare_sgd_run(m4, 12)
    assert all(always.decisions) and not any(never.decisions)
    assert all_equal(m1, m2) is None
    assert all_equal(m3, m4) is None


def _oracle_aesam_run(steps=80, T=60, **kw):
    m = make_mlp()
    o = nf.NaiveAESAM(m.parameters(), _sgd(m), total_steps=T, **kw)
    for i in range(steps):
        x, y = mlp_batch(i)
        o.step(make_closure(m, x, y))
    return o


def test_oracle_aesam_statistics_recursion():
    o = _oracle_aesam_run()
    mu = s2 = 0.0
    for t, n in enumerate(o.ns):
        mu = 0.9 * mu + 0.1 * n
        s2 = 0.9 * s2 + 0.1 * (n - mu) ** 2
        assert o.mus[t] == pytest.approx(mu, rel=1e-14)
        assert o.sigmas[t] == pytest.approx(math.sqrt(s2), rel=1e-14)
        r = min(t / 60, 1.0)
        assert o.cs[t] == pytest.approx(r * -1.0 + (1 - r) * 1.0, abs=1e-15)
        assert o.decisions[t] == (n >= mu + o.cs[t] * math.sqrt(s2))
    assert o.decisions[0], "step 0: n >= 0.1 n + 0.28 n, a SAM step"
    assert any(o.decisions) and not all(o.decisions)


def test_oracle_esam_beta1_gamma1_equals_sam():
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    a = nf.NaiveESAM(m1.parameters(), _sgd(m1), beta=1.0, gamma=1.0, rho=0.05)
    b = naive.NaiveSAM(m2.parameters(), _sgd(m2), rho=0.05)
    for i in range(10):
        x, y = mlp_batch(i)
        log = []
        la = a.step(make_ps_closure(m1, x, y, log))
        lb = b.step(make_closure(m2, x, y))
        assert _call_signature(log) == [(None, True), (None, True)]
        assert abs(_to_float(la) - _to_float(lb)) < 1e-12
    assert worst_rel(m1, m2)[1] < 1e-12
    assert a.selected == [None] * 10 and all(all(k) for k in a.kept)


def test_oracle_esam_selection_and_swp():
    m = make_mlp()
    o = nf.NaiveESAM(m.parameters(), _sgd(m), beta=0.5, gamma=0.3, rho=0.05, seed=5)
    gen = torch.Generator().manual_seed(5)
    n_t = len(list(m.parameters()))
    for i in range(10):
        x, y = mlp_batch(i)
        before = [p.detach().clone() for p in m.parameters()]
        log = []
        o.step(make_ps_closure(m, x, y, log, snap=True))
        keep = (torch.rand(n_t, generator=gen) < 0.5).tolist()
        assert o.kept[-1] == keep
        assert log[0]["requires_grad"] == keep
        assert all(log[1]["requires_grad"]) and all(log[2]["requires_grad"])
        assert all(p.requires_grad for p in m.parameters())
        for j, k in enumerate(keep):  # dropped tensors are not perturbed
            assert torch.equal(log[1]["weights"][j], before[j]) == (not k)
        d = log[1]["losses"] - log[0]["losses"]
        want = sorted(torch.topk(d, math.ceil(0.3 * 32)).indices.tolist())
        assert _idx_list(log[2]["indices"]) == want and len(want) == 10
        assert not log[1]["grad_enabled"] and log[2]["grad_enabled"]


def test_oracle_ausam_alpha1_equals_sam():
    N, B = 48, 16
    data = ausam_data(N, B, 12)
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    a = nf.NaiveAUSAM(m1.parameters(), _sgd(m1), num_samples=N, alpha=1.0, rho=0.05)
    b = naive.NaiveSAM(m2.parameters(), _sgd(m2), rho=0.05)
    for i in range(12):
        x, y, ids = data(i)
        a.step(make_ps_closure(m1, x, y), ids)
        b.step(make_closure(m2, x, y))
    assert worst_rel(m1, m2)[1] < 1e-12
    assert a.selected[:3] == [None] * 3
    assert all(_idx_list(s) == list(range(B)) for s in a.selected[3:])


def test_oracle_ausam_table_and_ramp():
    N, B, steps = 60, 16, 30
    data = ausam_data(N, B, steps)
    m = make_mlp()
    o = nf.NaiveAUSAM(m.parameters(), _sgd(m), num_samples=N, alpha=0.3, ramp_epochs=3)
    seen_before = 0
    for i in range(steps):
        x, y, ids = data(i)
        s0, c0 = o.sum.clone(), o.count.clone()
        log = []
        o.step(make_ps_closure(m, x, y, log), ids)
        assert len(log) == 2
        idx = log[0]["indices"]
        assert _idx_list(idx) == _idx_list(log[1]["indices"]) == _idx_list(o.selected[-1])
        sel = ids if idx is None else ids[idx]
        ds, dc = o.sum - s0, o.count - c0
        want_s = torch.zeros(N, dtype=F64)
        want_s[sel] = (log[1]["losses"] - log[0]["losses"]).abs().double()
        want_c = torch.zeros(N, dtype=F64)
        want_c[sel] = 1.0
        assert torch.equal(dc, want_c), f"step {i}: counts"
        assert torch.allclose(ds, want_s, rtol=1e-12, atol=1e-300), f"step {i}: sums"
        epoch = seen_before // N
        assert o.epochs[-1] == epoch
        assert o.fmax_ts[-1] == pytest.approx(0.1 + 0.4 * min(1.0, epoch / 3))
        if i < 4:
            assert idx is None, "first epoch: every sample unseen -> whole batch"
        else:
            assert len(idx) == math.ceil(0.3 * len(ids))
        seen_before += len(ids)
    assert (o.count >= 1).all() and (o.count > 1).any()


# ============================================================================ ASAM (package)

def _asam_pair(steps, model_fn=make_mlp, data_fn=mlp_batch, use_model=False, backend="default",
               pkg_kw=None, ref_kw=None, rho=0.5):
    vx = _pkg()
    return run_family(
        model_fn, data_fn,
        lambda m: vx.SAM(m.parameters(), torch.optim.SGD, rho=rho,
                         model=m if use_model else None, **(pkg_kw or {}), **_bk(backend),
                         **SGD_KW),
        lambda m: nf.NaiveASAM(m.parameters(), _sgd(m), rho=rho,
                               model=m if use_model else None, **(ref_kw or {})),
        steps, expect_calls=lambda i: 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_official_default_vs_naive(backend):
    """adaptive=True is the official flavour: eta=0.01, T only on dim >= 2 tensors."""
    res = _asam_pair(50, backend=backend, pkg_kw=dict(adaptive=True),
                     ref_kw=dict(adaptive="official", eta=0.01, adaptive_params="weights"))
    assert_clean(res, f"ASAM adaptive=True [{backend}]")


def test_asam_official_string_and_davda54_vs_naive():
    res = _asam_pair(50, pkg_kw=dict(adaptive="official"), ref_kw=dict(adaptive="official"))
    assert_clean(res, "ASAM adaptive='official'")
    res = _asam_pair(50, pkg_kw=dict(adaptive="davda54"), ref_kw=dict(adaptive="davda54"))
    assert_clean(res, "ASAM adaptive='davda54'")


@pytest.mark.parametrize("flags", [
    dict(adaptive="official", eta=0.1),
    dict(adaptive="official", adaptive_params="all"),
    dict(adaptive="davda54", adaptive_params="weights"),
    dict(adaptive="davda54", eta=0.05),
    dict(adaptive=True, adaptive_params=lambda t: t.dim() == 1),
], ids=["official-eta0.1", "official-all", "davda54-weights", "davda54-eta0.05",
        "callable-biases"])
def test_asam_overrides_vs_naive(flags):
    res = _asam_pair(20, pkg_kw=flags, ref_kw=flags)
    assert_clean(res, f"ASAM {flags}")


def test_asam_official_differs_from_davda54():
    vx = _pkg()
    ms = {}
    for fl in (True, "davda54"):
        m = make_mlp()
        o = vx.SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=fl, **SGD_KW)
        for i in range(5):
            x, y = mlp_batch(i)
            o.step(make_closure(m, x, y))
        ms[fl] = m
    name, err = worst_rel(ms[True], ms["davda54"])
    assert err > 1e-4, f"adaptive=True and 'davda54' agree to {err:.2e}: same flavour?"


def test_asam_official_cnn_batchnorm_vs_naive():
    res = _asam_pair(50, model_fn=make_cnn, data_fn=cnn_batch, use_model=True,
                     pkg_kw=dict(adaptive=True), ref_kw=dict(adaptive="official"))
    assert_clean(res, "ASAM official cnn+BN model=")


# ============================================================================ LookSAM

def _looksam_pair(steps=60, model_fn=make_mlp, data_fn=mlp_batch, use_model=False,
                  backend="default", tol=REL_TOL, **cfg):
    vx = _pkg()
    full = dict(k=5, alpha=0.7, rho=0.05)
    full.update(cfg)
    k = full["k"]
    return run_family(
        model_fn, data_fn,
        lambda m: vx.LookSAM(m.parameters(), torch.optim.SGD, model=m if use_model else None,
                             **full, **_bk(backend), **SGD_KW),
        lambda m: nf.NaiveLookSAM(m.parameters(), _sgd(m), model=m if use_model else None,
                                  **full),
        steps, tol=tol, expect_calls=lambda i: 2 if i % k == 0 else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_looksam_vs_naive(backend):
    res = _looksam_pair(60, backend=backend)
    assert_clean(res, f"LookSAM k=5 [{backend}]")


@pytest.mark.parametrize("k", [3, 5])
def test_looksam_refreshes_every_k_with_sgd_momentum(k):
    """Own step counter: closure twice exactly on steps 0, k, 2k, ... (SGD momentum 0.9 as
    base, whose state has no 'step')."""
    vx = _pkg()
    m = make_mlp()
    opt = vx.LookSAM(m.parameters(), torch.optim.SGD, k=k, alpha=0.7, rho=0.05, lr=0.05,
                     momentum=0.9)
    for i in range(50):
        x, y = mlp_batch(i)
        calls = [0]
        opt.step(make_closure(m, x, y, calls))
        want = 2 if i % k == 0 else 1
        assert calls[0] == want, f"step {i}: closure called {calls[0]}x, want {want} (k={k})"
        assert _to_bool(opt.stats["last_step_sam"]) == (i % k == 0), f"step {i}: stats"
        assert int(_to_float(opt.stats["steps"])) == i + 1
        assert int(_to_float(opt.stats["sam_steps"])) == i // k + 1


def test_looksam_other_hparams_and_asam_vs_naive():
    res = _looksam_pair(40, k=4, alpha=1.5, rho=0.1, adaptive="official")
    assert_clean(res, "LookSAM k=4 alpha=1.5 official ASAM")


def test_looksam_cnn_batchnorm_vs_naive():
    """Tolerance 2e-5, not 1e-6: the SAM radius's norm is accumulated in fp32 (ALGORITHMS.md), the
    oracle's in fp64; LookSAM's g_v = g_s - c g cancels (||g_v|| << ||g_s||) and amplifies that
    ~1e-7 difference, and the CNN's training amplifies it further (seen: 4.7e-6 over 50 steps)."""
    res = _looksam_pair(50, model_fn=make_cnn, data_fn=cnn_batch, use_model=True, k=3, tol=2e-5)
    assert_clean(res, "LookSAM cnn+BN model=")


def test_looksam_float32_vs_naive():
    """Looser than the other float32 runs: g_v = g_s - c g is a near-cancellation
    (||g_v|| / ||g_s|| is 0.005 - 0.07 on this model), so float32 rounding of c or of the
    elementwise difference is amplified up to ~200x in g_v."""
    res = _looksam_pair(60, model_fn=lambda: make_mlp(dtype=F32),
                        data_fn=lambda i: mlp_batch(i, F32), tol=1e-4)
    assert_clean(res, "LookSAM float32")


# ============================================================================ AE-SAM

def _aesam_pair(steps=80, T=60, model_fn=make_mlp, data_fn=mlp_batch, use_model=False,
                backend="default", **cfg):
    vx = _pkg()
    full = dict(total_steps=T, delta=0.9, lambdas=(-1.0, 1.0), rho=0.05)
    full.update(cfg)
    return run_family(
        model_fn, data_fn,
        lambda m: vx.AESAM(m.parameters(), torch.optim.SGD, model=m if use_model else None,
                           **full, **_bk(backend), **SGD_KW),
        lambda m: nf.NaiveAESAM(m.parameters(), _sgd(m), model=m if use_model else None,
                                **full),
        steps, stats_keys=("mu", "sigma"))


def _check_aesam_rule(res, label):
    ref = res["ref"]
    for t, n in enumerate(ref.ns):
        want = n >= ref.mus[t] + ref.cs[t] * ref.sigmas[t]
        assert ref.decisions[t] == want, f"{label}: oracle step {t} breaks its own rule"
        assert res["pkg_dec"][t] == want, (
            f"{label}: step {t}: package SAM={res['pkg_dec'][t]} but n={n!r} "
            f"mu={ref.mus[t]!r} c={ref.cs[t]!r} sigma={ref.sigmas[t]!r} -> SAM={want}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_aesam_vs_naive_and_rule(backend):
    """80 steps with total_steps=60: c_t goes from +1 to -1 and then stays at -1."""
    res = _aesam_pair(80, 60, backend=backend)
    _check_aesam_rule(res, f"AESAM [{backend}]")
    assert_clean(res, f"AESAM [{backend}]")
    frac = sum(res["pkg_dec"]) / len(res["pkg_dec"])
    assert 0.15 <= frac <= 0.85, f"SAM fraction {frac:.2f} out of a sensible range"
    assert any(res["pkg_dec"][1:30]) and not all(res["pkg_dec"][1:30])


def test_aesam_other_hparams_vs_naive():
    res = _aesam_pair(60, 200, delta=0.8, lambdas=(-0.5, 0.5), rho=0.1, adaptive="davda54")
    _check_aesam_rule(res, "AESAM other")
    assert_clean(res, "AESAM delta=0.8 lambdas=(-.5,.5) davda54")
    assert any(res["pkg_dec"]) and not all(res["pkg_dec"])


def test_aesam_cnn_batchnorm_vs_naive():
    res = _aesam_pair(50, 50, model_fn=make_cnn, data_fn=cnn_batch, use_model=True)
    _check_aesam_rule(res, "AESAM cnn")
    assert_clean(res, "AESAM cnn+BN model=")


# ============================================================================ ESAM

def _esam_pair(steps=60, model_fn=make_mlp, data_fn=mlp_batch, use_model=False,
               backend="default", tol=REL_TOL, **cfg):
    vx = _pkg()
    full = dict(beta=0.5, gamma=0.5, rho=0.05, seed=0)
    full.update(cfg)
    return run_family(
        model_fn, data_fn,
        lambda m: vx.ESAM(m.parameters(), torch.optim.SGD, model=m if use_model else None,
                          **full, **_bk(backend), **SGD_KW),
        lambda m: nf.NaiveESAM(m.parameters(), _sgd(m), model=m if use_model else None,
                               **full),
        steps, mode="ps", tol=tol, stats_keys=("sample_fraction", "weight_fraction"))


def _n_all_dropped(res):
    return sum(not any(k) for k in res["ref"].kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_esam_vs_naive(backend):
    res = _esam_pair(60, backend=backend)
    assert_clean(res, f"ESAM beta=.5 gamma=.5 [{backend}]")
    fr = [sum(k) / len(k) for k in res["ref"].kept]
    assert min(fr) < 1.0 and max(fr) > 0.0


def test_esam_other_hparams_vs_naive():
    res = _esam_pair(50, beta=0.7, gamma=0.3, rho=0.1, seed=11, adaptive="official")
    assert_clean(res, "ESAM beta=.7 gamma=.3 seed=11 official ASAM")


def test_esam_cnn_batchnorm_vs_naive():
    res = _esam_pair(50, model_fn=make_cnn, data_fn=cnn_batch, use_model=True, beta=0.6)
    assert_clean(res, "ESAM cnn+BN model= beta=.6")


def test_esam_float32_vs_naive():
    res = _esam_pair(60, model_fn=lambda: make_mlp(dtype=F32),
                     data_fn=lambda i: mlp_batch(i, F32), tol=F32_TOL)
    assert_clean(res, "ESAM float32")


def test_esam_frozen_param_not_counted_vs_naive():
    """n_tensors counts only the parameters that required grad at construction."""
    res = _esam_pair(40, model_fn=lambda: make_mlp(frozen_last_bias=True), seed=1)
    assert_clean(res, "ESAM frozen last bias")
    assert res["m_pkg"][4].bias.requires_grad is False
    assert len(res["ref"].kept[0]) == 5


def test_esam_all_tensors_dropped_vs_naive():
    """beta small: many steps keep no tensor at all (first pass without any weight gradient,
    e = 0); the step must still work."""
    res = _esam_pair(20, beta=0.05, gamma=0.5)
    assert _n_all_dropped(res) >= 5
    assert_clean(res, "ESAM beta=0.05 (all tensors dropped on most steps)")


def test_esam_second_pass_sees_topk_of_loss_increase():
    """Recorded in the closure: pass 1 (None, grad), pass 2 (None, no grad) at w+e, pass 3
    on exactly the top-ceil(gamma*B) of l(w+e) - l0, sorted ascending."""
    vx = _pkg()
    m = make_mlp()
    gamma, B = 0.3, 32
    k = math.ceil(gamma * B)
    opt = vx.ESAM(m.parameters(), torch.optim.SGD, beta=0.5, gamma=gamma, rho=0.05, **SGD_KW)
    for i in range(50):
        x, y = mlp_batch(i, bs=B)
        log = []
        loss = opt.step(make_ps_closure(m, x, y, log))
        assert len(log) == 3, f"step {i}: {len(log)} closure calls, want 3"
        assert log[0]["indices"] is None and log[0]["grad_enabled"], f"step {i}: pass 1"
        assert log[1]["indices"] is None and not log[1]["grad_enabled"], (
            f"step {i}: selection pass must be on the whole batch under no_grad")
        idx = log[2]["indices"]
        assert idx is not None and log[2]["grad_enabled"], f"step {i}: pass 3"
        assert idx.dtype == torch.int64 and idx.dim() == 1, f"step {i}: indices {idx}"
        d = log[1]["losses"] - log[0]["losses"]
        want = sorted(torch.topk(d, k).indices.tolist())
        assert _idx_list(idx) == want, f"step {i}: second pass got {_idx_list(idx)}, want {want}"
        assert _to_float(loss) == pytest.approx(log[0]["losses"].mean().item(), rel=1e-12)
        assert _to_float(opt.stats["sample_fraction"]) == pytest.approx(k / B)
        assert log[2]["losses"].shape == (k,)


def test_esam_gamma1_whole_batch_no_selection_pass():
    vx = _pkg()
    m = make_mlp()
    opt = vx.ESAM(m.parameters(), torch.optim.SGD, beta=0.5, gamma=1.0, rho=0.05, **SGD_KW)
    for i in range(20):
        x, y = mlp_batch(i)
        log = []
        opt.step(make_ps_closure(m, x, y, log))
        assert _call_signature(log) == [(None, True), (None, True)], (
            f"step {i}: calls {_call_signature(log)}")
        assert _to_float(opt.stats["sample_fraction"]) == 1.0


@pytest.mark.parametrize("seed", [0, 4])
def test_esam_swp_dropped_tensors_get_no_gradient(seed):
    """Inside the closure: pass 1 has requires_grad=False on exactly the dropped tensors
    (u = torch.rand(n_tensors, generator seeded with `seed`) >= beta); at the start of pass 2
    the dropped tensors have no gradient (None or zeros) and are not perturbed, requires_grad
    is back on every tensor; after the step too."""
    vx = _pkg()
    beta = 0.5
    m = make_mlp()
    params = list(m.parameters())
    opt = vx.ESAM(m.parameters(), torch.optim.SGD, beta=beta, gamma=0.5, rho=0.05, seed=seed,
                  **SGD_KW)
    gen = torch.Generator().manual_seed(seed)
    n_dropped_total = 0
    for i in range(40):
        x, y = mlp_batch(i)
        before = [p.detach().clone() for p in params]
        keep = (torch.rand(len(params), generator=gen) < beta).tolist()
        log = []
        opt.step(make_ps_closure(m, x, y, log, snap=True))
        assert log[0]["requires_grad"] == keep, (
            f"step {i}: requires_grad in pass 1 {log[0]['requires_grad']}, want {keep}")
        for c in (1, 2):
            assert all(log[c]["requires_grad"]), f"step {i}: call {c}: requires_grad not restored"
        for j, kj in enumerate(keep):
            if kj:
                continue
            n_dropped_total += 1
            gr = log[1]["grads"][j]
            assert gr is None or not gr.any(), f"step {i}: dropped tensor {j} has a gradient"
            assert torch.equal(log[1]["weights"][j], before[j]), (
                f"step {i}: dropped tensor {j} was perturbed")
        if any(keep):
            assert any(not torch.equal(log[1]["weights"][j], before[j])
                       for j, kj in enumerate(keep) if kj), f"step {i}: nothing perturbed"
        assert all(p.requires_grad for p in params), f"step {i}: requires_grad after the step"
        assert _to_float(opt.stats["weight_fraction"]) == pytest.approx(sum(keep) / len(keep))
    assert n_dropped_total > 0


# ============================================================================ AUSAM

def _ausam_pair(steps=60, N=60, B=16, kind="mlp", use_model=False, backend="default",
                dtype=F64, tol=REL_TOL, batches="epoch", **cfg):
    vx = _pkg()
    full = dict(alpha=0.5, f_min=0.1, f_max=0.5, ramp_epochs=5, rho=0.05, seed=0)
    full.update(cfg)
    model_fn = (lambda: make_mlp(dtype=dtype)) if kind == "mlp" else (lambda: make_cnn(dtype=dtype))
    return run_family(
        model_fn, ausam_data(N, B, steps, kind, dtype, batches),
        lambda m: vx.AUSAM(m.parameters(), torch.optim.SGD, num_samples=N,
                           model=m if use_model else None, **full, **_bk(backend), **SGD_KW),
        lambda m: nf.NaiveAUSAM(m.parameters(), _sgd(m), num_samples=N,
                                model=m if use_model else None, **full),
        steps, mode="ausam", tol=tol, stats_keys=("sample_fraction", "epoch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ausam_vs_naive(backend):
    """N=60, batches 16,16,16,12 per epoch: 60 steps = 15 epochs, the ramp over 5."""
    res = _ausam_pair(60, backend=backend)
    assert_clean(res, f"AUSAM [{backend}]")
    sel = res["ref"].selected
    assert sel[:4] == [None] * 4 and all(s is not None for s in sel[4:])


def test_ausam_other_hparams_random_batches_vs_naive():
    res = _ausam_pair(60, N=64, B=16, batches="random", alpha=0.3, f_max=1.0, ramp_epochs=2,
                      seed=9)
    assert_clean(res, "AUSAM random batches alpha=.3 f_max=1 seed=9")
    sel = res["ref"].selected
    assert any(s is None for s in sel[8:]), "no late step with an unseen sample: trivial"


def test_ausam_cnn_batchnorm_vs_naive():
    res = _ausam_pair(50, N=48, B=16, kind="cnn", use_model=True)
    assert_clean(res, "AUSAM cnn+BN model=")


def test_ausam_float32_vs_naive():
    res = _ausam_pair(50, dtype=F32, tol=F32_TOL)
    assert_clean(res, "AUSAM float32")


@pytest.mark.parametrize("batches", ["epoch", "random"])
def test_ausam_selection_rule_and_table(batches):
    """From the closure alone: all samples (indices None, both passes) while any sample of the
    batch is unseen; else ceil(alpha*B) distinct sorted positions for both passes.  A table kept
    here from the losses the closure returned (count +1, sum += |l1 - l0| for exactly the
    selected samples) must match the oracle's, run in lockstep, and the package must select
    what the oracle selects."""
    vx = _pkg()
    N, B, steps, alpha = 64, 16, 60, 0.3
    data = ausam_data(N, B, steps, batches=batches)
    m = make_mlp()
    m_ref = copy.deepcopy(m)
    opt = vx.AUSAM(m.parameters(), torch.optim.SGD, num_samples=N, alpha=alpha, ramp_epochs=3,
                   **SGD_KW)
    ref = nf.NaiveAUSAM(m_ref.parameters(), _sgd(m_ref), num_samples=N, alpha=alpha,
                        ramp_epochs=3)
    tsum = torch.zeros(N, dtype=F64)
    tcnt = torch.zeros(N, dtype=F64)
    n_sub = n_all = 0
    for i in range(steps):
        x, y, ids = data(i)
        log = []
        opt.step(make_ps_closure(m, x, y, log), ids.clone())
        ref.step(make_ps_closure(m_ref, x, y), ids.clone())
        assert len(log) == 2 and all(e["grad_enabled"] for e in log), f"step {i}: calls"
        i0, i1 = _idx_list(log[0]["indices"]), _idx_list(log[1]["indices"])
        assert i0 == i1, f"step {i}: the two passes saw different samples {i0} / {i1}"
        unseen = bool((tcnt[ids] == 0).any())
        if unseen:
            n_all += 1
            assert i0 is None, f"step {i}: a sample is unseen but only {i0} were selected"
        else:
            n_sub += 1
            k = math.ceil(alpha * len(ids))
            assert i0 is not None and len(i0) == k, f"step {i}: selected {i0}, want {k}"
            assert i0 == sorted(set(i0)), f"step {i}: not distinct/sorted: {i0}"
            assert 0 <= i0[0] and i0[-1] < len(ids)
        assert i0 == _idx_list(ref.selected[-1]), (
            f"step {i}: package selected {i0}, oracle {_idx_list(ref.selected[-1])}")
        sel = ids if i0 is None else ids[log[0]["indices"]]
        tsum.index_add_(0, sel, (log[1]["losses"] - log[0]["losses"]).abs().double())
        tcnt.index_add_(0, sel, torch.ones(len(sel), dtype=F64))
        assert torch.equal(tcnt, ref.count), f"step {i}: counts differ from the oracle's"
        assert torch.allclose(tsum, ref.sum, rtol=1e-6, atol=1e-12), f"step {i}: sums"
        assert int(_to_float(opt.stats["epoch"])) == ref.stats["epoch"], f"step {i}: epoch"
        assert _to_float(opt.stats["sample_fraction"]) == pytest.approx(
            1.0 if i0 is None else len(i0) / len(ids)), f"step {i}: sample_fraction"
    assert n_all >= 4 and n_sub >= 20, (n_all, n_sub)


def test_indexed_dataset_and_loader_drive_ausam():
    vx = _pkg()
    N, B = 48, 16
    X, Y = make_dataset(N)
    ds = vx.IndexedDataset(torch.utils.data.TensorDataset(X, Y))
    assert len(ds) == N
    item = ds[7]
    assert len(item) == 3 and torch.equal(item[0], X[7]) and torch.equal(item[1], Y[7])
    assert int(item[2]) == 7
    loader = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    m = make_mlp()
    m_ref = copy.deepcopy(m)
    opt = vx.AUSAM(m.parameters(), torch.optim.SGD, num_samples=N, alpha=0.5, ramp_epochs=2,
                   **SGD_KW)
    ref = nf.NaiveAUSAM(m_ref.parameters(), _sgd(m_ref), num_samples=N, alpha=0.5,
                        ramp_epochs=2)
    step = 0
    for _ in range(4):
        for xb, yb, ib in loader:
            assert torch.equal(xb, X[ib]) and torch.equal(yb, Y[ib])
            log = []
            opt.step(make_ps_closure(m, xb, yb, log), ib)
            ref.step(make_ps_closure(m_ref, xb, yb), ib)
            assert _idx_list(log[-1]["indices"]) == _idx_list(ref.selected[-1]), f"step {step}"
            name, err = worst_rel(m, m_ref)
            assert err <= REL_TOL, f"step {step}: {name} rel err {err:.3e}"
            step += 1
    assert step == 12
