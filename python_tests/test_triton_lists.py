"""The Triton backend's tensor-list ops (``segment_sumsq_list`` ... ``adamw_step_list``) against
``lists.per_tensor(reference)``, the reference op called per tensor on CPU tensors (it defines the
bits), and against the Triton backend's own flat op.

Every list op is the flat op applied to each tensor viewed 1-D: each tensor is one segment of the
segment ops, the statistics are over the tensors of index >= ``stat_first``. It is one launch
over all the tensors (addresses from a device table), not one per tensor. Element-wise results
(weights, gradients, PSF, backup, optimizer state) must be bit-identical to the reference in all
four dtypes, over consecutive calls with the state carried; sums and statistics agree to rounding
(1e-5 fp32, 1e-12 fp64). A list of one tensor gives the flat op's bits, sums included.

Without a GPU this runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on CPU
tensors, with ``triton_backend.BLOCK`` patched to 128 elements so that small tensors span several
programs (the interpreter pays per program and per element of a block); with a GPU on CUDA
tensors, with the real block and a tensor of several blocks added.
"""
import math

import pytest
import torch

from vsam_ext.ops import available_backends, backend_module, reference as R
from vsam_ext.ops.lists import per_tensor
from helpers import TRITON_INTERPRETED, device_for
from test_ops import DTYPES, assert_same, assert_sums, _rand

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")
if "triton" in available_backends():
    T = backend_module("triton")
REF = per_tensor(R)
DEV = device_for("triton")

# numels 300 and 129 (three and two 128-element blocks under the interpreter), 0 (two empty tensors, one
# of them 2-D), 1, 7, and 2-D / 4-D tensors; on a GPU also 5000 (three 2048-element blocks)
SHAPES = [(300,), (0,), (1,), (12, 5), (7,), (0, 4), (2, 3, 3, 3), (129,)]
if not TRITON_INTERPRETED:
    SHAPES.append((5000,))
STAT_FIRSTS = [0, 3, len(SHAPES)]
INTERPRETER_BLOCK = 128
LIST_OPS = ("segment_sumsq_list", "segment_gram_list", "segment_axpby_list", "perturb_list",
            "restore_psf_stats_list", "reuse_list", "sgd_step_list", "adamw_step_list")
SGD_CONFIGS = [
    dict(weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=True),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
]
ADAMW_CONFIGS = [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
                 dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, maximize=True)]
MODES = ["plain", "reuse", "restore", "restore_psf"]


@pytest.fixture(autouse=True)
def small_block():
    """Under the interpreter: 128-element blocks, so that the multi-program paths run."""
    if not TRITON_INTERPRETED:
        yield
        return
    old = T.BLOCK
    T.BLOCK = INTERPRETER_BLOCK
    try:
        yield
    finally:
        T.BLOCK = old


class Sides:
    """The same numbers twice: ``dev`` (tensors of ``shapes`` on the backend's device, for the
    Triton list op) and ``ref`` (CPU clones, for the reference per tensor)."""

    def __init__(self, dtype, shapes=SHAPES):
        self.dtype, self.shapes = dtype, shapes
        self.dev, self.ref = {}, {}

    def add(self, name, seed, zeros=False):
        ts = [torch.zeros(sh, dtype=self.dtype) if zeros
              else _rand(math.prod(sh), self.dtype, "cpu", seed + 97 * i).view(sh) for i, sh in enumerate(self.shapes)]
        self.ref[name] = ts
        self.dev[name] = [t.clone().to(DEV) for t in ts]

    def both(self, name):
        """(device list, reference list) of ``name``; (None, None) for None."""
        return (None, None) if name is None else (self.dev[name], self.ref[name])

    def check(self, *names):
        for name in names:
            if name is None:
                continue
            for got, want in zip(self.dev[name], self.ref[name]):
                assert_same(got, want)


def _stats_equal(got, want):
    assert (got is None) == (want is None), (got, want)
    if want is not None:
        assert_sums(got, want)


