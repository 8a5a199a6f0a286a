"""The cpu backend's tensor-list ops (``segment_sumsq_list`` ... ``adamw_step_list``) against the
reference op called per tensor and against the flat cpu op on the concatenation.

Every list op is the flat op applied to each tensor (viewed as 1-D): each tensor is one segment,
the statistics are over the tensors of index >= ``stat_first``. Element-wise results (weights,
gradients, PSF, backup, optimizer state) must be bit-identical to both, in all four dtypes, over
consecutive calls with the state carried; sums and statistics agree with the reference to
rounding (1e-5 fp32, 1e-12 fp64). The segment ops' sums are cut into the same fixed pieces as the
flat op's segments, so those are bit-identical to the flat op's too.
"""
import math
import re

import pytest
import torch

from vsam_ext.ops import available_backends, reference as R
from test_ops import DTYPES, assert_same, assert_sums, _rand

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu extension not built")
if "cpu" in available_backends():
    from vsam_ext.ops import extension as E

# numels 0, 1, 7, 33_000 (one chunk of 2^15 and a tail), 70_001 (three pieces), 2-D and 4-D tensors
SHAPES = [(33_000,), (0,), (1,), (12, 5), (7,), (70_001,), (2, 3, 3, 3)]
STAT_FIRSTS = [0, 3, len(SHAPES)]
SGD_CONFIGS = [
    dict(weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=True),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
]
ADAMW_CONFIGS = [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
                 dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, maximize=True)]
MODES = ["plain", "reuse", "restore", "restore_psf"]


class Sides:
    """The same numbers three times: ``lst`` (tensors of SHAPES, for the list op), ``ref`` (their
    clones, for the reference per tensor) and ``flat`` (their concatenation, for the flat op)."""

    def __init__(self, dtype, shapes=SHAPES):
        self.dtype, self.shapes = dtype, shapes
        self.numels = [math.prod(s) for s in shapes]
        self.bounds = [0]
        for n in self.numels:
            self.bounds.append(self.bounds[-1] + n)
        self.lst, self.ref, self.flat = {}, {}, {}

    def add(self, name, seed, zeros=False, positive=False):
        flat = (torch.zeros(self.bounds[-1], dtype=self.dtype) if zeros
                else _rand(self.bounds[-1], self.dtype, "cpu", seed, positive))
        self.flat[name] = flat
        for side in (self.lst, self.ref):
            side[name] = [flat[a:b].clone().view(s) for a, b, s in zip(self.bounds, self.bounds[1:], self.shapes)]

    def get(self, name):
        """(list, reference tensors, flat buffer) of ``name``, or three Nones."""
        if name is None or name not in self.flat:
            return None, None, None
        return self.lst[name], self.ref[name], self.flat[name]

    def per_tensor(self, name, i):
        return None if name is None or name not in self.ref else self.ref[name][i].view(-1)

    def check(self, *names):
        """Each list bit-identical to the reference's tensors and to the flat buffer."""
        for name in names:
            for got, want in zip(self.lst[name], self.ref[name]):
                assert_same(got, want)
            assert_same(torch.cat([t.reshape(-1) for t in self.lst[name]]), self.flat[name])

    def stat_start(self, stat_first):
        return self.bounds[min(stat_first, len(self.shapes))]

    def stat_range(self, i, stat_first):
        """The stat_start of tensor i's own reference call."""
        return 0 if i >= stat_first else self.numels[i]


def _sum_rows(rows, dtype):
    """Per-tensor reference sums added in fp64, returned in the maths dtype."""
    return torch.stack(rows).double().sum(0).to(R.maths_dtype(dtype))


