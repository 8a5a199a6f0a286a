"""vsam_ext against the independent eager oracle in naive_reference.py.

All models are tiny and run on CPU; most tests use float64 so that the tolerances can be
tight (1e-6 relative per parameter tensor), one uses float32.  Each step gets its own batch
from a torch.Generator seeded with the step number.  When a comparison fails, the message
names the first differing step and the quantity (decision / stats / loss / which tensor).
"""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import naive_reference as naive  # noqa: E402

F64 = torch.float64
F32 = torch.float32
REL_TOL = 1e-6


def _pkg():
    """Import the package under test; an ImportError makes the test FAIL (not skip)."""
    import vsam_ext  # noqa: F401
    return vsam_ext


@pytest.fixture(autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is faster and steadier on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- models / data

IN, HID, OUT = 8, 16, 4


def make_mlp(seed=0, dtype=F64, frozen_last_bias=False):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh(),
                          nn.Linear(HID, OUT))
    m = m.to(dtype)
    if frozen_last_bias:
        m[4].bias.requires_grad_(False)
    return m


def make_cnn(seed=0, dtype=F64):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return m.to(dtype)


_TEACHER = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(12345), dtype=F64)


def mlp_batch(step, dtype=F64, bs=32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(bs, IN, generator=g, dtype=F64)
    noise = 0.5 * torch.randn(bs, OUT, generator=g, dtype=F64)
    y = (x @ _TEACHER + noise).argmax(dim=1)
    return x.to(dtype), y


def cnn_batch(step, dtype=F64, bs=16):
    g = torch.Generator().manual_seed(5000 + step)
    x = torch.randn(bs, 2, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (bs,), generator=g)
    return x.to(dtype), y


def make_closure(model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def state_tensors(model):
    out = {"param:" + n: p for n, p in model.named_parameters()}
    out.update({"buffer:" + n: b for n, b in model.named_buffers()})
    return out


def rel_err(a, b):
    a = a.detach().double()
    b = b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return num
    return num / den


def worst_rel(model_a, model_b):
    sa, sb = state_tensors(model_a), state_tensors(model_b)
    worst = (None, 0.0)
    for name in sb:
        if sb[name].dtype in (torch.int64, torch.int32):
            e = 0.0 if torch.equal(sa[name], sb[name]) else math.inf
        else:
            e = rel_err(sa[name], sb[name])
            if not math.isfinite(e):
                e = math.inf
        if e > worst[1] or worst[0] is None:
            worst = (name, e)
    return worst


def all_equal(model_a, model_b):
    sa, sb = state_tensors(model_a), state_tensors(model_b)
    for name in sb:
        if not torch.equal(sa[name], sb[name]):
            return name
    return None


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


def _to_bool(v):
    if isinstance(v, torch.Tensor):
        return bool(v.item())
    return bool(v)


# ----------------------------------------------------------------------------- driver

def run_pair(model_fn, data_fn, make_pkg, make_ref, steps, *, tol=REL_TOL,
             check_stats=False, expect_calls=None, stats_rtol=1e-5):
    """Drive package optimizer and oracle on identical copies of one model, step by step.

    Returns a dict with the per-step decisions of both sides and the first mismatch of
    each kind (None if none).  Decision of the package = number of closure calls == 2.
    """
    m_pkg = model_fn()
    m_ref = copy.deepcopy(m_pkg)
    opt = make_pkg(m_pkg)
    ref = make_ref(m_ref)

    res = {"pkg_dec": [], "ref_dec": [], "pkg_quota": [], "ref_quota": [],
           "first_decision": None, "first_param": None, "first_stats": None,
           "first_loss": None, "first_calls": None, "max_rel": 0.0}

    for i in range(steps):
        x, y = data_fn(i)
        calls = [0]
        loss_p = opt.step(make_closure(m_pkg, x, y, calls))
        loss_r = ref.step(make_closure(m_ref, x, y))

        pkg_sam = calls[0] == 2
        ref_sam = ref.decisions[-1]
        res["pkg_dec"].append(pkg_sam)
        res["ref_dec"].append(ref_sam)

        if calls[0] not in (1, 2) and res["first_calls"] is None:
            res["first_calls"] = (i, calls[0])
        if expect_calls is not None and calls[0] != expect_calls(i) and res["first_calls"] is None:
            res["first_calls"] = (i, calls[0])

        if pkg_sam != ref_sam and res["first_decision"] is None:
            res["first_decision"] = (i, pkg_sam, ref_sam)

        lp, lr = _to_float(loss_p), _to_float(loss_r)
        if abs(lp - lr) > tol * max(1.0, abs(lr)) and res["first_loss"] is None:
            res["first_loss"] = (i, lp, lr)

        name, err = worst_rel(m_pkg, m_ref)
        res["max_rel"] = max(res["max_rel"], err)
        if err > tol and res["first_param"] is None:
            res["first_param"] = (i, name, err)

        if check_stats:
            st = opt.stats
            rs = ref.stats
            res["pkg_quota"].append(_to_float(st["quota"]))
            res["ref_quota"].append(rs["quota"])
            problems = []
            if _to_bool(st["last_step_sam"]) != pkg_sam:
                problems.append(f"stats['last_step_sam']={st['last_step_sam']} but closure "
                                f"was called {calls[0]}x")
            if _to_bool(st["last_step_sam"]) != ref_sam:
                problems.append(f"stats['last_step_sam']={st['last_step_sam']} vs naive {ref_sam}")
            if int(_to_float(st["steps"])) != rs["steps"]:
                problems.append(f"stats['steps']={st['steps']} vs naive {rs['steps']}")
            if int(_to_float(st["sam_steps"])) != rs["sam_steps"]:
                problems.append(f"stats['sam_steps']={st['sam_steps']} vs naive {rs['sam_steps']}")
            for key in ("quota", "probability"):
                a, b = _to_float(st[key]), rs[key]
                if not abs(a - b) <= stats_rtol * abs(b):
                    problems.append(f"stats['{key}']={a!r} vs naive {b!r}")
            if problems and res["first_stats"] is None:
                res["first_stats"] = (i, problems)

    res["opt"], res["ref"], res["m_pkg"], res["m_ref"] = opt, ref, m_pkg, m_ref
    return res


def assert_clean(res, label=""):
    msgs = []
    if res["first_calls"] is not None:
        i, c = res["first_calls"]
        msgs.append(f"step {i}: closure called {c} times (unexpected)")
    if res["first_decision"] is not None:
        i, p, r = res["first_decision"]
        msgs.append(f"step {i}: first SAM/non-SAM decision mismatch: package SAM={p}, naive SAM={r}")
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


# ============================================================================ oracle self-checks
# These run without the package: they check the oracle against itself and plain torch.

def test_oracle_rho0_equals_sgd():
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    b1 = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    b2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref = naive.NaiveSAM(m1.parameters(), b1, rho=0.0)
    for i in range(10):
        x, y = mlp_batch(i)
        ref.step(make_closure(m1, x, y))
        b2.zero_grad()
        make_closure(m2, x, y)()
        b2.step()
        assert all_equal(m1, m2) is None, f"step {i}"


def test_oracle_vsam_all_warmup_equals_sam():
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    v = naive.NaiveVSAM(m1.parameters(), torch.optim.SGD(m1.parameters(), **kw),
                        window=10, slices=2, warmup_steps=30, stat_tensors=2)
    s = naive.NaiveSAM(m2.parameters(), torch.optim.SGD(m2.parameters(), **kw))
    for i in range(30):
        x, y = mlp_batch(i)
        v.step(make_closure(m1, x, y))
        s.step(make_closure(m2, x, y))
    assert all(v.decisions)
    assert all_equal(m1, m2) is None
    assert len(v.H) == 10 and len(v.R) == 10 and len(v.V) == 10


def test_oracle_sam_changes_params_vs_sgd():
    """Sanity: rho > 0 really differs from the base optimizer (so the tests can fail)."""
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    ref = naive.NaiveSAM(m1.parameters(), torch.optim.SGD(m1.parameters(), lr=0.05), rho=0.05)
    b2 = torch.optim.SGD(m2.parameters(), lr=0.05)
    for i in range(3):
        x, y = mlp_batch(i)
        ref.step(make_closure(m1, x, y))
        b2.zero_grad()
        make_closure(m2, x, y)()
        b2.step()
    assert worst_rel(m1, m2)[1] > 1e-5


def test_oracle_robust_var_and_rate():
    # 5 values, w=2 -> slices of 2: [1,2], [3,4]; remainder 10 left out.
    assert naive.robust_var([4.0, 1.0, 10.0, 3.0, 2.0], 2) == pytest.approx(0.5)
    assert naive.robust_var([1.0, 2.0, 3.0], 2) == 0.0
    assert naive.robust_var([1.0, 3.0, 5.0, 9.0, 2.0, 4.0], 3) == pytest.approx(
        (0.5 + 0.5 + 8.0) / 3)
    assert naive.mean_rate([]) == 0.0
    assert naive.mean_rate([1.0]) == 0.0
    assert naive.mean_rate([1.0, 2.0, 3.0]) == pytest.approx((1.0 + 0.5) / 2)
    assert naive.mean_rate([0.0, 1.0, 2.0]) == pytest.approx(1.0)  # first pair skipped
    assert naive.mean_rate([1.0, 5.0]) == 1.0                      # clamped mean
    assert naive.mean_rate([1.0, float("nan"), 2.0]) == 0.0        # no usable pair
    assert naive.mean_rate([4.0, 1.0]) == pytest.approx(-0.75)


def _oracle_vsam_run(steps=400, **kw):
    m = make_mlp()
    base = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cfg = dict(window=10, slices=2, warmup_steps=20, stat_tensors=2, seed=0)
    cfg.update(kw)
    v = naive.NaiveVSAM(m.parameters(), base, **cfg)
    for i in range(steps):
        x, y = mlp_batch(i)
        v.step(make_closure(m, x, y))
    return v


def test_oracle_vsam_quota_is_met_per_window():
    """Each full window takes exactly floor(s) SAM steps (force clause + quota cap)."""
    v = _oracle_vsam_run()
    K, W = 10, 20
    post = v.decisions[W:]
    quotas = v.quotas[W:]
    # j = index + 1; windows: j in [1, K-1], then [mK, (m+1)K - 1]
    windows = {}
    for idx, d in enumerate(post):
        j = idx + 1
        windows.setdefault(j // K, []).append((d, quotas[idx]))
    last = max(windows)
    for wid, items in windows.items():
        if wid == last:
            continue
        s = items[0][1]
        assert all(q == s for _, q in items)
        assert sum(d for d, _ in items) == math.floor(s), f"window {wid}"
    assert max(v.quotas) > 1.0, "quota never moved: the vSAM tests would be trivial"
    assert any(post) and not all(post)


def test_oracle_stat_tensors_matter():
    """L = 2 and L = all give different decision sequences (so the test can catch it)."""
    a = _oracle_vsam_run(stat_tensors=2)
    b = _oracle_vsam_run(stat_tensors=10)
    assert a.decisions != b.decisions or a.quotas != b.quotas


# ============================================================================ SAM / ASAM

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
ADAMW_KW = dict(lr=1e-3, weight_decay=1e-2)


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_vs_naive_mlp(base_name, adaptive):
    vx = _pkg()
    base_cls, kw = (torch.optim.SGD, SGD_KW) if base_name == "sgd" else (torch.optim.AdamW, ADAMW_KW)
    rho = 0.05 if not adaptive else 0.5
    res = run_pair(
        make_mlp, mlp_batch,
        lambda m: vx.SAM(m.parameters(), base_cls, rho=rho, adaptive="davda54" if adaptive else False, **kw),
        lambda m: naive.NaiveSAM(m.parameters(), base_cls(m.parameters(), **kw), rho=rho,
                                 adaptive=adaptive),
        steps=20, expect_calls=lambda i: 2)
    assert_clean(res, f"SAM {base_name} adaptive={adaptive}")


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_vs_naive_cnn_batchnorm(adaptive):
    vx = _pkg()
    rho = 0.05 if not adaptive else 0.5
    res = run_pair(
        make_cnn, cnn_batch,
        lambda m: vx.SAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive="davda54" if adaptive else False,
                         model=m, **SGD_KW),
        lambda m: naive.NaiveSAM(m.parameters(), torch.optim.SGD(m.parameters(), **SGD_KW),
                                 rho=rho, adaptive=adaptive, model=m),
        steps=20, expect_calls=lambda i: 2)
    assert_clean(res, f"SAM cnn adaptive={adaptive}")


def test_sam_float32_vs_naive():
    vx = _pkg()
    res = run_pair(
        lambda: make_mlp(dtype=F32), lambda i: mlp_batch(i, F32),
        lambda m: vx.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW),
        lambda m: naive.NaiveSAM(m.parameters(), torch.optim.SGD(m.parameters(), **SGD_KW),
                                 rho=0.05),
        steps=20, tol=2e-5, expect_calls=lambda i: 2)
    assert_clean(res, "SAM float32")


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", [False, True], ids=["base.step", "fused"])
def test_sam_rho0_equals_base(base_name, fused):
    """rho=0: the bare base optimizer, bit for bit when the base optimizer takes its own step
    (reference backend, or ``fused_base=False``); to rounding when the base step is fused into
    our kernels (they may use FMA where torch does not, or the other way round)."""
    vx = _pkg()
    base_cls, kw = (torch.optim.SGD, SGD_KW) if base_name == "sgd" else (torch.optim.AdamW, ADAMW_KW)
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    opt = vx.SAM(m1.parameters(), base_cls, rho=0.0, fused_base=fused, **kw)
    bare = base_cls(m2.parameters(), **kw)
    for i in range(10):
        x, y = mlp_batch(i)
        opt.step(make_closure(m1, x, y))
        bare.zero_grad()
        make_closure(m2, x, y)()
        bare.step()
        if fused:
            assert worst_rel(m1, m2)[1] < 1e-12, f"step {i}: differs from bare {base_name}"
        else:
            name = all_equal(m1, m2)
            assert name is None, (f"step {i}: {name} differs from bare {base_name} "
                                  f"(rel {worst_rel(m1, m2)[1]:.3e})")


# ============================================================================ PeriodicSAM

def test_periodic_sam_vs_naive():
    vx = _pkg()
    res = run_pair(
        make_mlp, mlp_batch,
        lambda m: vx.PeriodicSAM(m.parameters(), torch.optim.SGD, period=3, rho=0.05, **SGD_KW),
        lambda m: naive.NaivePeriodicSAM(m.parameters(), torch.optim.SGD(m.parameters(), **SGD_KW),
                                         period=3, rho=0.05),
        steps=30, expect_calls=lambda i: 2 if i % 3 == 0 else 1)
    assert res["pkg_dec"] == [i % 3 == 0 for i in range(30)]
    assert_clean(res, "PeriodicSAM(3)")


# ============================================================================ VSAM

def _vsam_pair(steps=400, model_fn=make_mlp, data_fn=mlp_batch, use_model=False, **cfg):
    vx = _pkg()
    full = dict(rho=0.05, window=10, slices=2, warmup_steps=20, stat_tensors=2, seed=0)
    full.update(cfg)

    def make_pkg(m):
        return vx.VSAM(m.parameters(), torch.optim.SGD, model=m if use_model else None,
                       **full, **SGD_KW)

    def make_ref(m):
        return naive.NaiveVSAM(m.parameters(), torch.optim.SGD(m.parameters(), **SGD_KW),
                               model=m if use_model else None, **full)

    return run_pair(model_fn, data_fn, make_pkg, make_ref, steps, check_stats=True)


def _assert_nontrivial(res, warmup=20):
    post = res["ref_dec"][warmup:]
    assert any(post), "no SAM step after warm-up: test is trivial"
    assert not all(post), "no reuse step after warm-up: test is trivial"
    assert max(res["ref_quota"]) > 1.0, "naive quota never left 1.0: test is trivial"
    assert max(res["pkg_quota"]) > 1.0, "package stats['quota'] never left 1.0"


@pytest.mark.parametrize("stat_tensors", [2, 10], ids=["L2", "Ldefault10"])
def test_vsam_vs_naive_mlp(stat_tensors):
    res = _vsam_pair(steps=400, stat_tensors=stat_tensors)
    assert_clean(res, f"VSAM stat_tensors={stat_tensors}")
    _assert_nontrivial(res)


def test_vsam_a_reuse_decay0_vs_naive():
    res = _vsam_pair(steps=400, reuse_decay=0.0)
    assert_clean(res, "VSAM-A (reuse_decay=0)")
    _assert_nontrivial(res)


def test_vsam_other_hparams_vs_naive():
    """Another corner of the hyper-parameters: larger gains, short reuse, other seed."""
    res = _vsam_pair(steps=300, window=8, slices=3, lambdas=(0.4, 0.2), max_rate=0.5,
                     reuse_decay=0.5, max_reuse=2, seed=7, warmup_steps=5, stat_tensors=3)
    assert_clean(res, "VSAM other hparams")
    _assert_nontrivial(res, warmup=5)


def test_vsam_frozen_param_excluded_from_stats():
    """A parameter with requires_grad=False is not one of the 'last L tensors'."""
    res = _vsam_pair(steps=300, stat_tensors=2,
                     model_fn=lambda: make_mlp(frozen_last_bias=True))
    assert_clean(res, "VSAM frozen last bias")
    _assert_nontrivial(res)


def test_vsam_vs_naive_cnn_batchnorm():
    res = _vsam_pair(steps=150, model_fn=make_cnn, data_fn=cnn_batch, use_model=True,
                     stat_tensors=3)
    assert_clean(res, "VSAM cnn+BN model=")
    assert any(res["ref_dec"][20:]) and not all(res["ref_dec"][20:])


# ============================================================================ closure vs two-call

def test_vsam_closure_vs_two_call():
    vx = _pkg()
    cfg = dict(rho=0.05, window=10, slices=2, warmup_steps=20, stat_tensors=2, seed=0)
    m1 = make_mlp()
    m2 = copy.deepcopy(m1)
    o1 = vx.VSAM(m1.parameters(), torch.optim.SGD, **cfg, **SGD_KW)
    o2 = vx.VSAM(m2.parameters(), torch.optim.SGD, **cfg, **SGD_KW)
    dec1, dec2 = [], []
    for i in range(100):
        x, y = mlp_batch(i)
        calls = [0]
        l1 = o1.step(make_closure(m1, x, y, calls))
        dec1.append(calls[0] == 2)

        o2.zero_grad()
        l2 = F.cross_entropy(m2(x), y)
        l2.backward()
        need = o2.first_step()
        if need:
            F.cross_entropy(m2(x), y).backward()
        o2.second_step()
        dec2.append(bool(need))

        assert dec1[-1] == dec2[-1], f"step {i}: closure SAM={dec1[-1]}, two-call SAM={dec2[-1]}"
        assert _to_bool(o2.stats["last_step_sam"]) == dec2[-1], f"step {i}: two-call stats"
        assert _to_float(l1) == l2.item(), f"step {i}: loss {_to_float(l1)!r} vs {l2.item()!r}"
        name = all_equal(m1, m2)
        assert name is None, f"step {i}: {name} differs (rel {worst_rel(m1, m2)[1]:.3e})"
    assert any(dec1[20:]) and not all(dec1[20:])


# ============================================================================ BatchNorm stats

def _bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("kind", ["sam", "vsam", "periodic"])
def test_batchnorm_running_stats_untouched_by_perturbed_pass(kind):
    vx = _pkg()
    m = make_cnn()
    ref = copy.deepcopy(m)
    if kind == "sam":
        opt = vx.SAM(m.parameters(), torch.optim.SGD, rho=0.05, model=m, **SGD_KW)
    elif kind == "vsam":
        opt = vx.VSAM(m.parameters(), torch.optim.SGD, rho=0.05, window=10, slices=2,
                      warmup_steps=5, model=m, **SGD_KW)
    else:
        opt = vx.PeriodicSAM(m.parameters(), torch.optim.SGD, period=3, rho=0.05, model=m,
                             **SGD_KW)
    x, y = cnn_batch(0)
    calls = [0]
    opt.step(make_closure(m, x, y, calls))
    assert calls[0] == 2, "step 0 should be a SAM step"
    with torch.no_grad():
        ref(x)  # one plain forward in train mode at the unperturbed weights
    got, want = _bn_buffers(m), _bn_buffers(ref)
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), (
            f"{n}: after a SAM step {got[n].flatten()[:4].tolist()} != after one plain "
            f"forward {want[n].flatten()[:4].tolist()}")
    # the weights did move (the step happened)
    assert not torch.equal(m[0].weight, ref[0].weight)