class Launches:
    """Counts the launches of the backend's kernels (``kernel[grid](...)``) while active."""

    def __init__(self, monkeypatch):
        self.count = {}
        for name in ("_segment_partials_kernel", "_axpby_kernel", "_perturb_kernel", "_restore_kernel",
                     "_reuse_kernel", "_sgd_kernel", "_adamw_kernel", "_segment_reduce_kernel"):
            kernel = getattr(T, name)
            monkeypatch.setattr(T, name, self._counting(name, kernel))

    def _counting(self, name, kernel):
        counts = self.count

        class Counting:
            def __getitem__(self, grid):
                counts[name] = counts.get(name, 0) + 1
                return kernel[grid]
        return Counting()


# -- segment ops ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_sumsq_list(dtype):
    s = Sides(dtype)
    s.add("x", 1)
    s.add("w", 2)
    for weighted, eta in ((False, 0.0), (True, 0.0), (True, 0.01)):
        w = s.both("w" if weighted else None)
        got = T.segment_sumsq_list(s.dev["x"], w[0], eta)
        want = REF.segment_sumsq_list(s.ref["x"], w[1], eta)
        assert want.shape == (len(SHAPES),) and want.dtype == R.maths_dtype(dtype)
        assert_sums(got, want)
        assert got[1] == 0 and got[5] == 0                       # the empty tensors
    s.check("x", "w")                                            # inputs are not written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_gram_list(dtype):
    s = Sides(dtype)
    s.add("a", 31)
    s.add("b", 32)
    got = T.segment_gram_list(s.dev["a"], s.dev["b"])
    want = REF.segment_gram_list(s.ref["a"], s.ref["b"])
    assert want.shape == (len(SHAPES), 3)
    assert_sums(got, want)
    s.check("a", "b")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_axpby_list(dtype):
    s = Sides(dtype)
    s.add("y", 33)
    s.add("x", 34)
    md = R.maths_dtype(dtype)
    for call in range(3):                                        # y carried from call to call
        alpha = _rand(len(SHAPES), md, "cpu", 35 + call)
        beta = _rand(len(SHAPES), md, "cpu", 37 + call)
        alpha[0] = 1.0                                           # LookSAM's reuse form: y + beta * x
        got = T.segment_axpby_list(s.dev["y"], s.dev["x"], alpha.to(DEV), beta.to(DEV))
        want = REF.segment_axpby_list(s.ref["y"], s.ref["x"], alpha, beta)
        s.check("y", "x")
        assert_sums(got, want)


