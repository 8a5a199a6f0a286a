"""Tests for ``vsam_ext.controller`` against ``ALGORITHMS.md`` ("vSAM", its "Deviations", "SAM-k").

The controller is pure Python; these tests need no device. ``torch`` is only used for the
``torch.save``/``torch.load(weights_only=True)`` round trip of ``state_dict``.
"""
from __future__ import annotations

import io
import math
import pickle
import random
import statistics
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsam_ext.controller import EveryStep, Periodic, VSAMController, mean_change_rate, robust_var

NAN = math.nan
INF = math.inf


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

class CountingRng:
    """Wraps a ``random.Random`` and counts the draws of ``random()``."""

    def __init__(self, rng):
        self._rng = rng
        self.calls = 0

    def random(self):
        self.calls += 1
        return self._rng.random()

    def __getattr__(self, name):  # getstate / setstate / ...
        return getattr(self._rng, name)


class StubRng:
    """Returns the given values in turn, then ``default`` for ever."""

    def __init__(self, values=(), default=0.999999):
        self.values = list(values)
        self.default = default
        self.calls = 0

    def random(self):
        self.calls += 1
        return self.values.pop(0) if self.values else self.default


def stat_stream(seed, n, special=0.03):
    """``n`` pairs (psf_norm, grad_norm): a log-space random walk (so the ratio and the variance
    drift and the quota moves), with a fraction ``special`` of 0 / nan / inf values."""
    r = random.Random(seed)
    lp, lg = 0.0, 1.0
    out = []
    for _ in range(n):
        lp += r.gauss(0.0, 0.35)
        lg += r.gauss(0.0, 0.2)
        psf, g = math.exp(lp), math.exp(lg)
        if r.random() < special:
            psf = r.choice([0.0, NAN, INF])
        if r.random() < special:
            g = r.choice([0.0, NAN, INF])
        out.append((psf, g))
    return out


def drive(ctrl, n, stats, pos=0):
    """``n`` steps: decide, and after each SAM step push the next pair of ``stats``
    (from index ``pos``). Returns (decisions, new pos)."""
    decisions = []
    for _ in range(n):
        d = ctrl.decide()
        decisions.append(d)
        if d:
            ctrl.push_stats(*stats[pos % len(stats)])
            pos += 1
    return decisions, pos


def new(**kw):
    args = dict(window=10, slices=2, max_rate=0.8, lambdas=(0.13, 0.13), warmup_steps=0, seed=0)
    args.update(kw)
    return VSAMController(**args)


# --------------------------------------------------------------------------------------------
# robust_var (Eq. 8)
# --------------------------------------------------------------------------------------------

def test_robust_var_hand_example_sorting_slices_and_remainder():
    # sorted: [1, 2, 3, 4, 5, 7, 10]; w=2 -> n = 3, slices [1,2,3] and [4,5,7]; 10 left out.
    # var([1,2,3]) = 1; var([4,5,7]) = ((-4/3)^2 + (-1/3)^2 + (5/3)^2) / 2 = 7/3; mean = 5/3
    assert robust_var([5, 1, 4, 2, 3, 10, 7], 2) == pytest.approx(5 / 3, rel=1e-12)


def test_robust_var_remainder_is_at_the_top():
    # [1,2,3,4,100]: slices [1,2], [3,4]; 100 (the top) is left out
    assert robust_var([100, 4, 3, 2, 1], 2) == pytest.approx(0.5, rel=1e-12)
    # [-100,1,2,3,4]: slices [-100,1], [2,3]; 4 (the top, not -100) is left out
    assert robust_var([4, 3, 2, 1, -100], 2) == pytest.approx((101 ** 2 / 2 + 0.5) / 2, rel=1e-12)


def test_robust_var_sorts_before_slicing():
    # unsorted slices [10,1],[11,2] would give var 40.5 each; sorted [1,2],[10,11] give 0.5
    assert robust_var([10, 1, 11, 2], 2) == pytest.approx(0.5, rel=1e-12)


def test_robust_var_unbiased_variance_and_single_slice():
    # w = 1: the unbiased variance of everything: var([1,2,3,4]) = 5/3 (biased would be 1.25)
    assert robust_var([1, 2, 3, 4], 1) == pytest.approx(5 / 3, rel=1e-12)
    assert robust_var([2.0, 2.0], 1) == 0.0


def test_robust_var_mean_over_slices():
    # w = 3, n = 2: slices [0,2] (var 2), [10,14] (var 8), [20,30] (var 50) -> mean 20
    assert robust_var([30, 20, 14, 10, 2, 0], 3) == pytest.approx(20.0, rel=1e-12)


