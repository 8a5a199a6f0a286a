"""The Triton kernels' PTX for an H100/H200 (sm_90), compiled offline, passes .ci/ptx_fma_check.py:
no fma/mad, every float add/sub/mul rounded on its own (``.rn``), no approximate sqrt/div/rcp;
and no flush-to-zero (``.ftz``) float arithmetic, which the CUDA build forbids with -ftz=false.

ALGORITHMS.md asks every backend for the eager reference's bits. The Triton backend launches its
kernels with ``enable_fp_fusion=False`` and uses ``tl.sqrt_rn``/``tl.div_rn`` in fp32 (``tl.sqrt``
and ``/`` in fp64); the interpreter, which runs the kernels on this machine's CPU tensors, cannot
show what the GPU compiler makes of that. So every ``@triton.jit`` kernel of triton_backend.py is
compiled here, without a GPU, by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the whole
pipeline down to the cubin, i.e. ptxas accepts it), for every buffer dtype (fp32, fp64, bf16,
fp16) and the constexpr variants the host wrappers launch, with the wrappers' launch options
(``triton_backend._LAUNCH``) and their GPU block sizes (``BLOCK``, ``RBLOCK``), and the checker's
``offending_lines`` runs on ``kernel.asm["ptx"]``.

The compilation runs in a subprocess with TRITON_INTERPRET unset (conftest sets it when there is
no GPU; the kernels decorated under it are interpreter functions, not ``JITFunction``s), once per
session for all cases, in two forked workers, with a Triton cache in the system temp directory
(its keys hold the kernel source, options and compiler versions, so reruns are cache hits and
edits recompile). On 2 cores: ~20 s cold (more on a loaded machine), ~5 s warm.

Variants: all of them for every kernel except the two fused steps. ``_sgd_kernel`` has 80
launchable variants per dtype (MODE x weight decay x momentum/Nesterov/first step x maximize); by
default 6 are compiled: each MODE with every optional term on (weight decay, momentum, Nesterov,
maximize), plain SGD, and heavy ball on its first step. ``_adamw_kernel``: each MODE maximizing,
and MODE 0 not. So every float operation of each kernel is in some compiled variant, and each
flag is off in one. ``VSAM_TRITON_PTX_FULL=1`` compiles every variant (~650 compilations, ~2 min
cold on 2 cores).

The list ops (``<op>_list``): the segment kernels always read their segments' addresses from the
table; the element-wise kernels do with ``LIST=True``, the same maths after a prologue that
loads the tensor's addresses (int64) and casts them to pointers. Every element-wise kernel is
also compiled with ``LIST=True`` in its every-term variant (the full run: every variant both
ways), and its PTX must load the table's entries (unpredicated 64-bit loads: block -> tensor,
numel, first block and one address per operand).

The mutation check compiles the SGD kernel with ``enable_fp_fusion=True`` (Triton's default
until 3.10) and requires the checker to find ``fma`` there: the test can fail.

Memory accesses (issue 15): a block wholly inside its buffer takes a fast path with 128-bit
loads (``ld.global.v4.b32``, ``v2.b64``), whatever ``n`` and for the list and segment kernels
too, and each kernel has one layout (16 bytes of elements per thread) for both paths and for
its flat and list forms, so its partial sums are the same tree of additions everywhere.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, ".ci", "ptx_fma_check.py")
DTYPES = ("fp32", "fp64", "bf16", "fp16")
# Every kernel launched by triton_backend.py (the child fails when a @triton.jit kernel is
# missing here), and the @triton.jit helpers, which are inlined into them.
KERNELS = ("_segment_partials_kernel", "_segment_reduce_kernel", "_axpby_kernel", "_perturb_kernel",
           "_restore_kernel", "_reuse_kernel", "_sgd_kernel", "_adamw_kernel")
HELPERS = ("_rounded", "_div_rn", "_sqrt_rn", "_psf_stats", "_partials_tile", "_axpby_tile", "_perturb_tile",
           "_restore_tile", "_reuse_tile", "_front_loads", "_front_grad", "_sgd_tile", "_adamw_tile")
# the kernels launched for flat buffers (LIST=False) and for lists of tensors (LIST=True)
ELEMENTWISE = ("_perturb_kernel", "_restore_kernel", "_reuse_kernel", "_sgd_kernel", "_adamw_kernel")
# the least number of table entries (64-bit, unmasked loads) a program of a list variant reads:
# block -> tensor, numel, first block, and one address per operand the constexprs use
TABLE_LOADS = {
    "_segment_partials_kernel": lambda c: 3 + (1 if c["KIND"] == 0 else 2),
    "_axpby_kernel": lambda c: 3 + 2,
    "_perturb_kernel": lambda c: 3 + 3 + c["HAS_KEEP"],
    "_restore_kernel": lambda c: 3 + (4 if c["HAS_PSF"] else 2),
    "_reuse_kernel": lambda c: 3 + 2,
    "_sgd_kernel": lambda c: 3 + 2 + c["MOMENTUM"] + (c["MODE"] in (1, 3)) + (c["MODE"] >= 2),
    "_adamw_kernel": lambda c: 3 + 4 + (c["MODE"] in (1, 3)) + (c["MODE"] >= 2),
}
TARGET_ARCH = 90
CHILD_TIMEOUT_S = 600
MUTANT = ("_sgd_kernel", "fp32")          # compiled with enable_fp_fusion=True: must show fma


def _load_checker():
    spec = importlib.util.spec_from_file_location("ptx_fma_check", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# the child: compiles every variant, checks its PTX, writes a JSON report
# ------------------------------------------------------------------------------------------------

def _variants(tb, full):
    """[(kernel, dtype, pointer dtypes by argument, constexprs)] as the host wrappers launch them.

    Pointer arguments are named here with the tensor the wrapper passes: ``buf`` a buffer of the
    dtype, ``acc`` one of the maths dtype (fp32; fp64 for fp64 buffers), ``i64`` the segment
    table; every other non-constexpr argument is an int (i32) or a Python float (fp32)."""
    import triton.language as tl
    out = []
    for dt in DTYPES:
        acc = "fp64" if dt == "fp64" else "fp32"
        ACC = tl.float64 if dt == "fp64" else tl.float32

        def add(name, ptrs, **constexprs):
            out.append((name, dt, ptrs, constexprs))

        def add_elementwise(name, ptrs, every_term, **constexprs):
            """Flat (``LIST=False``: ``table_ptr`` is a buffer, as launched) and, for the
            every-term variant or in the full run, the list form."""
            for lst in (False, True):
                if lst and not (full or every_term):
                    continue
                add(name, dict(ptrs, table_ptr="i64" if lst else "buf"), LIST=lst, **constexprs)

        seg = dict(table_ptr="i64", part_ptr="acc")
        for kind in (tb._SUMSQ, tb._SUMSQ_T, tb._GRAM):
            add("_segment_partials_kernel", dict(seg, a_ptr="buf", b_ptr="buf"), KIND=kind, ACC=ACC,
                BLOCK=tb.BLOCK)
        for k in (1, 3):        # partials and sums in the maths dtype (same kernel for fp32/16-bit)
            add("_segment_reduce_kernel", dict(seg, out_ptr="acc"), K=k, RBLOCK=tb.RBLOCK)
        add("_axpby_kernel", dict(seg, y_ptr="buf", x_ptr="buf", alpha_ptr="acc", beta_ptr="acc"),
            ACC=ACC, BLOCK=tb.BLOCK)
        for adaptive in (False, True):
            for keep in (False, True):
                add_elementwise("_perturb_kernel", dict(p_ptr="buf", g_ptr="buf", scale_ptr="acc", backup_ptr="buf",
                                                        keep_ptr="buf"),
                                adaptive and keep, ADAPTIVE=adaptive, HAS_KEEP=keep, ACC=ACC, BLOCK=tb.BLOCK)
        for has_psf in (False, True):
            add_elementwise("_restore_kernel", dict(p_ptr="buf", backup_ptr="buf", gs_ptr="buf", psf_ptr="buf",
                                                    part_ptr="acc" if has_psf else "buf"),
                            has_psf, HAS_PSF=has_psf, ACC=ACC, BLOCK=tb.BLOCK)
        # HAS_SCALARS (the ``scalars`` tensor of a captured step, float64): reuse both ways; the
        # fused steps with it in their every-term variants (the full run: every variant both ways)
        for hs in (False, True):
            add_elementwise("_reuse_kernel", dict(g_ptr="buf", psf_ptr="buf", scalars_ptr="f64" if hs else "buf"),
                            True, HAS_SCALARS=hs, ACC=ACC, BLOCK=tb.BLOCK)
        scalars_ways = lambda every: (False, True) if full else (every,)     # noqa: E731

        modes = (tb._PLAIN, tb._REUSE, tb._RESTORE, tb._RESTORE_PSF)
        EVERY_SGD_TERM = (tb._RESTORE_PSF, True, True, True, True, False)
        step_ptrs = lambda mode, **more: dict(more, p_ptr="buf", g_ptr="buf", psf_ptr="buf", backup_ptr="buf",
                                              part_ptr="acc" if mode == tb._RESTORE_PSF else "buf")
        if full:
            sgd = [(m, wd, mom, nest, mx, first) for m in modes for wd in (False, True) for mx in (False, True)
                   for mom, nest, first in ((False, False, False), (True, False, False), (True, False, True),
                                            (True, True, False), (True, True, True))]
        else:
            sgd = [(m, True, True, True, True, False) for m in modes] + [     # every term
                (tb._REUSE, False, False, False, False, False),           # plain SGD
                (tb._RESTORE_PSF, False, True, False, False, True)]       # heavy ball, first step
        for m, wd, mom, nest, mx, first in sgd:
            for hs in scalars_ways(wd and mom and nest and mx):
                add_elementwise("_sgd_kernel", step_ptrs(m, buf_ptr="buf", scalars_ptr="f64" if hs else "buf"),
                                (m, wd, mom, nest, mx, first) == EVERY_SGD_TERM, MODE=m, WEIGHT_DECAY=wd,
                                MOMENTUM=mom, NESTEROV=nest, MAXIMIZE=mx, FIRST=first, HAS_SCALARS=hs, ACC=ACC,
                                BLOCK=tb.BLOCK)
        adamw = [(m, mx) for m in modes for mx in (False, True)] if full else \
            [(m, True) for m in modes] + [(tb._PLAIN, False)]
        for m, mx in adamw:
            for hs in scalars_ways(mx):
                add_elementwise("_adamw_kernel", step_ptrs(m, m_ptr="buf", v_ptr="buf", scalars_ptr="f64" if hs else "buf"),
                                (m, mx) == (tb._RESTORE_PSF, True), MODE=m, MAXIMIZE=mx, HAS_SCALARS=hs, ACC=ACC,
                                BLOCK=tb.BLOCK)
    return out


_TB = None          # triton_backend in the child (set before the workers fork)


def _compile(job):
    """(job, offending lines, ftz lines, float op counts, seconds) of one variant."""
    import re
    import time
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, dt, ptrs, constexprs, fusion = job
    fn = getattr(_TB, name)
    acc = "fp64" if dt == "fp64" else "fp32"
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ptrs:
            sig[p.name] = "*" + {"buf": dt, "acc": acc, "i64": "i64", "f64": "fp64"}[ptrs[p.name]]
        elif p.name in ("n", "stat_start", "nseg", "nblocks"):
            sig[p.name] = "i32"
        else:
            assert p.name.endswith(("_hi", "_mid", "_lo")), f"{name}: unknown argument {p.name}"
            sig[p.name] = "fp32"                    # Python floats are passed as fp32
    missing = set(ptrs) - set(sig)
    assert not missing, f"{name}: no argument(s) {missing}"
    # torch allocations are 16-byte aligned: Triton specializes such pointers on a launch
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if sig[p.name].startswith("*")}
    options = dict(_TB._LAUNCH)
    options["enable_fp_fusion"] = fusion
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)
    ptx = kernel.asm["ptx"]
    seconds = time.perf_counter() - t0
    checker = _load_checker()
    bad = checker.offending_lines(ptx)
    fl = r"(?:f16|f16x2|bf16|bf16x2|f32|f64)"
    ftz = [(n, line.strip()) for n, line in enumerate(ptx.splitlines(), 1)
           if re.match(rf"^\s*(?:@!?%\w+\s+)?[a-z0-9]+(?:\.\w+)*\.ftz(?:\.\w+)*\.{fl}\b", line)]
    ops = {}
    for m in re.finditer(rf"^\s*(?:@!?%\w+\s+)?((?:add|sub|mul|fma|mad|div|sqrt|rcp|rsqrt|neg|abs|min|max|cvt)"
                         rf"(?:\.\w+)*\.{fl}\b(?:\.\w+)*)", ptx, re.M):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    # loads that no mask guards, of 64-bit values: the table's entries (and fp64 scalars)
    table_loads = len(re.findall(r"^\s*ld\.global(?:\.\w+)*\.(?:b64|u64|s64)\s", ptx, re.M))
    # 128-bit global accesses (4 x b32: fp32, or 8 packed 16-bit values; 2 x b64: fp64)
    wide = {kind: len(re.findall(rf"^\s*(?:@!?%\w+\s+)?{kind}\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64)\s", ptx, re.M))
            for kind in ("ld", "st")}
    layouts = sorted(set(re.findall(r"#ttg\.blocked<\{[^}]*\}>", kernel.asm["ttgir"])))
    const = {k: (str(v) if not isinstance(v, (bool, int)) else v) for k, v in constexprs.items()}
    return dict(kernel=name, dtype=dt, constexprs=const, fusion=fusion, offending=bad, ftz=ftz, ops=ops,
                table_loads=table_loads, wide=wide, layouts=layouts, seconds=round(seconds, 3))


def _find_ptxas():
    """Path of a working ptxas for sm_90 (Triton's bundled ptxas-blackwell, TRITON_PTXAS_*_PATH,
    or a CUDA install's), exporting it for Triton; None when there is none."""
    import triton
    from triton import knobs
    cands = []
    for key in ("TRITON_PTXAS_BLACKWELL_PATH", "TRITON_PTXAS_PATH"):
        if os.environ.get(key):
            cands.append(os.environ[key])
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands += [os.path.join(bundled, "ptxas-blackwell"), os.path.join(bundled, "ptxas"),
              shutil.which("ptxas") or "", "/usr/local/cuda/bin/ptxas", "/usr/local/bin/ptxas"]
    for path in cands:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
            except Exception:  # noqa: BLE001
                continue
            os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = path      # sm_90+ uses this one
            os.environ["TRITON_PTXAS_PATH"] = path
            try:
                knobs.nvidia.ptxas_blackwell.path          # resolves (falls back to the bundled one)
            except RuntimeError:
                continue
            return path
    return None


def _child(out_path):
    import multiprocessing
    import time
    global _TB
    t0 = time.perf_counter()
    report = {}
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)

    def finish(**kw):
        report.update(kw, wall_s=round(time.perf_counter() - t0, 2))
        with open(out_path, "w") as f:
            json.dump(report, f)

    try:
        import triton
        from triton.backends import backends
        from triton.runtime.jit import JITFunction
    except Exception as exc:  # noqa: BLE001
        return finish(skip=f"triton is not importable: {exc!r}")
    if "nvidia" not in backends:
        return finish(skip=f"triton {triton.__version__} has no nvidia backend (backends: {sorted(backends)})")
    ptxas = _find_ptxas()
    if ptxas is None:
        return finish(skip="no working ptxas (Triton's bundled one, TRITON_PTXAS_PATH, or a CUDA install's): "
                           "cannot compile for sm_90 offline")
    report["ptxas"] = ptxas
    report["triton"] = triton.__version__
    from vsam_ext.ops import triton_backend as tb
    _TB = tb
    if tb._INTERPRET:
        return finish(error="triton_backend was imported under the interpreter in the child")
    jit = sorted(k for k, v in vars(tb).items() if isinstance(v, JITFunction))
    unknown = sorted(set(jit) - set(KERNELS) - set(HELPERS))
    not_jit = sorted(k for k in KERNELS + HELPERS if k not in jit)
    if unknown or not_jit:
        return finish(error=f"@triton.jit functions of triton_backend not covered here: {unknown}; "
                            f"listed here but not JITFunctions there: {not_jit}")
    report["launch"] = {k: v for k, v in tb._LAUNCH.items()}
    report["BLOCK"], report["RBLOCK"] = tb.BLOCK, tb.RBLOCK
    full = os.environ.get("VSAM_TRITON_PTX_FULL") == "1"
    jobs = [(n, dt, ptrs, c, bool(tb._LAUNCH.get("enable_fp_fusion", True)))
            for n, dt, ptrs, c in _variants(tb, full)]
    mutant = next(j for j in jobs if (j[0], j[1]) == MUTANT)
    jobs.append(mutant[:4] + (True,))
    # a first compile on its own: the cache and the compiler's one-time set-up, before forking
    results = [_compile(jobs[0])]
    workers = max(1, min(2, os.cpu_count() or 1))
    ctx = multiprocessing.get_context("fork")
    order = {"_adamw_kernel": 0, "_sgd_kernel": 1}         # the longest first: the workers end together
    rest = sorted(jobs[1:], key=lambda j: order.get(j[0], 2))
    with ctx.Pool(workers) as pool:
        results += pool.map(_compile, rest, chunksize=1)
    finish(results=results, full=full)


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vsam_ext-triton-ptx-cache"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", out], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"offline compilation took over {CHILD_TIMEOUT_S} s: {exc.stderr}")
        if not os.path.exists(out):
            pytest.fail(f"the compiling subprocess wrote no report (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
        report = json.load(open(out))
    if "skip" in report:
        pytest.skip(report["skip"])
    if "error" in report:
        pytest.fail(report["error"])
    assert proc.returncode == 0, proc.stderr[-6000:]
    return report


def _results(report, kernel, dtype, fusion=False):
    return [r for r in report["results"]
            if r["kernel"] == kernel and r["dtype"] == dtype and r["fusion"] == fusion]


def _describe(r):
    lines = [f"{r['kernel']} {r['dtype']} {r['constexprs']}:"]
    lines += [f"  ptx:{n}: {text}" for n, text in (r["offending"] + r["ftz"])[:12]]
    return "\n".join(lines)


def test_kernels_compiled_as_launched_on_a_gpu(compiled):
    assert compiled["launch"].get("enable_fp_fusion") is False, compiled["launch"]
    assert compiled["BLOCK"] < 65536, compiled["BLOCK"]         # the GPU's block, not the interpreter's
    assert {(r["kernel"], r["dtype"]) for r in compiled["results"]} == {(k, d) for k in KERNELS for d in DTYPES}
    # the element-wise kernels both ways: flat buffers and lists
    both = {(r["kernel"], r["dtype"], r["constexprs"]["LIST"]) for r in compiled["results"]
            if "LIST" in r["constexprs"]}
    assert both == {(k, d, lst) for k in ELEMENTWISE for d in DTYPES for lst in (False, True)}, both


@pytest.mark.parametrize("kernel", sorted(TABLE_LOADS))
def test_list_kernels_load_their_pointers_from_the_table(compiled, kernel):
    """Each program of a list kernel (and of the segment kernels, which always work from the
    table) loads its block's tensor, the tensor's numel and first block, and one address per
    operand it uses, as int64, and casts them to pointers: compiled for sm_90, the loads are in
    the PTX."""
    results = [r for r in compiled["results"] if r["kernel"] == kernel and not r["fusion"]]
    lists = [r for r in results if r["constexprs"].get("LIST", True)]
    assert lists
    for r in lists:
        want = TABLE_LOADS[kernel](r["constexprs"])
        assert r["table_loads"] >= want, (r["kernel"], r["dtype"], r["constexprs"], r["table_loads"], want)
    # what is counted: the flat form loads no 64-bit value unmasked (but fp64 scalars: its scale;
    # and the float64 ``scalars`` of a captured step)
    for r in results:
        if not r["constexprs"].get("LIST", True) and r["dtype"] != "fp64" and not r["constexprs"].get("HAS_SCALARS"):
            assert r["table_loads"] == 0, (r["kernel"], r["dtype"], r["constexprs"], r["table_loads"])


# the kernels whose blocks have a fast path (every kernel but the reduction of the partials)
FAST_PATH = tuple(k for k in KERNELS if k != "_segment_reduce_kernel")
ELEMENTS_PER_16_BYTES = {"fp32": 4, "fp64": 2, "bf16": 8, "fp16": 8}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", FAST_PATH)
def test_whole_blocks_use_128_bit_accesses(compiled, kernel, dtype):
    """A block wholly inside its buffer (list and segment kernels: at 16-byte aligned addresses)
    loads 128 bits at a time, whatever ``n`` (compiled here without Triton's divisibility-by-16
    specialization of the integers, as ResNet-50's 25,557,032 parameters launch) and whether its
    addresses come from the table; the partial block keeps masked narrow accesses. Issue 15:
    every access of the list and segment kernels, and of the flat kernels at such ``n``, was
    32-bit (16-bit for 16-bit dtypes)."""
    results = _results(compiled, kernel, dtype)
    assert results
    for r in results:
        assert r["wide"]["ld"] > 0, (kernel, dtype, r["constexprs"], r["wide"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", FAST_PATH)
def test_one_layout_for_both_paths_flat_and_list(compiled, kernel, dtype):
    """The fast and the masked path of a kernel, and its flat and list forms, have one layout:
    16 bytes of elements per thread. A block's partial sums (the statistics, the segment sums)
    are then the same tree of additions on either path, so the same values give the same bits
    for a flat buffer, a list of tensors, aligned or not."""
    results = _results(compiled, kernel, dtype)
    layouts = {layout for r in results for layout in r["layouts"]}
    assert len(layouts) == 1, (kernel, dtype, layouts)
    assert f"sizePerThread = [{ELEMENTS_PER_16_BYTES[dtype]}]" in layouts.pop()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_ptx_has_no_fma_unrounded_or_approximate_float_op(compiled, kernel, dtype):
    results = _results(compiled, kernel, dtype)
    assert results, f"{kernel} {dtype} not compiled"
    bad = [r for r in results if r["offending"]]
    assert not bad, ("fused, fusable or approximate float instructions in the sm_90 PTX:\n"
                     + "\n".join(_describe(r) for r in bad))
    # the kernels do float maths, and it is there, rounded
    ops = {op for r in results for op in r["ops"]}
    assert any(op.startswith(("add.rn.", "sub.rn.", "mul.rn.")) for op in ops), ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_ptx_has_no_flush_to_zero(compiled, kernel, dtype):
    bad = [r for r in _results(compiled, kernel, dtype) if r["ftz"]]
    assert not bad, ("flush-to-zero float instructions in the sm_90 PTX (the eager reference keeps "
                     "subnormals):\n" + "\n".join(_describe(r) for r in bad))


def test_adamw_sqrt_and_division_are_correctly_rounded(compiled):
    for dtype in DTYPES:
        fl = "f64" if dtype == "fp64" else "f32"
        for r in _results(compiled, "_adamw_kernel", dtype):
            assert r["ops"].get(f"sqrt.rn.{fl}") and r["ops"].get(f"div.rn.{fl}"), \
                (dtype, r["constexprs"], r["ops"])


def test_the_check_catches_fp_fusion(compiled):
    """Mutation: Triton's (pre-3.10) default, enable_fp_fusion=True, contracts the SGD step's
    ``w - lr * d`` (and the momentum update) into fma, and the checker sees it."""
    mutants = _results(compiled, *MUTANT, fusion=True)
    assert mutants
    for r in mutants:
        fused = [text for _, text in r["offending"] if text.startswith(("fma", "mad"))]
        assert fused, f"no fma in {MUTANT} compiled with enable_fp_fusion=True: {r['ops']}"


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2])
