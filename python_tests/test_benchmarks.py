"""Smoke runs of the benchmark scripts (benchmarks/): each runs with ``--quick`` on the CPU into a
temporary folder and must write its CSV, PNG and markdown. The four runs (bench_train twice: with
its DataLoader and with ``--fixed-batch``) start together (one torch thread each), so the module
takes about as long as the slowest (1-3 min on 2 busy cores); ``VSAM_EXT_SKIP_BENCH_TESTS=1`` skips
them. Not measurements: timings are not checked. The GPU check (``benchmarks/gpu_check.sh``) is
tested through its summary (``gpu_summary.py`` on these runs' outputs and on the H200 tables
kept in ``benchmarks/measured/``) and its CPU mode without tests and benchmarks (a few seconds).
"""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
_HAVE_CPU_EXT = importlib.util.find_spec("vsam_ext._C") is not None
TIMEOUT_S = 420                    # four runs at once on a 2-core machine that may be busy

pytestmark = pytest.mark.skipif(os.environ.get("VSAM_EXT_SKIP_BENCH_TESTS") == "1",
                                reason="VSAM_EXT_SKIP_BENCH_TESTS=1")

# run name (= the outputs' base name) -> (script, extra arguments that keep the smoke run short)
RUNS = {
    "bench_kernels": ("bench_kernels", ["--layers", "1,16"]),
    "bench_step": ("bench_step", []),
    "bench_train": ("bench_train", ["--methods", "sgd-fused,sam-torch,sam,sam5,vsam"]),
    "bench_train_fixed": ("bench_train", ["--fixed-batch", "--steps", "2",
                                          "--methods", "sgd-foreach,sam-torch,sam-authors,sam,vsam,ausam"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the quick runs at once; returns run name -> (returncode, output, out dir)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)      # conftest turns the interpreter on; the scripts time real backends
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    procs = {}
    for name, (script, extra) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, os.path.join(BENCH, script + ".py"), "--quick", "--threads", "1", "--out", str(out)]
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


def test_bench_train_fixed_batch_quick(runs):
    rows = _check_outputs(runs, "bench_train_fixed")
    by = {r["method"]: r for r in rows}
    assert {"sgd-foreach", "sam-torch", "sam-authors", "sam", "vsam", "ausam"} <= set(by)
    assert int(by["sam"]["n_sam"]) == int(by["sam"]["steps"])
    for m in ("sam", "vsam"):
        assert float(by[m]["ais"]) > 0 and float(by[m]["ideal_ais"]) > 0
    md = open(os.path.join(runs["bench_train_fixed"][2], "bench_train_fixed_cpu.md")).read()
    assert "## bench_train_fixed" in md and "one fixed batch on the device, no DataLoader" in md
    assert "no data loading" in md
    # the loader mode's outputs keep their names
    assert not os.path.exists(os.path.join(runs["bench_train_fixed"][2], "bench_train_cpu.csv"))


@pytest.mark.skipif(not _HAVE_CPU_EXT, reason="cpu extension not built")
def test_bench_lists_quick(tmp_path):
    """bench_lists.py --quick (resnet18's first 24 tensors, one round) on two ops: its CSV and
    markdown, the list/flat ratio column; timings not checked."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_lists.py"), "--quick", "--threads", "1",
                          "--ops", "segment_sumsq,sgd+reuse", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = _read_csv(os.path.join(tmp_path, "bench_lists_cpu.csv"))
    assert {r["op"] for r in rows} == {"segment_sumsq", "sgd+reuse"} and all(r["tensors"] == "24" for r in rows)
    for r in rows:
        assert float(r["flat_ms"]) > 0 and float(r["list_ms"]) > 0 and float(r["list_vs_flat"]) > 0
    md = open(os.path.join(tmp_path, "bench_lists_cpu.md")).read()
    assert "## Tensor lists vs flat buffers (CPU)" in md and "list/flat" in md and "command:" in md


@pytest.mark.skipif(not _HAVE_CPU_EXT, reason="cpu extension not built")
def test_bench_compile_quick():
    """bench_compile.py --quick with the aot_eager backend (no C++ compile): its table has the
    three methods, eager and compiled, and the compiled model trained as the eager one (aot_eager
    runs the same kernels: the same final loss); timings not checked."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_compile.py"), "--quick", "--backend", "aot_eager"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in rows[1:]] == ["sgd", "sam", "vsam"]
    for r in rows[1:]:
        assert float(r[1]) > 0 and float(r[2]) > 0
        eager_loss, compiled_loss = r[5].split("/")
        assert eager_loss.strip() == compiled_loss.strip()