def test_robust_var_too_few_values_gives_zero():
    assert robust_var([], 1) == 0.0
    assert robust_var([1.0], 1) == 0.0
    assert robust_var([1, 2, 3], 2) == 0.0            # 3 < 2*2
    assert robust_var([1, 5, 9, 20, 40], 3) == 0.0    # 5 < 2*3
    assert robust_var([1, 2, 3, 4], 2) == pytest.approx(0.5)  # exactly 2*w: works


def test_robust_var_ignores_non_finite():
    assert robust_var([1, NAN, 2, INF, 3, -INF, 4], 2) == pytest.approx(0.5, rel=1e-12)
    # after dropping the non-finite values fewer than 2*w remain -> 0
    assert robust_var([1, 2, 3, NAN, INF], 2) == 0.0
    assert robust_var(deque([NAN, NAN, NAN, NAN]), 1) == 0.0


def _direct_robust_var(values, w):
    h = np.sort(np.array([v for v in values if math.isfinite(v)], dtype=np.float64))
    if len(h) < 2 * w:
        return 0.0
    n = len(h) // w
    return statistics.fmean(statistics.variance(h[i * n:(i + 1) * n].tolist()) for i in range(w))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([NAN, INF, -INF])), max_size=80),
       w=st.integers(1, 12))
def test_robust_var_property_against_direct_computation(values, w):
    got = robust_var(values, w)
    want = _direct_robust_var(values, w)
    assert math.isfinite(got) and got >= 0.0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------------------------
# mean_change_rate (Eq. 9-10, 12-13)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("history, expected", [
    ([1.0, 2.0, 3.0], (1.0 + 0.5) / 2),
    ([4.0, 2.0, 1.0], -0.5),
    ([2.0, 2.0, 2.0], 0.0),
    ([2.0, 0.0], -1.0),                      # a zero *numerator* is a usable pair
    ([1.0, 3.0, 1.0], (2.0 - 2 / 3) / 2),    # mean 0.667 (clamping each term would give 1/6)
    ([1.0, 10.0], 1.0),                      # 9 clamped to 1
    ([1.0, 4.0, 1.0], 1.0),                  # mean (3 - 0.75)/2 = 1.125 clamped to 1
    ([10.0, 0.0, 0.0], -1.0),                # (0-10)/10 = -1, then (0,0) skipped
    ([-1.0, 2.0], -1.0),                     # (2 - -1)/-1 = -3 clamped to -1
    ([0.0, 4.0, 5.0], 0.25),                 # zero denominator skipped
    ([1.0, NAN, 2.0, 3.0], 0.5),             # pairs with a nan skipped
    ([1.0, INF, 2.0, 2.2], 0.1),
    ([INF, 1.0], 0.0),
    ([1.0, -INF], 0.0),
    ([], 0.0),
    ([5.0], 0.0),
    ([0.0, 0.0, 0.0], 0.0),
    ([NAN, NAN], 0.0),
])
def test_mean_change_rate_examples(history, expected):
    assert mean_change_rate(history) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert mean_change_rate(deque(history)) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_mean_change_rate_overflowing_rates_stay_finite():
    # finite pairs whose rate overflows to +-inf: the result must still be a number in [-1, 1]
    tiny = 2.2250738585072014e-308
    for history in ([tiny, -4.0, tiny, 4.0], [tiny, 4.0], [tiny, -4.0], [-tiny, 4.0, tiny, 4.0]):
        got = mean_change_rate(history)
        assert math.isfinite(got) and -1.0 <= got <= 1.0


_moderate = st.floats(-1e6, 1e6).filter(lambda x: x == 0.0 or abs(x) >= 1e-6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_moderate, st.sampled_from([0.0, NAN, INF, -INF])), max_size=60))
def test_mean_change_rate_property(history):
    got = mean_change_rate(history)
    rates = [(c - p) / p for p, c in zip(history, history[1:])
             if p != 0 and math.isfinite(p) and math.isfinite(c)]
    want = min(1.0, max(-1.0, statistics.fmean(rates))) if rates else 0.0
    assert math.isfinite(got) and -1.0 <= got <= 1.0
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------------------------
# VSAMController
# --------------------------------------------------------------------------------------------

def test_defaults_match_spec_table():
    c = VSAMController()
    assert (c.window, c.slices, c.max_rate, c.lambdas, c.warmup_steps) == (50, 5, 0.8, (0.13, 0.13), 1173)
    assert c.wants_psf is True
    assert c.s == 1.0 and c.q == 0 and c.p == 1.0 / 50      # p starts at s / K (deviation 3)
    assert c.t == 0 and c.j == 0