# -- segment ops ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted,eta", [(False, 0.0), (True, 0.0), (True, 0.01), (True, 0.5)])
def test_segment_sumsq_list(dtype, weighted, eta):
    s = Sides(dtype)
    s.add("x", 1)
    s.add("w", 2)
    ws = s.lst["w"] if weighted else None
    got = E.segment_sumsq_list(s.lst["x"], ws, eta)
    want = torch.stack([R.segment_sumsq(s.per_tensor("x", i), [0, n], s.per_tensor("w", i) if weighted else None,
                                        eta)[0] for i, n in enumerate(s.numels)])
    assert_sums(got, want)
    assert torch.equal(got, E.segment_sumsq(s.flat["x"], s.bounds, s.flat["w"] if weighted else None, eta))
    assert got[1] == 0                                  # the empty tensor's sum
    s.check("x", "w")                                   # inputs are not written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_gram_list(dtype):
    s = Sides(dtype)
    s.add("a", 31)
    s.add("b", 32)
    got = E.segment_gram_list(s.lst["a"], s.lst["b"])
    want = torch.cat([R.segment_gram(s.per_tensor("a", i), s.per_tensor("b", i), [0, n])
                      for i, n in enumerate(s.numels)])
    assert_sums(got, want)
    assert torch.equal(got, E.segment_gram(s.flat["a"], s.flat["b"], s.bounds))
    s.check("a", "b")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_axpby_list(dtype):
    s = Sides(dtype)
    s.add("y", 33)
    s.add("x", 34)
    for call in range(3):                               # the state (y) carried from call to call
        alpha = _rand(len(SHAPES), R.maths_dtype(dtype), "cpu", 35 + call)
        beta = _rand(len(SHAPES), R.maths_dtype(dtype), "cpu", 37 + call)
        alpha[0] = 1.0
        got = E.segment_axpby_list(s.lst["y"], s.lst["x"], alpha, beta)
        want = torch.cat([R.segment_axpby(s.per_tensor("y", i), s.per_tensor("x", i), alpha[i:i + 1],
                                          beta[i:i + 1], [0, n]) for i, n in enumerate(s.numels)])
        flat = E.segment_axpby(s.flat["y"], s.flat["x"], alpha, beta, s.bounds)
        s.check("y", "x")
        assert_sums(got, want)
        assert torch.equal(got, flat)


# -- perturb, restore, reuse -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
@pytest.mark.parametrize("keep", [False, True])
def test_perturb_list(dtype, adaptive, eta, keep):
    s = Sides(dtype)
    s.add("p", 3)
    s.add("g", 4)
    s.add("backup", 5)
    s.add("keep", 6)
    keep_name = "keep" if keep else None
    scale = torch.tensor(0.037, dtype=R.maths_dtype(dtype))
    for _ in range(3):
        E.perturb_list(s.lst["p"], s.lst["g"], scale, s.lst["backup"], adaptive, s.get(keep_name)[0], eta)
        for i in range(len(SHAPES)):
            R.perturb(s.per_tensor("p", i), s.per_tensor("g", i), scale, s.per_tensor("backup", i), adaptive,
                      s.per_tensor(keep_name, i), eta)
        E.perturb(s.flat["p"], s.flat["g"], scale, s.flat["backup"], adaptive, s.get(keep_name)[2], eta)
        s.check("p", "g", "backup", "keep")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_psf", [True, False])
def test_restore_psf_stats_list(dtype, with_psf):
    s = Sides(dtype)
    for k, name in enumerate(("p", "backup", "gs", "psf")):
        s.add(name, 7 + k)
    psf = "psf" if with_psf else None
    for stat_first in STAT_FIRSTS:                      # consecutive calls: psf carried
        got = E.restore_psf_stats_list(s.lst["p"], s.lst["backup"], s.lst["gs"], s.get(psf)[0], stat_first)
        rows = [R.restore_psf_stats(s.per_tensor("p", i), s.per_tensor("backup", i), s.per_tensor("gs", i),
                                    s.per_tensor(psf, i), s.stat_range(i, stat_first)) for i in range(len(SHAPES))]
        flat = E.restore_psf_stats(s.flat["p"], s.flat["backup"], s.flat["gs"], s.get(psf)[2],
                                   s.stat_start(stat_first))
        s.check("p", "backup", "gs", "psf")
        if not with_psf:
            assert got is None and flat is None
            continue
        assert_sums(got, _sum_rows(rows, dtype))
        assert_sums(got, flat)
        if stat_first == len(SHAPES):
            assert got.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reuse_list(dtype):
    s = Sides(dtype)
    s.add("g", 9)
    s.add("psf", 10)
    for a in (1, 2, 3):
        E.reuse_list(s.lst["g"], s.lst["psf"], 0.7 ** a)
        for i in range(len(SHAPES)):
            R.reuse(s.per_tensor("g", i), s.per_tensor("psf", i), 0.7 ** a)
        E.reuse(s.flat["g"], s.flat["psf"], 0.7 ** a)
        s.check("g", "psf")


