"""Smoke runs of the benchmark scripts (benchmarks/): each runs with ``--quick`` on the CPU into a
temporary folder and must write its CSV, PNG and markdown. The three runs start together (one
torch thread each), so the module takes about as long as the slowest (~1 min on 2 busy cores);
``VSAM_EXT_SKIP_BENCH_TESTS=1`` skips them. Not measurements: timings are not checked.
"""
import csv
import importlib.util
import math
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(os.environ.get("VSAM_EXT_SKIP_BENCH_TESTS") == "1",
                                reason="VSAM_EXT_SKIP_BENCH_TESTS=1")

# script -> extra arguments that keep the smoke run short
RUNS = {
    "bench_kernels": ["--layers", "1,16"],
    "bench_step": [],
    "bench_train": ["--methods", "sgd-fused,sam-torch,sam,sam5,vsam"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the three quick runs at once; returns script -> (returncode, output, out dir)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)      # conftest turns the interpreter on; the scripts time real backends
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    procs = {}
    for name, extra in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, os.path.join(BENCH, name + ".py"), "--quick", "--threads", "1", "--out", str(out)]
        procs[name] = (subprocess.Popen(cmd + extra, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), out)
    results, deadline = {}, time.monotonic() + TIMEOUT_S
    for name, (proc, out) in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\n[killed after {TIMEOUT_S} s]"
        results[name] = (proc.returncode, output, out)
    return results


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(runs, name):
    rc, output, out = runs[name]
    assert rc == 0, f"{name} --quick failed (rc {rc}):\n{output[-4000:]}"
    rows = _read_csv(os.path.join(out, f"{name}_cpu.csv"))
    assert rows, f"{name}: empty CSV"
    md = open(os.path.join(out, f"{name}_cpu.md")).read()
    for key in ("device:", "torch:", "triton:", "date:", "command:"):
        assert key in md, f"{name}: the markdown lacks {key!r}"
    assert "|" in output                  # the table went to stdout
    png = os.path.join(out, f"{name}_cpu.png")
    if HAVE_MPL:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name}: no PNG"
    return rows


def test_bench_kernels_quick(runs):
    rows = _check_outputs(runs, "bench_kernels")
    impls = {r["impl"] for r in rows}
    assert {"vsam_ext[reference]", "authors", "foreach", "torch-fused"} <= impls
    ops = {r["op"] for r in rows if r["impl"] == "vsam_ext[reference]"}
    assert {"segment_sumsq", "perturb", "perturb+keep", "restore+psf", "reuse", "sgd", "sgd+reuse", "sgd+restore",
            "adamw", "adamw+reuse", "adamw+restore"} <= ops
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["pct_copy"]) > 0


def test_bench_step_quick(runs):
    rows = _check_outputs(runs, "bench_step")
    steps = {(r["step"], r["impl"]) for r in rows}
    for step in ("sgd", "sam", "vsam_sampling", "vsam_reuse"):
        assert (step, "vsam_ext[reference]") in steps and (step, "authors") in steps and (step, "foreach") in steps
    assert all(r["model"] == "resnet18" for r in rows)
    assert "reuse" in runs["bench_step"][1] and "replaced by nothing" in runs["bench_step"][1]


def test_bench_train_quick(runs):
    rows = _check_outputs(runs, "bench_train")
    by = {r["method"]: r for r in rows}
    assert {"sgd-fused", "sam-torch", "sam", "sam5", "vsam"} <= set(by)
    assert int(by["sam"]["n_sam"]) == int(by["sam"]["steps"])
    for m in ("sam", "sam5", "vsam"):
        assert float(by[m]["ais"]) > 0 and float(by[m]["ideal_ais"]) > 0


def test_model_shapes_match_their_references():
    sys.path.insert(0, BENCH)
    try:
        import model_shapes
    finally:
        sys.path.remove(BENCH)
    expected = {"resnet18": (11_689_512, 62), "resnet50": (25_557_032, 161), "vit_b16": (86_567_656, 152),
                "gpt2": (124_439_808, 148), "gpt_1_3b": (1_315_723_264, 292)}
    for name, (count, tensors) in expected.items():
        shapes = model_shapes.param_shapes(name)       # meta device: no memory
        assert (sum(math.prod(s) for s in shapes), len(shapes)) == (count, tensors), name


def test_results_md_sections_are_replaced(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import _common
    finally:
        sys.path.remove(BENCH)
    path = str(tmp_path / "RESULTS.md")
    _common.update_results(path, "bench_step cpu", "first")
    _common.update_results(path, "bench_kernels cpu", "other")
    _common.update_results(path, "bench_step cpu", "second")
    text = open(path).read()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- BEGIN bench_step cpu -->") == 1