def test_warmup_all_sam_and_no_random_draws():
    c = new(warmup_steps=37, seed=5)
    c.rng = CountingRng(c.rng)
    stats = stat_stream(1, 100)
    for i in range(37):
        assert c.needs_stats() is False
        assert c.stats()["in_warmup"] is True
        assert c.decide() is True
        c.push_stats(*stats[i])
    assert c.rng.calls == 0
    assert c.rng.getstate() == random.Random(5).getstate()
    assert (c.t, c.j, c.q, c.s, c.sam_steps) == (37, 0, 0, 1.0, 37)
    assert c.stats()["in_warmup"] is False
    c.decide()
    assert c.rng.calls == 1          # first post-warm-up step: quota 1 left -> one draw
    assert c.j == 1


def test_window_update_hand_computed_via_pushes():
    # 3 warm-up SAM steps push (1.0,1), (1.1,2), (1.2,4); the first window (j = 1..9) never
    # draws a success, so its one SAM step is forced at j = 9 and pushes (1.3, 5).
    lam_r, lam_v = 0.5, 0.3
    c = VSAMController(window=10, slices=1, max_rate=0.8, lambdas=(lam_r, lam_v), warmup_steps=3)
    c.rng = StubRng()
    pushes = [(1.0, 1.0), (1.1, 2.0), (1.2, 4.0), (1.3, 5.0)]
    k = 0
    decisions = []
    for _ in range(20):
        boundary = c.needs_stats()
        d = c.decide()
        decisions.append(d)
        if boundary:
            break
        if d:
            c.push_stats(*pushes[k])
            k += 1
    assert decisions[:3] == [True] * 3
    assert decisions[3:12] == [False] * 8 + [True]    # j=1..8 no, j=9 forced
    assert k == 4 and c.j == 10                       # the decide() at j=10 was the boundary
    # R = [1, 0.55, 0.3, 0.26]
    c_r = ((0.55 - 1.0) / 1.0 + (0.3 - 0.55) / 0.55 + (0.26 - 0.3) / 0.3) / 3
    # V = [0 (too few), var(1,1.1)=0.005, var(1,1.1,1.2)=0.01, var(1,...,1.3)=0.05/3]
    c_v = ((0.01 - 0.005) / 0.005 + (0.05 / 3 - 0.01) / 0.01) / 2      # (1 + 2/3)/2 = 5/6
    assert c.c_r == pytest.approx(c_r, rel=1e-9)
    assert c.c_v == pytest.approx(5 / 6, rel=1e-9) and c_v == pytest.approx(5 / 6)
    s = 1.0 * (1 + lam_r * c_r + lam_v * c_v)
    assert 1.0 < s < 2.0
    assert c.s == pytest.approx(s, rel=1e-9)
    assert c.p == pytest.approx(s / 10, rel=1e-9)
    assert c.q == int(decisions[-1])                  # q reset at the boundary
    st_ = c.stats()
    assert st_["quota"] == c.s and st_["probability"] == c.p
    assert st_["change_ratio"] == c.c_r and st_["change_variance"] == c.c_v


def test_window_update_multiplies_previous_quota_and_resets_q():
    c = new(window=10, max_rate=0.8, lambdas=(0.5, 0.2))
    c.rng = StubRng()
    drive(c, 9, [(1.0, 1.0)])
    assert c.needs_stats() and c.q == 1
    c.s = 2.0
    c.R.clear(); c.R.extend([1.0, 2.0])     # c_r = 1
    c.V.clear(); c.V.extend([4.0, 2.0])     # c_v = -0.5
    d = c.decide()
    assert d is False and c.q == 0           # reset (stub rng never samples; nothing forced yet)
    assert (c.c_r, c.c_v) == (1.0, -0.5)
    assert c.s == pytest.approx(2.0 * (1 + 0.5 * 1.0 + 0.2 * -0.5))   # 2.8
    assert c.p == pytest.approx(0.28)


@pytest.mark.parametrize("lambdas, R, V, s0, expected", [
    ((100.0, 100.0), [1.0, 2.0], [1.0, 2.0], 1.0, 7.0),      # top: floor(10 * 0.75) = 7
    ((0.0, 0.0), [], [], 7.9, 7.0),                        # s above the top is clamped too
    ((100.0, 100.0), [2.0, 1.0], [2.0, 1.0], 5.0, 1.0),    # factor negative -> 1
    ((0.1, 0.1), [2.0, 1.0], [2.0, 1.0], 1.0, 1.0),        # factor 0.9 -> 0.9 -> 1
    ((-3.0, 0.0), [1.0, 2.0], [], 3.0, 1.0),               # negative lambda
])
def test_quota_clamped_at_both_ends(lambdas, R, V, s0, expected):
    c = new(window=10, max_rate=0.75, lambdas=lambdas)
    assert c.max_quota == 7
    drive(c, 9, [(1.0, 1.0)])
    c.s = s0
    c.R.clear(); c.R.extend(R)
    c.V.clear(); c.V.extend(V)
    c.decide()
    assert c.s == expected and c.p == expected / 10