def test_bench_train_fixed_batch_is_documented():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--fixed-batch" in out.stdout and "no DataLoader" in out.stdout
    assert "--fixed-batch" in open(os.path.join(BENCH, "README.md")).read()


def _summary_module():
    sys.path.insert(0, BENCH)
    try:
        import gpu_summary
    finally:
        sys.path.remove(BENCH)
    return gpu_summary


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="5">
<testcase classname="python_tests.test_ops" name="test_sgd_step[a-cuda]" time="0.1"/>
<testcase classname="python_tests.test_ops" name="test_sgd_step[b-cuda]" time="0.1"/>
<testcase classname="python_tests.test_ops" name="test_perturb[c-cuda]" time="0.1">
  <failure message="AssertionError: 3 elements differ">trace</failure></testcase>
<testcase classname="python_tests.test_cuda" name="test_x" time="0"><skipped type="pytest.skip" message="no"/></testcase>
<testcase classname="python_tests.test_amp" name="test_y" time="0"><skipped type="pytest.xfail" message="known"/></testcase>
</testsuite></testsuites>
"""


def _fake_check_folder(runs, folder, test_rc):
    """A gpu_check.sh output folder made of the quick runs' outputs, a junit file and phases."""
    os.makedirs(os.path.join(folder, "bench"))
    for name in ("bench_kernels", "bench_step", "bench_train_fixed"):
        rc, output, out = runs[name]
        assert rc == 0, output[-2000:]
        for ext in ("csv", "md"):
            shutil.copy(os.path.join(out, f"{name}_cpu.{ext}"), os.path.join(folder, "bench"))
    with open(os.path.join(folder, "tests.xml"), "w") as f:
        f.write(JUNIT if test_rc else JUNIT.replace('failures="1"', 'failures="0"')
                .replace('<failure message="AssertionError: 3 elements differ">trace</failure>', ""))
    with open(os.path.join(folder, "tests.rc"), "w") as f:
        f.write(f"{test_rc}\n")
    with open(os.path.join(folder, "phases.tsv"), "w") as f:
        f.write(f"build\tskip\t0\tno GPU\ntests\t{test_rc}\t12\t\nbench_kernels\t0\t3\t\n"
                "bench_step\t0\t4\t\nbench_train\t0\t5\t\n")
    with open(os.path.join(folder, "meta.txt"), "w") as f:
        f.write("mode=cpu-smoke\nbackends=reference cpu\ncommand=bash benchmarks/gpu_check.sh --quick\n")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_summary_of_the_quick_runs(runs, tmp_path):
    for test_rc in (1, 0):
        folder = str(tmp_path / f"check-{test_rc}")
        _fake_check_folder(runs, folder, test_rc)
        out = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--summary-only", folder], cwd=REPO,
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHON=sys.executable))
        text = out.stdout
        assert "CPU smoke run" in text, out.stderr
        assert "## Kernels: % of copy bandwidth" in text and "| sgd " in text and "torch-fused" in text
        assert "## Optimizer step: their time / ours" in text and "vsam_reuse vs foreach" in text
        assert "sam vs authors" in text and "sgd vs torch-fused" in text
        assert "## End to end: resnet18" in text and "one fixed batch" in text and "vSAM " in text
        assert "SAM step: sam-torch" in text and "SAM step: sam-authors" in text
        if test_rc:
            assert out.returncode == 1
            assert "## Tests: 2 passed, 1 failed, 1 skipped, 1 xfailed (pytest exit 1)" in text
            assert "test_ops.py::test_perturb[c-cuda]: AssertionError: 3 elements differ" in text
            assert "RESULT: FAIL" in text and "tests exited 1" in text
        else:
            assert out.returncode == 0, text + out.stderr
            assert "## Tests: 3 passed, 1 skipped, 1 xfailed (pytest exit 0)" in text
            assert "RESULT: OK" in text
        assert open(os.path.join(folder, "summary.md")).read() == text
        data = json.load(open(os.path.join(folder, "summary.json")))
        assert data["ok"] is (test_rc == 0)
        assert data["kernels"]["pct_copy"]["cpu"]["sgd"] > 0
        assert data["step"]["ratios"]["resnet18"]["cpu"]["vsam_reuse vs foreach"] > 0


