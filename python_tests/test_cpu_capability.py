"""The cpu backend's instruction sets give the same bits (csrc/cpu_kernels.h).

The C++ kernels are compiled twice, for the compiler's baseline ("default") and for AVX2 + F16C
("avx2", chosen at run time where the CPU has both); ALGORITHMS.md ("Precision of the scalars")
allows wider vectors only if nothing else changes. Every op, flat and list form, in the four
dtypes, over odd sizes and several pieces, with every SGD/AdamW configuration and front mode,
runs once per set from the same inputs: every output and every buffer it writes must be
bit-identical, sums included (the same fixed order). Inputs with infinities, NaNs, subnormals
and values beyond fp16's range too, where a NaN may differ in its payload only (F16C converts a
NaN keeping its payload, c10::Half's software conversion makes it canonical).
"""
import pytest
import torch

from vsam_ext.ops import available_backends
from test_ops import DTYPES, _rand

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu extension not built")
if "cpu" in available_backends():
    from vsam_ext.ops import extension as E

    def _sets():
        capability = torch.ops.vsam_ext.cpu_capability
        before = capability()
        try:
            capability("avx2")
            return ["default", "avx2"]
        except RuntimeError:
            return ["default"]
        finally:
            capability(before)
    SETS = _sets()
else:
    SETS = []

SIZES = [1, 7, 33_000, 70_001]          # one element, a tail, one piece and a tail, three pieces
LIST_SHAPES = [(33_000,), (0,), (1,), (12, 5), (7,), (70_001,), (2, 3, 3, 3)]
SGD_CONFIGS = [(0.0, 0.0, 0.0, False, False), (5e-4, 0.9, 0.0, False, False), (1e-2, 0.9, 0.1, False, True),
               (5e-4, 0.9, 0.0, True, False)]          # weight_decay, momentum, dampening, nesterov, maximize
ADAMW_CONFIGS = [(0.9, 0.999, 1e-8, 1e-2, False), (0.8, 0.95, 1e-6, 0.0, True)]


def _special(n, dtype, seed):
    """Random values with infinities, NaNs, subnormals and values past fp16's range mixed in."""
    x = _rand(n, torch.float64, "cpu", seed) * 10
    picks = torch.Generator().manual_seed(seed + 1000)
    where = torch.randint(0, 8, (n,), generator=picks)
    x[where == 0] = float("inf")
    x[where == 1] = float("nan")
    x[where == 2] = 1e-41 if dtype != torch.float64 else 1e-310
    x[where == 3] = 7e4
    return x.to(dtype)


class Inputs:
    """Fresh copies of the same numbers for every run: flat buffers and lists of LIST_SHAPES."""

    def __init__(self, dtype, special):
        self.dtype, self.special = dtype, special

    def flat(self, n, seed, positive=False):
        if self.special and not positive:
            return _special(n, self.dtype, seed)
        return _rand(n, self.dtype, "cpu", seed, positive)

    def lst(self, seed, positive=False):
        return [self.flat(max(1, torch.Size(s).numel()), seed + i, positive)[:torch.Size(s).numel()].view(s).clone()
                for i, s in enumerate(LIST_SHAPES)]