def test_quota_reaches_and_stays_within_bounds_over_windows():
    K = 10
    c = new(window=K, slices=1, max_rate=0.75, lambdas=(10.0, 0.0))
    up = [(float(i), 1.0) for i in range(1, 400)]           # ratio increasing
    down = [(1.0, float(i)) for i in range(1, 400)]         # ratio decreasing
    seen_top = seen_bottom = False
    pos = 0
    for _ in range(6 * K):
        _, pos = drive(c, 1, up, pos)
        assert 1.0 <= c.s <= 7.0
        seen_top |= c.s == 7.0
    assert seen_top and c.s == 7.0
    c.H.clear(); c.R.clear(); c.V.clear()
    pos = 0
    for _ in range(6 * K):
        _, pos = drive(c, 1, down, pos)
        assert 1.0 <= c.s <= 7.0
        seen_bottom |= c.s == 1.0
    assert seen_bottom and c.s == 1.0


def _to_second_boundary(c, K):
    """Steps j = 1 .. 2K-1 (first window) with pushes; afterwards the next decide is j = 2K."""
    drive(c, K - 1, [(1.0, 1.0)])
    drive(c, K, [(1.0, 1.0)])
    assert c.needs_stats()


def test_forced_sampling_fills_quota_at_end_of_window():
    K = 20
    c = new(window=K, max_rate=1.0, lambdas=(0.0, 0.0))
    c.rng = StubRng()                 # draws never succeed
    _to_second_boundary(c, K)
    c.s = 6.7                         # c_r = c_v = 0 keeps it; floor = 6
    calls = c.rng.calls
    dec, _ = drive(c, K, [(1.0, 1.0)])
    assert dec == [False] * 14 + [True] * 6
    assert c.q == 6 and c.s == 6.7 and c.p == pytest.approx(0.335)
    assert c.rng.calls - calls == K   # quota was left at every step of this window


def test_forced_sampling_with_tiny_probability():
    K = 20
    c = new(window=K, max_rate=1.0, lambdas=(0.0, 0.0), seed=3)
    _to_second_boundary(c, K)
    c.s = 6.0
    first = c.decide()                # the boundary (q reset, p = 0.3)
    c.p = 1e-12                       # tiny: nothing but the forced steps
    dec, _ = drive(c, K - 1, [(1.0, 1.0)])
    dec = [first] + dec
    assert dec == [False] * 14 + [True] * 6


def test_forced_sampling_counts_steps_already_taken():
    K = 20
    c = new(window=K, max_rate=1.0, lambdas=(0.0, 0.0))
    c.rng = StubRng()
    drive(c, 2 * K - 1, [(1.0, 1.0)])
    c.s = 6.0
    c.rng = StubRng([0.0, 0.999, 0.999, 0.0])   # success at positions 0 and 3
    dec, _ = drive(c, K, [(1.0, 1.0)])
    assert dec == [True, False, False, True] + [False] * 12 + [True] * 4
    assert c.q == 6


def test_each_full_window_takes_exactly_floor_s_sam_steps():
    K, warm = 25, 13
    c = new(window=K, slices=3, max_rate=0.8, lambdas=(1.5, 1.5), warmup_steps=warm, seed=11)
    stats = stat_stream(7, 5000)
    dec, pos = drive(c, warm + K - 1, stats)
    assert sum(dec[warm:]) == 1                          # first window: K-1 steps, quota 1
    quotas = set()
    for _ in range(80):
        dec, pos = drive(c, K, stats, pos)
        assert sum(dec) == math.floor(c.s)
        quotas.add(math.floor(c.s))
    assert len(quotas) >= 3                              # the quota did move


def test_random_draws_only_when_quota_left():
    K = 20
    c = new(window=K, slices=2, max_rate=0.9, lambdas=(2.0, 2.0), warmup_steps=5, seed=4)
    c.rng = CountingRng(c.rng)
    stats = stat_stream(2, 4000)
    drive(c, 5, stats)
    draws = no_draws = 0
    pos = 5
    for _ in range(3000):
        before = c.rng.calls
        d, pos = drive(c, 1, stats, pos)
        quota_left = math.floor(c.s) - (c.q - d[0])
        drew = c.rng.calls - before
        assert drew == (1 if quota_left > 0 else 0)
        draws += drew
        no_draws += 1 - drew
    assert draws > 100 and no_draws > 100
    ref = random.Random(4)
    for _ in range(draws):
        ref.random()
    assert c.rng.getstate() == ref.getstate()