# -- perturb, restore, reuse ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_list(dtype):
    s = Sides(dtype)
    for k, name in enumerate(("p", "g", "backup", "keep")):
        s.add(name, 3 + k)
    scale = torch.tensor(0.037, dtype=R.maths_dtype(dtype))
    # consecutive calls, p carried: SAM, ASAM, ASAM with eta, and without grad_keeps
    for adaptive, eta, keep in ((False, 0.0, "keep"), (True, 0.0, "keep"), (True, 0.01, "keep"), (True, 0.01, None)):
        T.perturb_list(s.dev["p"], s.dev["g"], scale.to(DEV), s.dev["backup"], adaptive, s.both(keep)[0], eta)
        REF.perturb_list(s.ref["p"], s.ref["g"], scale, s.ref["backup"], adaptive, s.both(keep)[1], eta)
        s.check("p", "g", "backup", "keep")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_psf_stats_list(dtype):
    s = Sides(dtype)
    for k, name in enumerate(("p", "backup", "gs", "psf")):
        s.add(name, 7 + k)
    for stat_first in STAT_FIRSTS:                               # consecutive calls: psf carried
        s.add("p", 20 + stat_first)                              # p differs from backup again
        got = T.restore_psf_stats_list(s.dev["p"], s.dev["backup"], s.dev["gs"], s.dev["psf"], stat_first)
        want = REF.restore_psf_stats_list(s.ref["p"], s.ref["backup"], s.ref["gs"], s.ref["psf"], stat_first)
        s.check("p", "backup", "gs", "psf")
        assert want.shape == (2,) and want.dtype == R.maths_dtype(dtype)
        assert_sums(got, want)
        if stat_first == len(SHAPES):
            assert got.tolist() == [0.0, 0.0]
    s.add("p", 30)
    assert T.restore_psf_stats_list(s.dev["p"], s.dev["backup"], s.dev["gs"], None, 0) is None
    s.check("backup")
    for got, want in zip(s.dev["p"], s.ref["backup"]):
        assert_same(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reuse_list(dtype):
    s = Sides(dtype)
    s.add("g", 9)
    s.add("psf", 10)
    for a in (1, 2, 3):
        T.reuse_list(s.dev["g"], s.dev["psf"], 0.7 ** a)
        REF.reuse_list(s.ref["g"], s.ref["psf"], 0.7 ** a)
        s.check("g", "psf")


# -- the fused steps -----------------------------------------------------------------------------
def _fresh_mode_inputs(s, mode, seed):
    """psf (the stored first gradient, or the PSF to reuse) and backup, fresh for this step."""
    psf = backup = None
    if mode in ("reuse", "restore_psf"):
        s.add("psf", seed + 1)
        psf = "psf"
    if mode in ("restore", "restore_psf"):
        s.add("backup", seed + 2)
        backup = "backup"
    return psf, backup


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_sgd_step_list(dtype, mode):
    """Every SGD configuration, one per call, the state (weights, momentum buffer) carried: heavy
    ball from its first step, with dampening and maximize, Nesterov, then plain SGD (which leaves
    the buffer alone); the statistics over all, the middle on, none of the tensors."""
    s = Sides(dtype)
    s.add("p", 11)
    s.add("buf", 0, zeros=True)
    for step, cfg in enumerate((1, 2, 3, 0)):
        hp = SGD_CONFIGS[cfg]
        stat_first = STAT_FIRSTS[step % len(STAT_FIRSTS)]
        buf = "buf" if hp["momentum"] else None
        s.add("g", 20 + step)
        psf, backup = _fresh_mode_inputs(s, mode, 30 + 3 * step)
        tail = (0.1, hp["weight_decay"], hp["momentum"], hp["dampening"], hp["nesterov"], hp["maximize"], step == 0)
        coeff = 0.7 ** (step + 1)
        got = T.sgd_step_list(s.dev["p"], s.dev["g"], s.both(buf)[0], s.both(psf)[0], s.both(backup)[0], coeff,
                              stat_first, *tail)
        want = REF.sgd_step_list(s.ref["p"], s.ref["g"], s.both(buf)[1], s.both(psf)[1], s.both(backup)[1], coeff,
                                 stat_first, *tail)
        s.check("p", "g", "buf", psf, backup)
        _stats_equal(got, want)
        assert (got is not None) == (mode == "restore_psf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_adamw_step_list(dtype, mode):
    """Both AdamW configurations in turn over three steps, the state carried."""
    s = Sides(dtype)
    s.add("p", 12)
    s.add("m", 0, zeros=True)
    s.add("v", 0, zeros=True)
    for step, stat_first in enumerate(STAT_FIRSTS, start=1):
        hp = ADAMW_CONFIGS[step % 2]
        s.add("g", 40 + step)
        psf, backup = _fresh_mode_inputs(s, mode, 50 + 3 * step)
        coeff = 0.7 ** step
        tail = (3e-3, hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], step, hp["maximize"])
        got = T.adamw_step_list(s.dev["p"], s.dev["g"], s.dev["m"], s.dev["v"], s.both(psf)[0], s.both(backup)[0],
                                coeff, stat_first, *tail)
        want = REF.adamw_step_list(s.ref["p"], s.ref["g"], s.ref["m"], s.ref["v"], s.both(psf)[1], s.both(backup)[1],
                                   coeff, stat_first, *tail)
        s.check("p", "g", "m", "v", psf, backup)
        _stats_equal(got, want)
        assert (got is not None) == (mode == "restore_psf")


# -- one launch, the same bits as the flat op, the tables ----------------------------------------
def _all_ops_once(s, stat_first=2):
    """Every list op once on ``s``'s device tensors (p, g, psf, backup, keep, m, v); returns the sums."""
    md = R.maths_dtype(s.dtype)
    d = s.dev
    coeffs = torch.linspace(0.5, 1.5, len(s.shapes), dtype=md).to(DEV)
    out = [T.segment_sumsq_list(d["g"], d["p"], 0.01), T.segment_gram_list(d["g"], d["psf"]),
           T.segment_axpby_list(d["keep"], d["g"], coeffs, coeffs)]
    T.perturb_list(d["p"], d["g"], torch.tensor(0.05, dtype=md, device=DEV), d["backup"], True, d["keep"], 0.01)
    out.append(T.restore_psf_stats_list(d["p"], d["backup"], d["g"], d["psf"], stat_first))
    T.reuse_list(d["g"], d["psf"], 0.5)
    out.append(T.sgd_step_list(d["p"], d["g"], d["m"], d["psf"], d["backup"], 0.0, stat_first, 0.1, 1e-4, 0.9, 0.1,
                               True, False, False))
    out.append(T.adamw_step_list(d["p"], d["g"], d["m"], d["v"], d["psf"], d["backup"], 0.0, stat_first, 1e-3,
                                 0.9, 0.999, 1e-8, 1e-2, 2, False))
    return out


def _all_sides(dtype, shapes=SHAPES):
    s = Sides(dtype, shapes)
    for k, name in enumerate(("p", "g", "psf", "backup", "keep", "m")):
        s.add(name, 60 + k)
    s.add("v", 66)
    for t in s.dev["v"]:
        t.abs_()
    return s


def test_one_launch_per_op(monkeypatch):
    """Every list op launches its kernel once for all the tensors (the segment ops: the partials
    kernel and the per-segment reduction), whatever the number of tensors."""
    s = _all_sides(torch.float32)
    launches = Launches(monkeypatch)
    _all_ops_once(s)
    assert launches.count == {"_segment_partials_kernel": 2, "_segment_reduce_kernel": 3, "_axpby_kernel": 1,
                              "_perturb_kernel": 1, "_restore_kernel": 1, "_reuse_kernel": 1, "_sgd_kernel": 1,
                              "_adamw_kernel": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_list_of_one_is_the_flat_op(dtype):
    """One implementation: the list op on ``[t]`` and the flat op on ``t`` give the same bits,
    the sums included (same blocks, same order)."""
    shape = [(150,)]
    lst, flat = _all_sides(dtype, shape), _all_sides(dtype, shape)
    md = R.maths_dtype(dtype)
    got = _all_ops_once(lst, stat_first=0)
    f = {k: v[0].view(-1) for k, v in flat.dev.items()}
    one = torch.ones(1, dtype=md, device=DEV)
    n = f["p"].numel()
    want = [T.segment_sumsq(f["g"], [0, n], f["p"], 0.01), T.segment_gram(f["g"], f["psf"], [0, n]),
            T.segment_axpby(f["keep"], f["g"], 0.5 * one, 0.5 * one, [0, n])]
    T.perturb(f["p"], f["g"], torch.tensor(0.05, dtype=md, device=DEV), f["backup"], True, f["keep"], 0.01)
    want.append(T.restore_psf_stats(f["p"], f["backup"], f["g"], f["psf"], 0))
    T.reuse(f["g"], f["psf"], 0.5)
    want.append(T.sgd_step(f["p"], f["g"], f["m"], f["psf"], f["backup"], 0.0, 0, 0.1, 1e-4, 0.9, 0.1, True, False,
                           False))
    want.append(T.adamw_step(f["p"], f["g"], f["m"], f["v"], f["psf"], f["backup"], 0.0, 0, 1e-3, 0.9, 0.999, 1e-8,
                             1e-2, 2, False))
    for a, b in zip(got, want):
        assert_same(a, b)
    for name in flat.dev:
        assert_same(lst.dev[name][0], flat.dev[name][0])


def test_default_block_several_programs():
    """The backend's own block (65536 elements under the interpreter, 2048 on a GPU) with a
    tensor of two of them beside small ones: AdamW with the restore and statistics."""
    if TRITON_INTERPRETED:
        T.BLOCK = 65536                                  # the small_block fixture puts it back
    s = Sides(torch.float32, [(70_001,), (3,), (0,), (5, 5)])
    for k, name in enumerate(("p", "g", "psf", "backup")):
        s.add(name, 80 + k)
    s.add("m", 0, zeros=True)
    s.add("v", 0, zeros=True)
    args = (0.0, 1, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, False)
    got = T.adamw_step_list(*[s.dev[n] for n in ("p", "g", "m", "v", "psf", "backup")], *args)
    want = REF.adamw_step_list(*[s.ref[n] for n in ("p", "g", "m", "v", "psf", "backup")], *args)
    s.check("p", "m", "v", "psf")
    assert_sums(got, want)


def test_tables_are_cached_per_tensor_set():
    """The same tensors come back every step: their table is built and uploaded once (the same
    device tensor), other tensors or another block get their own, and the cache stays small."""
    s = _all_sides(torch.float32)
    T._TABLES.clear()
    T.reuse_list(s.dev["g"], s.dev["psf"], 0.5)
    assert len(T._TABLES) == 1
    (key, (table, nblocks)), = T._TABLES.items()
    T.reuse_list(s.dev["g"], s.dev["psf"], 0.25)
    assert len(T._TABLES) == 1 and T._TABLES[key][0] is table
    assert table.dtype == torch.int64 and table.device == s.dev["g"][0].device
    block = T._block(max(math.prod(sh) for sh in SHAPES))
    assert nblocks == sum(-(-math.prod(sh) // block) for sh in SHAPES)
    T.reuse_list(s.dev["psf"], s.dev["g"], 0.5)               # other operands: another table
    assert len(T._TABLES) == 2
    for i in range(T._TABLES_MAX + 5):
        T.reuse_list([s.dev["g"][0][: i + 1]], [s.dev["psf"][0][: i + 1]], 0.5)
    assert len(T._TABLES) == T._TABLES_MAX
    T.reuse_list(s.dev["g"], s.dev["psf"], 0.5)
    s2 = _all_sides(torch.float32)                            # ref side: the same calls on CPU
    for c in (0.5, 0.25):
        REF.reuse_list(s2.ref["g"], s2.ref["psf"], c)
    REF.reuse_list(s2.ref["psf"], s2.ref["g"], 0.5)
    REF.reuse_list(s2.ref["g"], s2.ref["psf"], 0.5)
    for got, want in zip(s.dev["g"][1:], s2.ref["g"][1:]):     # g[0] had the sliced calls too
        assert_same(got, want)


# -- empty lists and empty tensors ---------------------------------------------------------------
def test_empty_lists_as_per_tensor():
    md = torch.float32
    for got, want in ((T.segment_sumsq_list([]), REF.segment_sumsq_list([])),
                      (T.segment_sumsq_list([], [], 0.1), REF.segment_sumsq_list([], [], 0.1)),
                      (T.segment_gram_list([], []), REF.segment_gram_list([], [])),
                      (T.segment_axpby_list([], [], torch.zeros(0, dtype=md), torch.zeros(0, dtype=md)),
                       REF.segment_axpby_list([], [], torch.zeros(0, dtype=md), torch.zeros(0, dtype=md)))):
        assert_same(got, want)
    assert T.perturb_list([], [], torch.tensor(0.5), [], True, []) is None
    assert_same(T.restore_psf_stats_list([], [], [], [], 0), REF.restore_psf_stats_list([], [], [], [], 0))
    assert T.restore_psf_stats_list([], [], [], None, 0) is None
    assert T.reuse_list([], [], 0.5) is None
    assert T.sgd_step_list([], [], [], None, None, 0.0, 0, 0.1, 0.0, 0.9, 0.0, False, False, True) is None
    assert_same(T.sgd_step_list([], [], None, [], [], 0.0, 0, 0.1, 0.0, 0.0, 0.0, False, False, True),
                REF.sgd_step_list([], [], None, [], [], 0.0, 0, 0.1, 0.0, 0.0, 0.0, False, False, True))
    assert T.adamw_step_list([], [], [], [], None, [], 0.0, 0, 0.1, 0.9, 0.99, 1e-8, 0.0, 1, False) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_only_empty_tensors(dtype):
    """Nothing to launch: the sums are zeros in the maths dtype on the device, as per tensor."""
    s = Sides(dtype, [(0,), (0, 3)])
    for k, name in enumerate(("p", "g", "psf", "backup", "m", "v")):
        s.add(name, k)
    md = R.maths_dtype(dtype)
    for op, args in (("segment_sumsq_list", ("g", "p")), ("segment_gram_list", ("g", "p"))):
        got = getattr(T, op)(*[s.dev[n] for n in args])
        assert_same(got, getattr(REF, op)(*[s.ref[n] for n in args]))
    got = T.sgd_step_list(*[s.dev[n] for n in ("p", "g", "m", "psf", "backup")], 0.0, 0, 0.1, 0.0, 0.9, 0.0, False,
                          False, True)
    assert_same(got, torch.zeros(2, dtype=md))
    T.perturb_list(s.dev["p"], s.dev["g"], torch.tensor(0.5, dtype=md, device=DEV), s.dev["backup"], False)


# -- argument checks -----------------------------------------------------------------------------
ERR_SHAPES = [(5,), (2, 3), (4,)]


def _valid_call(op):
    """Keyword arguments of a valid call of ``op`` (fp32 tensors of ERR_SHAPES on the device)."""
    def mk(seed):
        return [_rand(math.prod(sh), torch.float32, DEV, seed + i).view(sh) for i, sh in enumerate(ERR_SHAPES)]
    coeffs = torch.tensor([0.5, 1.0, 2.0], device=DEV)
    return {
        "segment_sumsq_list": lambda: dict(xs=mk(1), weights=mk(2), eta=0.1),
        "segment_gram_list": lambda: dict(a=mk(1), b=mk(2)),
        "segment_axpby_list": lambda: dict(ys=mk(1), xs=mk(2), alpha=coeffs.clone(), beta=coeffs.clone()),
        "perturb_list": lambda: dict(params=mk(1), grads=mk(2), scale=torch.tensor(0.1, device=DEV), backups=mk(3),
                                     adaptive=True, grad_keeps=mk(4)),
        "restore_psf_stats_list": lambda: dict(params=mk(1), backups=mk(2), grad_sams=mk(3), psfs=mk(4),
                                               stat_first=1),
        "reuse_list": lambda: dict(grads=mk(1), psfs=mk(2), coeff=0.5),
        "sgd_step_list": lambda: dict(params=mk(1), grads=mk(2), momentum_buffers=mk(3), psfs=mk(4), backups=mk(5),
                                      coeff=0.0, stat_first=1, lr=0.1, weight_decay=0.0, momentum=0.9,
                                      dampening=0.0, nesterov=False, maximize=False, first=False),
        "adamw_step_list": lambda: dict(params=mk(1), grads=mk(2), exp_avgs=mk(3), exp_avg_sqs=mk(4), psfs=mk(5),
                                        backups=None, coeff=0.7, stat_first=1, lr=0.1, beta1=0.9, beta2=0.99,
                                        eps=1e-8, weight_decay=0.0, step=2, maximize=False),
    }[op]()


def _mutate(value, how):
    if how == "length":
        return value[:-1]
    if how == "not_a_list":
        return value[0]
    if how == "none":
        return None
    if how == "scalar_dtype":
        return value.double()
    if how == "scalar_count":
        return torch.stack([value, value]).reshape(-1)
    value = list(value)
    if how == "numel":
        value[1] = torch.zeros(value[1].numel() + 1, device=DEV)
    elif how == "dtype":
        value[1] = value[1].double()
    elif how == "first_dtype":                            # the reference tensor itself
        value[0] = value[0].half()
    elif how == "int":
        value[1] = value[1].int()
    elif how == "noncontiguous":                          # same numel and shape as ERR_SHAPES[1], strided
        value[1] = torch.zeros(3, 2, device=DEV).t()
    elif how == "not_tensor":
        value[1] = value[1].tolist()
    return value


ERRORS = [  # (op, argument, mutation, exception, message)
    ("sgd_step_list", "grads", "length", ValueError, "grads has 2 tensors, params has 3"),
    ("sgd_step_list", "momentum_buffers", "numel", ValueError, "momentum_buffers[1] has 7 elements, params[1] has 6"),
    ("sgd_step_list", "momentum_buffers", "none", ValueError, "momentum != 0 needs momentum_buffers"),
    ("sgd_step_list", "psfs", "dtype", ValueError, "psfs[1] is torch.float64"),
    ("sgd_step_list", "backups", "noncontiguous", ValueError, "backups[1] must be contiguous"),
    ("sgd_step_list", "params", "dtype", ValueError, "params[1] is torch.float64"),
    ("sgd_step_list", "params", "first_dtype", ValueError, "params[1] is torch.float32 on"),
    ("sgd_step_list", "grads", "not_a_list", TypeError, "grads must be a list of tensors, got Tensor"),
    ("sgd_step_list", "grads", "none", TypeError, "grads must be a list of tensors, got None"),
    ("adamw_step_list", "exp_avg_sqs", "length", ValueError, "exp_avg_sqs has 2 tensors"),
    ("adamw_step_list", "exp_avgs", "noncontiguous", ValueError, "exp_avgs[1] must be contiguous"),
    ("adamw_step_list", "psfs", "numel", ValueError, "psfs[1] has 7 elements"),
    ("adamw_step_list", "exp_avgs", "none", TypeError, "exp_avgs must be a list of tensors, got None"),
    ("perturb_list", "grad_keeps", "numel", ValueError, "grad_keeps[1] has 7 elements"),
    ("perturb_list", "backups", "dtype", ValueError, "backups[1] is torch.float64"),
    ("perturb_list", "grads", "not_tensor", TypeError, "grads must be a list of tensors, got list holding list"),
    ("perturb_list", "scale", "scalar_dtype", ValueError, "scale must be one torch.float32 value"),
    ("perturb_list", "scale", "scalar_count", ValueError, "scale must be one torch.float32 value"),
    ("restore_psf_stats_list", "grad_sams", "length", ValueError, "grad_sams has 2 tensors"),
    ("restore_psf_stats_list", "psfs", "noncontiguous", ValueError, "psfs[1] must be contiguous"),
    ("restore_psf_stats_list", "params", "int", ValueError, "params[1] is torch.int32"),
    ("reuse_list", "psfs", "numel", ValueError, "psfs[1] has 7 elements"),
    ("segment_sumsq_list", "weights", "dtype", ValueError, "weights[1] is torch.float64"),
    ("segment_sumsq_list", "xs", "first_dtype", ValueError, "xs[1] is torch.float32"),
    ("segment_gram_list", "b", "length", ValueError, "b has 2 tensors, a has 3"),
    ("segment_axpby_list", "xs", "noncontiguous", ValueError, "xs[1] must be contiguous"),
    ("segment_axpby_list", "alpha", "scalar_count", ValueError, "alpha must be 3 torch.float32 values"),
    ("segment_axpby_list", "beta", "scalar_dtype", ValueError, "beta must be 3 torch.float32 values"),
]


def _tensors(kwargs):
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, list):
            yield from (t for t in v if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("op,arg,how,exc,message", ERRORS, ids=[f"{e[0]}-{e[1]}-{e[2]}" for e in ERRORS])
def test_bad_arguments_name_the_argument_and_write_nothing(op, arg, how, exc, message):
    kwargs = _valid_call(op)
    kwargs[arg] = _mutate(kwargs[arg], how)
    before = [t.clone() for t in _tensors(kwargs)]
    with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")):
        getattr(T, op)(**kwargs)
    for t, b in zip(_tensors(kwargs), before):
        assert torch.equal(t, b)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="the interpreter's limit")
def test_interpreter_needs_cpu_tensors_for_tables():
    """The interpreter runs kernels on host copies of their arguments: a table of addresses must
    hold host ones. Other devices are refused before anything is read."""
    meta = [torch.empty(5, device="meta")]
    with pytest.raises(ValueError, match="need CPU tensors"):
        T.segment_sumsq_list(meta)
    with pytest.raises(ValueError, match="need CPU tensors"):
        T.segment_sumsq(meta[0], [0, 5])
    with pytest.raises(ValueError, match="need CPU tensors"):
        T.reuse_list(meta, meta, 0.5)


def test_every_list_op_exported():
    for op in LIST_OPS:
        assert op in T.__all__ and callable(getattr(T, op))
    from vsam_ext.ops.lists import list_ops
    assert list_ops(T) is T                              # the optimizers' Dispatch uses them