def _maths(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _battery(dtype, special):
    """Every op once per configuration; returns every tensor that was returned or written."""
    inp, acc, out = Inputs(dtype, special), _maths(dtype), []
    for n in SIZES:
        x, w, y = inp.flat(n, 1), inp.flat(n, 2, positive=True), inp.flat(n, 3)
        bounds = [0, n // 3, n // 3, n]
        out += [E.segment_sumsq(x, bounds), E.segment_sumsq(x, bounds, w, 0.01), E.segment_gram(x, y, bounds)]
        out += [E.segment_axpby(y, x, torch.tensor([0.5, 1.0, -2.0], dtype=acc),
                                torch.tensor([1.5, 0.25, 3.0], dtype=acc), bounds), y]
        for adaptive in (False, True):
            p, g, keep, backup = inp.flat(n, 4), inp.flat(n, 5), torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            E.perturb(p, g, torch.tensor(0.05, dtype=acc), backup, adaptive, keep, 0.01)
            out += [p, backup, keep]
        g, psf = inp.flat(n, 6), inp.flat(n, 7)
        E.reuse(g, psf, 0.3)
        out.append(g)
        p, backup, gs, psf = inp.flat(n, 8), inp.flat(n, 9), inp.flat(n, 10), inp.flat(n, 11)
        out += [E.restore_psf_stats(p, backup, gs, psf, n // 2), p, psf]
        for mode in ("plain", "reuse", "restore", "restore_psf"):
            psf = inp.flat(n, 12) if mode != "plain" and mode != "restore" else None
            backup = inp.flat(n, 13) if mode.startswith("restore") else None
            coeff = 0.25 if mode == "reuse" else 0.0
            for k, (wd, mom, damp, nesterov, maximize) in enumerate(SGD_CONFIGS):
                p, g, m = inp.flat(n, 14), inp.flat(n, 15), inp.flat(n, 16)
                for first in (True, False):
                    out.append(E.sgd_step(p, g, m if mom else None, psf, backup, coeff, n // 3, 0.1, wd, mom, damp,
                                          nesterov, maximize, first))
                out += [p, m] + ([psf] if psf is not None else [])
            for beta1, beta2, eps, wd, maximize in ADAMW_CONFIGS:
                p, g, m, v = inp.flat(n, 17), inp.flat(n, 18), inp.flat(n, 19), inp.flat(n, 20, positive=True)
                for step in (1, 2):
                    out.append(E.adamw_step(p, g, m, v, psf, backup, coeff, n // 3, 1e-3, beta1, beta2, eps, wd, step,
                                            maximize))
                out += [p, m, v]
    # the list forms
    xs, ys = inp.lst(30), inp.lst(31)
    out += [E.segment_sumsq_list(xs), E.segment_sumsq_list(xs, inp.lst(32, positive=True), 0.01),
            E.segment_gram_list(xs, ys)]
    out += [E.segment_axpby_list(ys, xs, torch.linspace(-1, 1, len(xs), dtype=acc),
                                 torch.linspace(2, 0, len(xs), dtype=acc))] + ys
    p, g, backup, keep = inp.lst(33), inp.lst(34), inp.lst(35), inp.lst(36)
    E.perturb_list(p, g, torch.tensor(0.05, dtype=acc), backup, True, keep, 0.01)
    out += p + backup + keep
    p, backup, gs, psf = inp.lst(37), inp.lst(38), inp.lst(39), inp.lst(40)
    out += [E.restore_psf_stats_list(p, backup, gs, psf, 3)] + p + psf
    p, g, m, psf, backup = inp.lst(41), inp.lst(42), inp.lst(43), inp.lst(44), inp.lst(45)
    out += [E.sgd_step_list(p, g, m, psf, backup, 0.0, 2, 0.1, 5e-4, 0.9, 0.0, True, False, False)] + p + m + psf
    p, g, m, v = inp.lst(46), inp.lst(47), inp.lst(48), inp.lst(49, positive=True)
    out += [E.adamw_step_list(p, g, m, v, None, None, 0.0, 0, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3, False)] + p + m + v
    return [t for t in out if t is not None]


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


@pytest.fixture
def restore_capability():
    before = torch.ops.vsam_ext.cpu_capability()
    yield
    torch.ops.vsam_ext.cpu_capability(before)


@pytest.mark.skipif(len(SETS) < 2, reason="this CPU has one instruction set for the kernels")
@pytest.mark.parametrize("special", [False, True], ids=["random", "special-values"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_instruction_set_gives_the_same_bits(dtype, special, restore_capability):
    runs = {}
    for name in SETS:
        assert torch.ops.vsam_ext.cpu_capability(name) == name
        runs[name] = _battery(dtype, special)
    base, *others = SETS
    for other in others:
        assert len(runs[base]) == len(runs[other])
        for k, (a, b) in enumerate(zip(runs[base], runs[other])):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            nan = a.isnan()
            assert torch.equal(nan, b.isnan()), f"output {k}: NaNs in other places ({base} vs {other})"
            same = _bits(a) == _bits(b)
            assert bool((same | nan).all()), f"output {k}: {int((~same & ~nan).sum())} values differ ({base} vs {other})"


def test_the_instruction_set_is_chosen_and_named(restore_capability):
    capability = torch.ops.vsam_ext.cpu_capability
    assert capability() in SETS
    with pytest.raises(RuntimeError, match=r"cpu capability: expected one of .*'default'.*got 'sse9'"):
        capability("sse9")
    assert capability() in SETS                      # a refused name changes nothing
    assert capability("default") == "default"


def test_the_environment_variable_forces_the_baseline():
    import subprocess
    import sys
    code = ("import torch, vsam_ext.ops.extension as E; E.segment_sumsq(torch.ones(3), [0, 3]); "
            "print(torch.ops.vsam_ext.cpu_capability())")
    env = dict(__import__("os").environ, VSAM_EXT_CPU_CAPABILITY="default")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert got.strip() == "default"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("set_name", SETS)
def test_every_16_bit_value_converts_as_torch_converts_it(dtype, set_name, restore_capability):
    """The kernels convert half and bfloat16 themselves (cpu_kernels_body.h: load, store). All
    65536 bit patterns, read and written back (scale 0) and rounded after an addition (p + 0.5 *
    g), against the reference backend (torch's own conversions)."""
    from vsam_ext.ops import reference as R
    torch.ops.vsam_ext.cpu_capability(set_name)
    values = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    for scale, grad in ((0.0, 0.0), (0.5, 1.0), (0.5, -3.0e-5)):
        got_p, want_p = values.clone(), values.clone()
        g = torch.full_like(values, grad)
        got_b, want_b = torch.empty_like(values), torch.empty_like(values)
        E.perturb(got_p, g, torch.tensor(scale), got_b, False, None, 0.0)
        R.perturb(want_p, g, torch.tensor(scale), want_b, False, None, 0.0)
        assert torch.equal(_bits(got_b), _bits(values)), "the backup is not the parameter's bits"
        nan = want_p.isnan()
        assert torch.equal(got_p.isnan(), nan)
        assert torch.equal(_bits(got_p)[~nan], _bits(want_p)[~nan]), f"scale {scale}, grad {grad}"