@pytest.mark.parametrize("seed", range(100))
def test_first_window_after_warmup_takes_a_sam_step(seed):
    K, warm = 50, 10
    c = new(window=K, max_rate=0.8, warmup_steps=warm, seed=seed)
    dec, _ = drive(c, warm, [(1.0, 1.0)])
    assert c.q == 0                     # q starts at 0 after warm-up (deviation 2)
    dec, _ = drive(c, K - 1, [(1.0, 1.0)])
    assert sum(dec) == 1                # quota 1, and at least one SAM step
    assert c.needs_stats()


def test_first_window_forced_when_draws_fail():
    K, warm = 50, 10
    c = new(window=K, warmup_steps=warm)
    drive(c, warm, [(1.0, 1.0)])
    c.rng = StubRng()
    dec, _ = drive(c, K - 1, [(1.0, 1.0)])
    assert dec == [False] * (K - 2) + [True]


def test_probability_starts_at_s_over_k_and_sampling_uses_u_less_than_p():
    K = 10
    c = new(window=K)
    assert c.p == 0.1
    c.rng = StubRng([0.0999999])        # U < p = 0.1 -> sample
    assert c.decide() is True
    c = new(window=K)
    c.rng = StubRng([0.1])              # U == p -> no sample (U() < p, not <=, not >= 1-p)
    assert c.decide() is False
    c = new(window=K)
    c.rng = StubRng([0.95])             # U >= 1-p would sample in the authors' mapping
    assert c.decide() is False


@pytest.mark.parametrize("bad", [
    [(NAN, 1.0)], [(1.0, 0.0)], [(0.0, 0.0)], [(INF, 1.0)], [(1.0, INF)], [(0.0, 1.0)],
    [(NAN, NAN)], [(INF, INF)], [(-INF, 1.0)],
    [(NAN, 1.0), (1.0, 0.0), (0.0, 0.0), (INF, 1.0), (2.0, 1.0), (0.0, 1.0), (3.0, 2.0)],
])
def test_non_finite_and_zero_statistics_never_reach_the_quota(bad):
    K = 10
    c = new(window=K, slices=1, lambdas=(1.0, 1.0), warmup_steps=7, seed=1)
    r = random.Random(0)
    mixed = [bad[i % len(bad)] if r.random() < 0.5 else (r.uniform(0.5, 2), r.uniform(0.5, 2))
             for i in range(3000)]
    for stats in (bad, mixed):
        pos = 0
        for _ in range(1500):
            _, pos = drive(c, 1, stats, pos)
            for v in (c.s, c.p, c.c_r, c.c_v):
                assert math.isfinite(v)
            assert 1.0 <= c.s <= c.max_quota
            assert -1.0 <= c.c_r <= 1.0 and -1.0 <= c.c_v <= 1.0
            assert c.p == c.s / K


def test_only_unusable_statistics_leave_quota_unchanged():
    c = new(window=10, slices=1, lambdas=(5.0, 5.0), warmup_steps=3)
    pos = 0
    for _ in range(200):
        _, pos = drive(c, 1, [(0.0, 1.0), (NAN, 1.0), (1.0, 0.0), (INF, 2.0)], pos)
    assert (c.s, c.p, c.c_r, c.c_v) == (1.0, 0.1, 0.0, 0.0)


def _continue(c, n, stats, pos):
    out = []
    for _ in range(n):
        d = c.decide()
        out.append((d, c.s, c.p, c.q))
        if d:
            c.push_stats(*stats[pos])
            pos += 1
    return out


def _roundtrip_pickle(sd):
    return pickle.loads(pickle.dumps(sd))


def _roundtrip_torch(sd):
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("roundtrip", [lambda sd: sd, _roundtrip_pickle, _roundtrip_torch],
                         ids=["plain", "pickle", "torch"])
