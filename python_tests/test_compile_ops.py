"""torch.compile and the ``vsam_ext`` ops (issue 15 item 5).

* Every op of ``csrc/registration.cpp`` but ``own_storage_alias`` has a fake kernel
  (``vsam_ext/ops/fake.py``), and ``torch.library.opcheck`` passes on each with real inputs: its
  schema (the mutated arguments), the fake kernel's shapes, dtypes and devices against the C++
  kernel's outputs, and a run through AOT dispatch with dynamic shapes.
* ``torch.compile(fn, fullgraph=True)`` of functions that call the ops (the public wrappers of
  ``vsam_ext.ops.extension``) traces them without a graph break (fullgraph raises at one) and
  gives the eager call's bits, with the ``eager``, ``aot_eager`` and ``inductor`` backends.
* A compiled training step (the two-call form inside ``torch.compile``) trains bit for bit as
  the eager one; its graph breaks are at ``backward()`` and at the optimizer's ``first_step`` /
  ``second_step`` (host code, ``torch.compiler.disable`` on purpose), not at the ops. In the
  closure form nothing inside ``opt.step(closure)`` is compiled (the README says: compile the
  model itself).
"""
import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx
from vsam_ext.ops import available_backends
from helpers import batch, make_mlp

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="cpu extension not built")
if "cpu" in available_backends():
    from vsam_ext.ops import extension as E, fake

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
N = 40_001                                   # two pieces of the CPU kernels (2^15 each) and a tail
BOUNDS = [0, 1, 17, 17, 1000, N]             # odd segments, one of them empty
SHAPES = [(5,), (0,), (3, 4), (1,), (2, 3, 3)]
SGD = dict(lr=0.1, weight_decay=1e-3, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled frames and their fake tensors do not outlive a test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- inputs ----------------------------------------------------------------------------------------
class Draw:
    """Random tensors of one dtype, the same numbers for the same seed."""

    def __init__(self, dtype, seed=0):
        self.dtype = dtype
        self.maths = torch.float64 if dtype == torch.float64 else torch.float32
        self.gen = torch.Generator().manual_seed(seed)

    def flat(self, n=N):
        return torch.randn(n, generator=self.gen, dtype=torch.float64).to(self.dtype)

    def many(self, shapes=SHAPES):
        return [torch.randn(s, generator=self.gen, dtype=torch.float64).to(self.dtype) for s in shapes]

    def coeffs(self, n):
        return (torch.rand(n, generator=self.gen, dtype=torch.float64) + 0.5).to(self.maths)

    def scale(self):
        return torch.tensor(0.05, dtype=self.maths)


def cases(dtype):
    """``(op name, args)`` for every op (flat and list), in the arguments' order of both
    ``torch.ops.vsam_ext.<op>`` and ``extension.<op>``, with the variants whose outputs differ:
    with and without weights, ASAM, statistics or none, momentum or none, a reuse."""
    d = Draw(dtype)
    f, m = d.flat, d.many
    nseg, nl = len(BOUNDS) - 1, len(SHAPES)
    sgd = list(SGD.values())
    return [
        ("segment_sumsq", (f(), BOUNDS, None, 0.0)),
        ("segment_sumsq", (f(), BOUNDS, f(), 0.01)),
        ("segment_gram", (f(), f(), BOUNDS)),
        ("segment_axpby", (f(), f(), d.coeffs(nseg), d.coeffs(nseg), BOUNDS)),
        ("perturb", (f(), f(), d.scale(), f(), False, None, 0.0)),
        ("perturb", (f(), f(), d.scale(), f(), True, f(), 0.01)),
        ("restore_psf_stats", (f(), f(), f(), f(), 7)),
        ("restore_psf_stats", (f(), f(), f(), None, 0)),
        ("reuse", (f(), f(), 0.3)),
        ("sgd_step", (f(), f(), f(), f(), f(), 0.0, 5, *sgd, False)),             # restore + PSF: stats
        ("sgd_step", (f(), f(), None, None, None, 0.0, N, 0.1, 0.0, 0.0, 0.0, True, True, True)),  # plain
        ("sgd_step", (f(), f(), f(), f(), None, 0.25, 0, *sgd, True)),             # reuse
        ("adamw_step", (f(), f(), f(), f().abs(), f(), f(), 0.0, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3, False)),
        ("adamw_step", (f(), f(), f(), f().abs(), f(), None, 0.5, 0, 1e-3, 0.8, 0.95, 1e-6, 0.0, 1, True)),
        ("segment_sumsq_list", (m(), None, 0.0)),
        ("segment_sumsq_list", (m(), m(), 0.01)),
        ("segment_gram_list", (m(), m())),
        ("segment_axpby_list", (m(), m(), d.coeffs(nl), d.coeffs(nl))),
        ("perturb_list", (m(), m(), d.scale(), m(), False, None, 0.0)),
        ("perturb_list", (m(), m(), d.scale(), m(), True, m(), 0.01)),
        ("restore_psf_stats_list", (m(), m(), m(), m(), 2)),
        ("restore_psf_stats_list", (m(), m(), m(), None, 0)),
        ("reuse_list", (m(), m(), 0.3)),
        ("sgd_step_list", (m(), m(), m(), m(), m(), 0.0, 1, *sgd, False)),
        ("sgd_step_list", (m(), m(), None, None, None, 0.0, nl, 0.1, 0.0, 0.0, 0.0, False, False, True)),
        ("adamw_step_list", (m(), m(), m(), [t.abs() for t in m()], m(), m(), 0.0, 3, 1e-3, 0.9, 0.999, 1e-8,
                             1e-2, 4, False)),
        ("adamw_step_list", (m(), m(), m(), [t.abs() for t in m()], None, None, 0.0, 0, 1e-3, 0.9, 0.999, 1e-8,
                             0.0, 1, False)),
        # empty lists: alpha is the one tensor the dispatcher sees
        ("segment_axpby_list", ([], [], d.coeffs(0), d.coeffs(0))),
    ]


def _assert_bits(got, want):
    """The same structure, None where the other has None, and bit-identical tensors (dtype,
    shape and device too)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), (got, want)
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device)
        assert torch.equal(got, want)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_bits(a, b)
    else:
        assert got == want


# -- every op has a fake kernel ----------------------------------------------------------------
def _registered_ops():
    text = open(os.path.join(REPO, "csrc", "registration.cpp")).read()
    return re.findall(r'm\.def\("(\w+)\(', text)


def test_every_registered_op_but_the_alias_has_a_fake_kernel():
    ops = _registered_ops()
    assert len(ops) == 17 and "own_storage_alias" in ops
    has_fake = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"vsam_ext::{op}", "Meta") for op in ops}
    assert sorted(op for op, yes in has_fake.items() if yes) == sorted(fake.FAKE_OPS)
    assert sorted(fake.FAKE_OPS) == sorted(op for op in ops if op != "own_storage_alias")
    assert {name for name, _ in cases(torch.float32)} == set(fake.FAKE_OPS)      # every op is tested below


def test_the_alias_op_stays_untraceable():
    """own_storage_alias hides an alias from its schema: compiling a call must fail, loudly."""
    flat = torch.randn(10)
    with pytest.raises(Exception, match="data pointer"):
        torch.compile(lambda x: torch.ops.vsam_ext.own_storage_alias(x, 2, [3], [1]) * 2,
                      fullgraph=True, backend="eager")(flat)


# -- opcheck -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_opcheck(dtype):
    """opcheck on every case: schema (what is mutated), fake vs real outputs, AOT dispatch with
    dynamic shapes (fp32 only: it costs seconds per dtype, and what it checks, the
    functionalization of the mutations, does not depend on the dtype; the other dtypes go
    through AOT dispatch in the compiled tests below)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if dtype == torch.float32:
        utils += ("test_aot_dispatch_dynamic",)
    for i, (name, args) in enumerate(cases(dtype)):
        try:
            torch.library.opcheck(getattr(torch.ops.vsam_ext, name).default, args, test_utils=utils)
        except Exception as exc:
            raise AssertionError(f"case {i}: {name}: {exc}") from exc


def test_the_fake_kernels_give_what_the_kernels_return():
    """The fake outputs' metadata equal the real outputs', for every case and dtype (opcheck
    checks this too, on fewer dtypes); ops with nothing to return give None."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for dtype in DTYPES:
        for name, args in cases(dtype):
            op = getattr(torch.ops.vsam_ext, name)
            real = op(*copy.deepcopy(args))
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                             [mode.from_tensor(t) for t in a] if isinstance(a, list) and a and
                             isinstance(a[0], torch.Tensor) else a for a in args]
                out = op(*fake_args)
            if real is None:
                assert out is None, name
                continue
            assert (out.shape, out.dtype, out.device) == (real.shape, real.dtype, real.device), (name, dtype)


# -- compiled calls, bit for bit -----------------------------------------------------------------
def _all_ops(calls):
    """One call of each (function, args); what each returned."""
    return [fn(*args) for fn, args in calls]


def _compiled_vs_eager(fn, args, backend):
    """``fn`` compiled with fullgraph=True (a graph break raises) and called on copies of
    ``args``, and ``fn`` called eagerly on other copies: (compiled, eager) (outputs, args)."""
    compiled_args, eager_args = copy.deepcopy(args), copy.deepcopy(args)
    got = torch.compile(fn, fullgraph=True, backend=backend)(*compiled_args)
    want = fn(*eager_args)
    return (got, compiled_args), (want, eager_args)


@pytest.mark.parametrize("backend,dtype", [("eager", torch.bfloat16), ("aot_eager", torch.float32),
                                           ("aot_eager", torch.float64)],
                         ids=["eager-bfloat16", "aot_eager-float32", "aot_eager-float64"])
def test_every_op_compiles_in_one_graph_with_the_eager_bits(backend, dtype):
    """All the ops' public wrappers in one function, one graph: outputs (or None) and every
    buffer they wrote bit-identical to eager calls."""
    calls = [(getattr(E, name), args) for name, args in cases(dtype)] + [   # empty lists: the wrappers answer
        (E.segment_sumsq_list, ([],)), (E.segment_gram_list, ([], [])), (E.reuse_list, ([], [], 0.5)),
        (E.restore_psf_stats_list, ([], [], [], [], 0)), (E.restore_psf_stats_list, ([], [], [], None, 0)),
        (E.sgd_step_list, ([], [], None, [], [], 0.0, 0, 0.1, 0.0, 0.0, 0.0, False, False, True)),
        (E.adamw_step_list, ([], [], [], [], None, None, 0.0, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False))]
    (got, got_args), (want, want_args) = _compiled_vs_eager(lambda c: _all_ops(c), (calls,), backend)
    assert [g is None for g in got] == [w is None for w in want]
    _assert_bits(got, want)
    _assert_bits(got_args, want_args)


def _sam_step(param, grad, mbuf, psf, backup, bounds, rho, grad_second):
    """A SAM step over flat buffers, ops and torch maths mixed, each op reading what the one
    before wrote: norm -> scale -> perturb -> "second gradient" at w + e -> fused restore + PSF +
    SGD step with the statistics."""
    norm = E.segment_sumsq(grad, bounds).sum().sqrt()
    scale = (rho / (norm + 1e-12)).to(norm.dtype)
    E.perturb(param, grad, scale, backup, False, psf, 0.0)
    grad.copy_(param * grad_second)
    stats = E.sgd_step(param, grad, mbuf, psf, backup, 0.0, 3, **SGD, first=False)
    return stats, E.segment_gram(param, grad, bounds)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_a_chain_of_ops_and_torch_maths_compiles_with_the_eager_bits(dtype):
    d = Draw(dtype, seed=1)
    args = (d.flat(), d.flat(), d.flat(), d.flat(), d.flat(), BOUNDS, 0.05, 0.5)
    for backend in ("eager", "aot_eager"):
        (got, got_args), (want, want_args) = _compiled_vs_eager(_sam_step, args, backend)
        _assert_bits(got, want)
        _assert_bits(got_args, want_args)


def test_inductor_runs_the_ops_in_place_with_the_eager_bits():
    """Inductor (C++ codegen on this CPU) on the ops alone: it must keep every mutation (write
    back or re-inplace the functionalized calls). Few ops and one dtype: an Inductor compile
    costs seconds."""
    d = Draw(torch.float32, seed=2)
    nseg = len(BOUNDS) - 1

    def step(p, g, mbuf, psf, backup, scale, alpha, beta, ps, gs, ms):
        E.perturb(p, g, scale, backup, True, psf, 0.01)
        stats = E.sgd_step(p, g, mbuf, psf, backup, 0.0, 5, **SGD, first=False)
        E.sgd_step_list(ps, gs, ms, None, None, 0.0, 0, **SGD, first=False)
        return stats, E.segment_axpby(g, psf, alpha, beta, BOUNDS), E.segment_sumsq_list(ps)

    args = (d.flat(), d.flat(), d.flat(), d.flat(), d.flat(), d.scale(), d.coeffs(nseg), d.coeffs(nseg),
            d.many(), d.many(), d.many())
    (got, got_args), (want, want_args) = _compiled_vs_eager(step, args, "inductor")
    _assert_bits(got, want)
    _assert_bits(got_args, want_args)


# -- a compiled training step --------------------------------------------------------------------------
def test_a_compiled_training_step_trains_as_the_eager_one_and_breaks_only_at_the_step():
    """The two-call form inside torch.compile (aot_eager): 16 VSAM steps, SAM and cheap ones,
    bit-identical to eager. The forward is compiled; the graph breaks are at backward() (dynamo
    does not trace it) and at first_step/second_step (host bookkeeping, compiler.disable)."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return aot_eager(gm, example_inputs)

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = make_mlp(dtype=torch.float64)
        opt = vx.VSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, window=4, slices=1,
                      warmup_steps=2, stat_tensors=2)

        def train_step(x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if opt.first_step():
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            return loss.detach()

        step = torch.compile(train_step, backend=backend) if compiled else train_step
        losses, decisions = [], []
        for t in range(16):
            losses.append(step(*batch(t, torch.float64)))
            decisions.append(opt.stats["last_step_sam"])
        runs.append((losses, decisions, [p.detach().clone() for p in model.parameters()]))
        breaks = " ".join(counters["graph_break"])
    (l0, d0, p0), (l1, d1, p1) = runs
    assert d0 == d1 and True in d0 and False in d0
    _assert_bits(l1, l0)
    _assert_bits(p1, p0)
    assert any("linear" in " ".join(g) for g in graphs), "the forward was compiled"
    assert not any("vsam_ext" in " ".join(g) for g in graphs), "the step runs eagerly, outside the graphs"
    assert "backward" in breaks and "first_step" in breaks and "second_step" in breaks, breaks


def test_in_the_closure_form_a_compiled_train_step_compiles_nothing_inside_the_step():
    """What the README says of the closure form: the closure runs inside the disabled step, so
    torch.compile of a function calling opt.step(closure) compiles no forward (compile the model
    itself); the training is the eager one, bit for bit."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_mlp(dtype=torch.float64)
        opt = vx.SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)

        def train_step(x, y):
            return opt.step(lambda: F.cross_entropy(model(x), y).backward())

        step = torch.compile(train_step, backend=backend) if compiled else train_step
        for t in range(3):
            step(*batch(t, torch.float64))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert not any(n.op == "call_module" or "linear" in str(n.target) for g in graphs for n in g.graph.nodes)
    _assert_bits(runs[1], runs[0])