# -- the fused steps ---------------------------------------------------------------------------------
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


def _check_stats(got, rows, flat, dtype):
    assert (got is None) == (flat is None)
    if flat is not None:
        assert_sums(got, _sum_rows(rows, dtype))
        assert_sums(got, flat)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", range(len(SGD_CONFIGS)))
def test_sgd_step_list(dtype, mode, cfg):
    hp = SGD_CONFIGS[cfg]
    s = Sides(dtype)
    s.add("p", 11)
    buf = None
    if hp["momentum"]:
        s.add("buf", 0, zeros=True)
        buf = "buf"
    for step, stat_first in enumerate(STAT_FIRSTS):     # state carried; `first` on the first call
        s.add("g", 20 + step)
        psf, backup = _fresh_mode_inputs(s, mode, 30 + 3 * step)
        tail = (0.1, hp["weight_decay"], hp["momentum"], hp["dampening"], hp["nesterov"], hp["maximize"], step == 0)
        coeff = 0.7 ** (step + 1)
        got = E.sgd_step_list(s.lst["p"], s.lst["g"], s.get(buf)[0], s.get(psf)[0], s.get(backup)[0], coeff,
                              stat_first, *tail)
        rows = [R.sgd_step(s.per_tensor("p", i), s.per_tensor("g", i), s.per_tensor(buf, i), s.per_tensor(psf, i),
                           s.per_tensor(backup, i), coeff, s.stat_range(i, stat_first), *tail)
                for i in range(len(SHAPES))]
        flat = E.sgd_step(s.flat["p"], s.flat["g"], s.get(buf)[2], s.get(psf)[2], s.get(backup)[2], coeff,
                          s.stat_start(stat_first), *tail)
        s.check(*[n for n in ("p", "g", buf, psf, backup) if n])
        _check_stats(got, rows, flat, dtype)
        assert (got is not None) == (mode == "restore_psf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", range(len(ADAMW_CONFIGS)))
def test_adamw_step_list(dtype, mode, cfg):
    hp = ADAMW_CONFIGS[cfg]
    s = Sides(dtype)
    s.add("p", 12)
    s.add("m", 0, zeros=True)
    s.add("v", 0, zeros=True)
    for step, stat_first in enumerate(STAT_FIRSTS, start=1):
        s.add("g", 40 + step)
        psf, backup = _fresh_mode_inputs(s, mode, 50 + 3 * step)
        coeff = 0.7 ** step
        tail = (3e-3, hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], step, hp["maximize"])
        got = E.adamw_step_list(s.lst["p"], s.lst["g"], s.lst["m"], s.lst["v"], s.get(psf)[0], s.get(backup)[0],
                                coeff, stat_first, *tail)
        rows = [R.adamw_step(s.per_tensor("p", i), s.per_tensor("g", i), s.per_tensor("m", i),
                             s.per_tensor("v", i), s.per_tensor(psf, i), s.per_tensor(backup, i), coeff,
                             s.stat_range(i, stat_first), *tail) for i in range(len(SHAPES))]
        flat = E.adamw_step(s.flat["p"], s.flat["g"], s.flat["m"], s.flat["v"], s.get(psf)[2], s.get(backup)[2],
                            coeff, s.stat_start(stat_first), *tail)
        s.check(*[n for n in ("p", "g", "m", "v", psf, backup) if n])
        _check_stats(got, rows, flat, dtype)