@pytest.mark.parametrize("split", [20, 50, 1234, 50 + 29 * 39 - 1])   # in warm-up, at its end,
def test_state_dict_roundtrip_mid_run(roundtrip, split):              # mid-window, before boundary
    kw = dict(window=29, slices=3, max_rate=0.7, lambdas=(1.2, 0.8), warmup_steps=50)
    stats = stat_stream(3, 6000)
    a = VSAMController(seed=123, **kw)
    pos = 0
    for _ in range(split):
        if a.decide():
            a.push_stats(*stats[pos])
            pos += 1
    sd = a.state_dict()
    before = repr(sd)
    b = VSAMController(seed=999, **kw)          # a different seed: the loaded rng state must win
    b.load_state_dict(roundtrip(sd))
    assert repr(b.state_dict()) == before
    assert repr(a.state_dict()) == before       # state_dict() did not alias live state
    ra = _continue(a, 2000, stats, pos)
    rb = _continue(b, 2000, stats, pos)
    assert ra == rb
    assert a.sam_steps == b.sam_steps and a.t == b.t
    assert len({s for _, s, _, _ in ra}) >= 3


def test_state_dict_is_plain_python():
    c = new(window=12, warmup_steps=3)
    drive(c, 100, stat_stream(0, 200))

    def check(x):
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)
        else:
            assert x is None or type(x) in (int, float, bool, str), type(x)

    check(c.state_dict())


def test_same_seed_same_decisions_different_seed_different():
    stats = stat_stream(9, 5000)
    kw = dict(window=20, slices=2, max_rate=0.8, lambdas=(1.0, 1.0), warmup_steps=10)
    runs = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 43)):
        c = VSAMController(seed=seed, **kw)
        runs[name] = _continue(c, 2000, stats, 0)
    assert runs["a"] == runs["b"]
    assert [d for d, *_ in runs["a"]] != [d for d, *_ in runs["c"]]


def test_needs_stats_exactly_before_boundary_decide():
    K, warm = 13, 7
    c = new(window=K, warmup_steps=warm, lambdas=(1.0, 1.0))
    stats = stat_stream(4, 2000)
    pos = 0
    hits = 0
    for i in range(1000):
        expected = i >= warm and (i - warm + 1) % K == 0
        assert c.needs_stats() is expected
        s_before, q_before = c.s, c.q
        _, pos = drive(c, 1, stats, pos)
        if expected:
            hits += 1
            assert c.j % K == 0 and c.q in (0, 1)   # the boundary really happened here
        else:
            assert c.s == s_before                  # no quota update elsewhere
            assert i < warm or c.q in (q_before, q_before + 1)
    assert hits == (1000 - warm) // K


def test_needs_stats_with_zero_warmup():
    c = new(window=4, warmup_steps=0)
    got = []
    for _ in range(12):
        got.append(c.needs_stats())
        c.decide()
    assert got == [False, False, False, True] * 3


def test_histories_bounded_over_10000_steps():
    K = 20
    c = new(window=K, slices=4, max_rate=0.9, lambdas=(1.0, 1.0), warmup_steps=100, seed=8)
    stats = stat_stream(5, 20000, special=0.0)
    pushed = []
    for _ in range(10_000):
        if c.decide():
            st_ = stats[len(pushed)]
            c.push_stats(*st_)
            pushed.append(st_)
        assert len(c.H) <= K and len(c.R) <= K and len(c.V) <= K
    assert len(c.H) == len(c.R) == len(c.V) == K
    assert list(c.H) == [p for p, _ in pushed[-K:]]
    assert list(c.R) == pytest.approx([p / g for p, g in pushed[-K:]])
    assert len(c.state_dict()["H"]) == K
    assert c.t == 10_000 and c.sam_steps == len(pushed)


# --------------------------------------------------------------------------------------------
# An independent re-implementation, straight from the ALGORITHMS.md pseudo-code
# --------------------------------------------------------------------------------------------

def _ref_var(H, w):
    h = np.sort(np.array([x for x in H if np.isfinite(x)], dtype=np.float64))
    if len(h) < 2 * w:
        return 0.0
    n = len(h) // w
    return float(np.mean([np.var(h[i * n:(i + 1) * n], ddof=1) for i in range(w)]))


def _ref_rate(X):
    r = [(b - a) / a for a, b in zip(X[:-1], X[1:]) if a != 0 and np.isfinite(a) and np.isfinite(b)]
    return float(np.clip(np.mean(r), -1, 1)) if r else 0.0