def test_gpu_summary_reads_the_h200_tables():
    """The summary of the markdown tables measured on the H200 (no CSV kept): the GPU path."""
    gs = _summary_module()
    folder = os.path.join(BENCH, "measured", "h200-2026-12-01")
    text, data, ok = gs.summarise(folder)
    assert ok and "CPU smoke run" not in text
    assert "NVIDIA H200" in text and "4129 GB/s" in text and "67.1M parameters" in text
    assert data["kernels"]["pct_copy"]["cuda"]["reuse"] == 99 and data["kernels"]["pct_copy"]["triton"]["sgd"] == 100
    assert data["kernels"]["pct_copy"]["torch-fused"]["sgd"] == 20          # worst over 1 and 1024 layers
    assert "below the target: segment_sumsq [cuda] 73%, segment_sumsq [triton] 62%" in text
    r = data["step"]["ratios"]
    assert abs(r["resnet50"]["cuda"]["vsam_reuse vs foreach"] - 0.734 / 0.159) < 1e-9
    assert abs(r["gpt_1_3b"]["triton"]["sgd vs torch-fused"] - 7.26 / 6.23) < 1e-9
    assert "target vsam_reuse >= 10x authors at resnet50: cuda 33.02x (met), triton 35.00x (met)" in text
    assert "vSAM +6.9% over its ideal (4/200 SAM steps; target <= 3%: NOT met)" in text
    assert "DataLoader included" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_runs_its_checks(tmp_path):
    """gpu_check.sh itself, cheaply: the environment probe, the backend check and the summary
    (tests and benchmarks left out; no build: on a GPU machine this runs inside gpu_check.sh's own
    test phase). Without a GPU and without --quick/--allow-cpu it refuses, loudly."""
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(BENCH, "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    help_ = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert help_.returncode == 0 and "--quick" in help_.stdout and "--summary-only" in help_.stdout
    out = subprocess.run(["bash", script, "--quick", "--skip-build", "--skip-tests", "--skip-bench",
                          "--out", str(tmp_path / "check")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    if torch_cuda_available() and not {"cuda", "triton"} <= set(_backends()):
        # a GPU machine whose build lacks a GPU backend: the check must stop, loudly
        assert out.returncode == 3 and "lacks the cuda and/or triton backend" in out.stderr
        return
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RESULT: OK" in out.stdout and "vsam_ext.available_backends()" in out.stderr
    phases = open(tmp_path / "check" / "phases.tsv").read()
    assert "backends\t0" in phases and "tests\tskip" in phases and "bench\tskip" in phases
    assert os.path.exists(tmp_path / "check" / "summary.md")
    if not torch_cuda_available():
        assert "CPU smoke run" in out.stdout
        bad = subprocess.run(["bash", script, "--skip-tests", "--skip-bench", "--out", str(tmp_path / "nogpu")],
                             cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        assert bad.returncode == 2 and "no CUDA GPU" in bad.stderr
    assert subprocess.run(["bash", script, "--bogus"], capture_output=True, timeout=30).returncode == 2


def torch_cuda_available():
    import torch
    return torch.cuda.is_available()


def _backends():
    import vsam_ext
    return vsam_ext.available_backends()


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