def test_many_small_tensors_share_jobs():
    """300 tensors, most far below a chunk (grouped into shared jobs), a few past it: the same
    bits as per tensor, and the same sums with 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(0, 3000, (300,), generator=g)]
    shapes[50], shapes[200] = (100_000,), (40, 1000)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            s = Sides(torch.float32, shapes)
            for k, name in enumerate(("p", "g", "buf", "psf", "backup")):
                s.add(name, 60 + k)
            got = E.sgd_step_list(s.lst["p"], s.lst["g"], s.lst["buf"], s.lst["psf"], s.lst["backup"], 0.0, 290,
                                  0.1, 1e-4, 0.9, 0.0, False, False, False)
            rows = [R.sgd_step(*[s.per_tensor(n, i) for n in ("p", "g", "buf", "psf", "backup")], 0.0,
                               s.stat_range(i, 290), 0.1, 1e-4, 0.9, 0.0, False, False, False)
                    for i in range(len(shapes))]
            flat = E.sgd_step(*[s.flat[n] for n in ("p", "g", "buf", "psf", "backup")], 0.0, s.stat_start(290),
                              0.1, 1e-4, 0.9, 0.0, False, False, False)
            s.check("p", "buf", "psf")
            _check_stats(got, rows, flat, torch.float32)
            sums = E.segment_sumsq_list(s.lst["g"], s.lst["p"], 0.01)
            assert torch.equal(sums, E.segment_sumsq(s.flat["g"], s.bounds, s.flat["p"], 0.01))
            results.append((got, sums, *s.lst["p"]))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_lists():
    md = torch.float32
    assert E.segment_sumsq_list([]).shape == (0,) and E.segment_sumsq_list([], []).shape == (0,)
    assert E.segment_gram_list([], []).shape == (0, 3)
    assert E.segment_axpby_list([], [], torch.zeros(0, dtype=md), torch.zeros(0, dtype=md)).shape == (0,)
    assert E.perturb_list([], [], torch.tensor(0.5), [], True, []) is None
    assert E.reuse_list([], [], 0.5) is None
    # the statistics of no elements, (0, 0) in fp32, when the call asks for them (as the flat op's of
    # an empty buffer); else none
    zeros = torch.zeros(2)
    assert torch.equal(E.restore_psf_stats_list([], [], [], [], 0), zeros)
    assert E.restore_psf_stats_list([], [], [], None, 0) is None
    assert torch.equal(E.sgd_step_list([], [], [], [], [], 0.0, 0, 0.1, 0.0, 0.9, 0.0, False, False, True), zeros)
    assert E.sgd_step_list([], [], [], [], None, 0.7, 0, 0.1, 0.0, 0.9, 0.0, False, False, True) is None
    assert torch.equal(E.adamw_step_list([], [], [], [], [], [], 0.0, 0, 0.1, 0.9, 0.99, 1e-8, 0.0, 1, False), zeros)
    assert E.adamw_step_list([], [], [], [], None, [], 0.0, 0, 0.1, 0.9, 0.99, 1e-8, 0.0, 1, False) is None
    # the ops themselves, where a tensor argument (scale, alpha) lets the dispatcher choose the kernel
    assert torch.ops.vsam_ext.perturb_list([], [], torch.tensor(0.5), [], False, None, 0.0) is None
    assert torch.ops.vsam_ext.segment_axpby_list([], [], torch.zeros(0), torch.zeros(0)).shape == (0,)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        E.sgd_step_list([], [], None, None, None, 0.0, 0, 0.1, 0.0, 0.9, 0.0, False, False, True)
    with pytest.raises(RuntimeError, match="step"):
        E.adamw_step_list([], [], [], [], None, None, 0.0, 0, 0.1, 0.9, 0.99, 1e-8, 0.0, 0, False)


# -- argument checks -------------------------------------------------------------------------------
ERR_SHAPES = [(5,), (2, 3), (4,)]


def _valid_call(op):
    """Keyword arguments of a valid call of ``op`` (fp32, ERR_SHAPES)."""
    def mk(seed):
        return [_rand(math.prod(sh), torch.float32, "cpu", seed + i).view(sh) for i, sh in enumerate(ERR_SHAPES)]
    coeffs = torch.tensor([0.5, 1.0, 2.0])
    return {
        "segment_sumsq_list": lambda: dict(xs=mk(1), weights=mk(2), eta=0.1),
        "segment_gram_list": lambda: dict(a=mk(1), b=mk(2)),
        "segment_axpby_list": lambda: dict(ys=mk(1), xs=mk(2), alpha=coeffs.clone(), beta=coeffs.clone()),
        "perturb_list": lambda: dict(params=mk(1), grads=mk(2), scale=torch.tensor(0.1), backups=mk(3),
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
    if how == "scalar_dtype":
        return value.double()
    if how == "scalar_count":
        return torch.stack([value, value]).reshape(-1)
    value = list(value)
    if how == "numel":
        value[1] = torch.zeros(value[1].numel() + 1)
    elif how == "dtype":
        value[1] = value[1].double()
    elif how == "noncontiguous":                         # same numel and shape as ERR_SHAPES[1], strided
        value[1] = torch.zeros(3, 2).t()
    return value


ERRORS = [  # (op, argument, mutation, the C++ name the message starts with)
    ("sgd_step_list", "grads", "length", "grad: expected 3 tensors"),
    ("sgd_step_list", "momentum_buffers", "numel", "momentum_buffer[1]: expected 6 elements"),
    ("sgd_step_list", "psfs", "dtype", "psf[1]: expected dtype Float"),
    ("sgd_step_list", "backups", "noncontiguous", "backup[1]: expected a contiguous tensor"),
    ("sgd_step_list", "params", "dtype", "param[1]: expected dtype Float"),
    ("sgd_step_list", "params", "noncontiguous", "param[1]: expected a contiguous tensor"),
    ("adamw_step_list", "exp_avg_sqs", "length", "exp_avg_sq: expected 3 tensors"),
    ("adamw_step_list", "exp_avgs", "noncontiguous", "exp_avg[1]: expected a contiguous"),
    ("adamw_step_list", "psfs", "numel", "psf[1]: expected 6 elements"),
    ("perturb_list", "grad_keeps", "numel", "grad_keep[1]: expected 6 elements"),
    ("perturb_list", "backups", "dtype", "backup[1]: expected dtype"),
    ("perturb_list", "scale", "scalar_dtype", "scale: expected dtype Float"),
    ("perturb_list", "scale", "scalar_count", "scale: expected 1 value"),
    ("restore_psf_stats_list", "grad_sams", "length", "grad_sam: expected 3 tensors"),
    ("restore_psf_stats_list", "psfs", "noncontiguous", "psf[1]: expected a contiguous"),
    ("reuse_list", "psfs", "numel", "psf[1]: expected 6 elements"),
    ("segment_sumsq_list", "weights", "dtype", "weight[1]: expected dtype"),
    ("segment_gram_list", "b", "length", "b: expected 3 tensors"),
    ("segment_axpby_list", "xs", "noncontiguous", "x[1]: expected a contiguous"),
    ("segment_axpby_list", "alpha", "scalar_count", "alpha: expected 3 value"),
    ("segment_axpby_list", "beta", "scalar_dtype", "beta: expected dtype Float"),
]


def _tensors(kwargs):
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, list):
            yield from v


@pytest.mark.parametrize("op,arg,how,message", ERRORS, ids=[f"{e[0]}-{e[1]}-{e[2]}" for e in ERRORS])
def test_bad_arguments_name_the_argument_and_write_nothing(op, arg, how, message):
    kwargs = _valid_call(op)
    kwargs[arg] = _mutate(kwargs[arg], how)
    before = [t.clone() for t in _tensors(kwargs)]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        getattr(E, op)(**kwargs)
    for t, b in zip(_tensors(kwargs), before):
        assert torch.equal(t, b)


def test_momentum_needs_buffers():
    kwargs = _valid_call("sgd_step_list")
    kwargs["momentum_buffers"] = None
    with pytest.raises(RuntimeError, match="momentum_buffer: required"):
        E.sgd_step_list(**kwargs)