class RefVSAM:
    def __init__(self, K, w, max_rate, lambdas, warmup, seed):
        self.K, self.w, self.max_rate, self.lam, self.warmup = K, w, max_rate, lambdas, warmup
        self.U = random.Random(seed).random
        self.t, self.j, self.s, self.q = 0, 0, 1.0, 0
        self.p = self.s / K
        self.H, self.R, self.V = [], [], []

    def step(self):
        K = self.K
        if self.t < self.warmup:
            self.t += 1
            return True
        self.j += 1
        if self.j % K == 0:
            c_r, c_v = _ref_rate(self.R), _ref_rate(self.V)
            self.s = min(max(self.s * (1 + self.lam[0] * c_r + self.lam[1] * c_v), 1), math.floor(K * self.max_rate))
            self.p = self.s / K
            self.q = 0
        quota_left = math.floor(self.s) - self.q
        sample = (quota_left > 0 and self.U() < self.p) or (K - (self.j % K) <= quota_left)
        if sample:
            self.q += 1
        self.t += 1
        return sample

    def push(self, psf, g):
        ratio = psf / g if g != 0 else NAN
        if not (math.isfinite(psf) and math.isfinite(ratio)):
            return                    # the reliability rule: kept out of the histories
        self.H = (self.H + [psf])[-self.K:]
        self.R = (self.R + [ratio])[-self.K:]
        self.V = (self.V + [_ref_var(self.H, self.w)])[-self.K:]


def _compare_with_reference(K, w, max_rate, lambdas, warmup, seed, stats_seed, defer, steps=2000):
    stats = stat_stream(stats_seed, steps + 1)
    ref = RefVSAM(K, w, max_rate, lambdas, warmup, seed)
    c = VSAMController(window=K, slices=w, max_rate=max_rate, lambdas=lambdas, warmup_steps=warmup, seed=seed)
    pending = []
    quotas = set()
    ref_sam = 0
    for i in range(steps):
        if defer and c.needs_stats():         # the optimizer batches its reads up to a boundary
            for x in pending:
                c.push_stats(*x)
            pending.clear()
        want = ref.step()
        ref_sam += want
        got = c.decide()
        assert got == want, f"step {i}"
        assert c.s == pytest.approx(ref.s, rel=1e-9) and c.p == pytest.approx(ref.p, rel=1e-9)
        assert c.q == ref.q and c.t == ref.t and c.j == ref.j
        quotas.add(round(c.s, 9))
        if want:
            ref.push(*stats[i])
            if defer:
                pending.append(stats[i])
            else:
                c.push_stats(*stats[i])
    assert c.sam_steps == ref_sam
    return quotas


@pytest.mark.parametrize("K, w, max_rate, lambdas, warmup, defer", [
    (50, 5, 0.8, (0.13, 0.13), 100, False),      # the paper's settings, short warm-up
    (20, 2, 0.9, (2.0, 1.5), 30, True),
    (7, 3, 1.0, (1.0, -1.0), 0, False),
    (33, 1, 0.5, (-0.7, 2.5), 5, True),
])
def test_matches_reference_fixed_configs(K, w, max_rate, lambdas, warmup, defer):
    quotas = _compare_with_reference(K, w, max_rate, lambdas, warmup, seed=17, stats_seed=K, defer=defer)
    if lambdas != (0.13, 0.13):
        assert len(quotas) >= 3      # the comparison is not vacuous: the quota moved


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(K=st.integers(2, 60), data=st.data(),
       lam=st.tuples(st.floats(-3, 3), st.floats(-3, 3)),
       warmup=st.integers(0, 80), seed=st.integers(0, 2 ** 32), stats_seed=st.integers(0, 10 ** 6),
       defer=st.booleans())
def test_matches_reference_hypothesis(K, data, lam, warmup, seed, stats_seed, defer):
    w = data.draw(st.integers(1, K))
    m = data.draw(st.integers(1, K))
    max_rate = min(1.0, (m + 0.5) / K)
    _compare_with_reference(K, w, max_rate, lam, warmup, seed, stats_seed, defer)


# --------------------------------------------------------------------------------------------
# SAM every step, SAM-k
# --------------------------------------------------------------------------------------------

def test_every_step():
    c = EveryStep()
    assert c.wants_psf is False
    for i in range(100):
        assert c.needs_stats() is False
        assert c.decide() is True
    assert c.steps == c.sam_steps == 100 and c.last_step_sam is True
    assert c.stats()["probability"] == 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_periodic_every_kth_step(k):
    c = Periodic(k)
    assert c.wants_psf is False
    dec = [c.decide() for _ in range(101)]
    assert dec == [i % k == 0 for i in range(101)]
    assert c.sam_steps == sum(dec) == len(range(0, 101, k))
    assert c.stats()["probability"] == 1.0 / k
    assert c.needs_stats() is False


def test_periodic_state_dict_roundtrip():
    a = Periodic(5)
    for _ in range(7):
        a.decide()
    b = Periodic(5)
    b.load_state_dict(_roundtrip_pickle(a.state_dict()))
    assert [a.decide() for _ in range(20)] == [b.decide() for _ in range(20)]


