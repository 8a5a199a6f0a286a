"""``benchmarks/gpu_check.sh --issue15``: the focused GPU check of issue 15 (segment_sumsq and
Triton's vSAM sampling step), cheaply and without a GPU: its arguments, and its verdict over
benchmark outputs already in the output folder (made up here: the benchmarks themselves are
left out with --skip-bench). ~10 s, most of it the script's environment probe."""
import csv
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(*args, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=_env())


def test_issue15_arguments():
    help_ = _run("--help", timeout=30)
    assert help_.returncode == 0 and "--issue15" in help_.stdout and "--baseline REV" in help_.stdout
    assert _run("--baseline", "HEAD", "--quick", timeout=30).returncode == 2          # --baseline needs --issue15
    assert _run("--issue15", "--quick", timeout=30).returncode == 2
    bad = _run("--issue15", "--baseline", "no-such-revision-15", "--allow-cpu", timeout=30)
    assert bad.returncode == 2 and "not a git revision" in bad.stderr


def _write(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def test_issue15_verdict_over_existing_outputs(tmp_path):
    out = tmp_path / "check"
    for folder, sumsq, sampling in ((out / "bench", (93.0, 91.0), 92.0), (out / "baseline" / "bench", (73.0, 62.0), 58.0)):
        folder.mkdir(parents=True)
        kcols = ["device", "op", "params", "layers", "impl", "ms", "pct_copy"]
        _write(folder / "bench_kernels_cuda.csv", kcols,
               [dict(device="cuda", op="segment_sumsq", params=67108864, layers=layers, impl=impl, ms=0.07,
                     pct_copy=pct)
                for layers in (1, 1024) for impl, pct in zip(("vsam_ext[cuda]", "vsam_ext[triton]"), sumsq)])
        scols = ["device", "model", "params", "step", "impl", "ms", "pct_copy"]
        _write(folder / "bench_step_cuda.csv", scols,
               [dict(device="cuda", model="resnet50", params=25557032, step="vsam_sampling", impl=impl, ms=0.4,
                     pct_copy=pct)
                for impl, pct in (("vsam_ext[cuda]", 86.0), ("vsam_ext[triton]", sampling))])
    res = _run("--issue15", "--allow-cpu", "--skip-build", "--skip-tests", "--skip-bench", "--out", str(out))
    text = (out / "issue15.md").read_text()
    assert "| segment_sumsq | vsam_ext[triton] | x1024 tensors | 91% | 62% | >= 90% | yes |" in text, text
    assert "| vsam_sampling | vsam_ext[triton] | resnet50 | 92% | 58% | >= 90% | yes |" in text, text
    assert "targets missed: 0" in text and res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # one target missed: the run fails
    rows = list(csv.DictReader(open(out / "bench" / "bench_step_cuda.csv")))
    rows[1]["pct_copy"] = "80.0"
    _write(out / "bench" / "bench_step_cuda.csv", list(rows[0].keys()), rows)
    res = _run("--issue15", "--allow-cpu", "--skip-build", "--skip-tests", "--skip-bench", "--out", str(out))
    assert res.returncode == 1 and "| resnet50 | 80% | 58% | >= 90% | NO |" in (out / "issue15.md").read_text()