# --------------------------------------------------------------------------------------------
# bad hyper-parameters
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, name", [
    (dict(window=1), ValueError, "window"),
    (dict(window=0), ValueError, "window"),
    (dict(window=10.0), TypeError, "window"),
    (dict(window=True), TypeError, "window"),
    (dict(window="10"), TypeError, "window"),
    (dict(slices=0), ValueError, "slices"),
    (dict(window=10, slices=11), ValueError, "slices"),
    (dict(slices=2.0), TypeError, "slices"),
    (dict(max_rate=0.0), ValueError, "max_rate"),
    (dict(max_rate=-0.1), ValueError, "max_rate"),
    (dict(max_rate=1.01), ValueError, "max_rate"),
    (dict(max_rate=NAN), ValueError, "max_rate"),
    (dict(max_rate=INF), ValueError, "max_rate"),
    (dict(max_rate="0.8"), TypeError, "max_rate"),
    (dict(window=10, max_rate=0.05), ValueError, "max_rate"),     # floor(0.5) = 0
    (dict(window=10, max_rate=0.09), ValueError, "max_rate"),
    (dict(lambdas=0.13), TypeError, "lambdas"),
    (dict(lambdas=(0.13,)), ValueError, "lambdas"),
    (dict(lambdas=(0.1, 0.2, 0.3)), ValueError, "lambdas"),
    (dict(lambdas=("a", 0.1)), TypeError, "lambdas"),
    (dict(lambdas=(0.1, NAN)), ValueError, "lambdas"),
    (dict(lambdas=(INF, 0.1)), ValueError, "lambdas"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(warmup_steps=1.5), TypeError, "warmup_steps"),
    (dict(seed=1.0), TypeError, "seed"),
])
def test_bad_hyper_parameters(kw, exc, name):
    with pytest.raises(exc, match=name):
        new(**kw)


@pytest.mark.parametrize("kw", [
    dict(window=2, slices=1, max_rate=0.5), dict(window=10, slices=10), dict(max_rate=1.0),
    dict(window=10, max_rate=0.1), dict(lambdas=[0, 0]), dict(lambdas=(-1, 1)), dict(warmup_steps=0),
])
def test_edge_hyper_parameters_accepted(kw):
    new(**kw).decide()


@pytest.mark.parametrize("period, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                         (2.0, TypeError), (True, TypeError)])
def test_bad_period(period, exc):
    with pytest.raises(exc, match="period"):
        Periodic(period)


def test_nonfinite_statistics_never_reach_the_histories():
    c = VSAMController(window=10, slices=2, warmup_steps=0)
    c.push_stats(2.0, 4.0)
    for psf, g in [(NAN, 1.0), (INF, 1.0), (1.0, NAN), (1.0, 0.0), (0.0, 0.0), (1.0, INF * 0)]:
        c.push_stats(psf, g)
    assert list(c.H) == [2.0] and list(c.R) == [0.5] and len(c.V) == 1
    assert c.stats()["nonfinite_stats"] == 6
    state = c.state_dict()
    fresh = VSAMController(window=10, slices=2, warmup_steps=0)
    fresh.load_state_dict(state)
    assert fresh.stats()["nonfinite_stats"] == 6


def test_total_steps_scales_what_was_not_given_and_round_trips():
    from vsam_ext.controller import vsam_schedule
    c = VSAMController(total_steps=500)
    assert (c.warmup_steps, c.window, c.total_steps) == vsam_schedule(500)[:2] + (500,) == (50, 45, 500)
    c = VSAMController(total_steps=500, warmup_steps=7, window=20, slices=2)
    assert (c.warmup_steps, c.window) == (7, 20)
    for _ in range(3):
        c.decide()
    fresh = VSAMController(total_steps=900, window=20, slices=2)      # other schedule, same window
    fresh.load_state_dict(c.state_dict())
    assert (fresh.warmup_steps, fresh.total_steps, fresh.t) == (7, 500, 3)
    assert fresh.stats()["warmup_steps_left"] == 4


def test_the_implicit_authors_warmup_warns_once_and_a_chosen_one_never():
    import warnings
    c = VSAMController()
    with pytest.warns(UserWarning, match="1173"):
        c.decide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            c.decide()
        for kw in (dict(warmup_steps=1173), dict(total_steps=100)):
            VSAMController(**kw).decide()


def test_window_below_the_default_slices_names_the_default():
    with pytest.raises(ValueError, match=r"slices=5 \(the default.*window=4.*slices=2"):
        VSAMController(window=4)
    with pytest.raises(ValueError, match=r"slices must be in \[1, 4\], got 5"):
        VSAMController(window=4, slices=5)                               # chosen: the plain rule
