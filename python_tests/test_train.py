"""The training tool (vsam_ext.train): models, augmentation, the vSAM schedule, and a tiny
end-to-end run through the command line that must write a well-formed table, JSON and PNGs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vsam_ext.train.data import Augment
from vsam_ext.train.loop import vsam_schedule
from vsam_ext.train.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("VSAM_EXT_DATA", os.path.join(ROOT, "..", "shared", "data"))
HAVE_FMNIST = os.path.exists(os.path.join(DATA, "fashion_mnist", "train-images-idx3-ubyte.gz"))


@pytest.mark.parametrize("name,shape", [("cnn", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("wrn16_4", (3, 32, 32))])
def test_build_model_shapes(name, shape):
    torch.manual_seed(0)
    m = build_model(name, num_classes=7)
    out = m.eval()(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_build_model_sizes_and_errors():
    counts = {n: sum(p.numel() for p in build_model(n).parameters()) for n in ("cnn", "resnet18", "wrn16_4")}
    assert counts == {"cnn": 207_098, "resnet18": 11_173_962, "wrn16_4": 2_748_890}
    assert sum(p.numel() for p in build_model("wrn28_10").parameters()) == 36_479_194
    torch.manual_seed(1)
    a = build_model("cnn")
    torch.manual_seed(1)
    b = build_model("cnn")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError):
        build_model("resnet50")
    with pytest.raises(ValueError):
        build_model("wrn17_4")          # depth must be 6n + 4


def test_augment_crop_flip_cutout():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1.0
    fill = torch.full((1, 1, 1, 1), -5.0)
    out = Augment(crop_pad=2, fill=fill)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):                  # a crop: a shifted window of the image padded with `fill`
        padded = torch.nn.functional.pad(x[i, 0], (2, 2, 2, 2), value=-5.0)
        assert any(torch.equal(out[i, 0], padded[dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
    flipped = Augment(flip=True)(x, torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cut = Augment(cutout=4)(x, torch.Generator().manual_seed(3))
    zeros = (cut == 0).sum(dim=(1, 2, 3))
    assert ((zeros >= 4) & (zeros <= 16)).all()       # a 4x4 square, clipped at the border
    a = Augment(4, True, 3)(x, torch.Generator().manual_seed(7))
    b = Augment(4, True, 3)(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)                           # same seed, same augmentation


def test_vsam_schedule():
    warmup, window, n = vsam_schedule(7800)
    assert warmup == 780 and window == 50 and n >= 10
    warmup, window, n = vsam_schedule(500)
    assert warmup == 50 and window == 45 and n == pytest.approx(10.0)
    warmup, window, n = vsam_schedule(40)             # tiny: the window stays >= 2 * slices
    assert window == 10
    assert vsam_schedule(1000, warmup_steps=7, window=20) == (7, 20, 993 / 20)


def test_help_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "vsam_ext.train", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--optimizers" in r.stdout and "--quick" in r.stdout


def _strict_json(path):
    def bad(value):
        raise ValueError(f"non-standard JSON constant {value}")
    with open(path) as f:
        return json.load(f, parse_constant=bad)


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not found under {DATA} (set VSAM_EXT_DATA)")
def test_smoke_run_writes_table_json_plots(tmp_path, capsys):
    from vsam_ext.train import main

    out = tmp_path / "run"
    rc = main(["--smoke", "--threads", "1", "--no-progress", "--data-dir", DATA, "--out-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "warm-up" in printed and "window K" in printed     # the vSAM schedule is printed

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| optimizer |") and "AIS" in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["sgd", "vsam"]

    res = _strict_json(out / "results.json")
    assert res["complete"] is True
    assert [(r["optimizer"], r["seed"]) for r in res["runs"]] == [("sgd", 0), ("vsam", 0)]
    steps = res["vsam"]["total_steps"]
    for run in res["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert 0.0 <= e["test_acc"] <= 100.0 and e["train_loss"] > 0 and e["train_time"] > 0
        f = run["final"]
        assert f["steps"] == steps and f["ais"] > 0 and f["images"] == steps * 32
    vs = res["runs"][1]
    assert vs["final"]["sam_steps"] >= res["vsam"]["warmup_steps"]
    # every SAM step's PSF statistics were recorded, against the right step numbers
    assert len(vs["psf"]["psf_norm"]) == vs["final"]["sam_steps"] == len(vs["sam_step_numbers"])
    assert vs["psf"]["step"] == vs["sam_step_numbers"]
    assert all(r > 0 for r in vs["psf"]["ratio"])
    assert vs["trace"]["probability"][0] == 1.0          # warm-up
    assert {s["optimizer"] for s in res["summary"]} == {"sgd", "vsam"}

    for name in ("accuracy.png", "vsam_sampling.png", "vsam_psf.png"):
        _check_png(out / name)

    # --merge joins result folders made with the same settings (e.g. one per optimizer)
    res_path = out / "results.json"
    for i, run in enumerate(res["runs"]):
        part = dict(res, runs=[run], complete=True)
        (tmp_path / f"part{i}").mkdir()
        (tmp_path / f"part{i}" / "results.json").write_text(json.dumps(part))
    merged = tmp_path / "merged"
    assert main(["--merge", f"{tmp_path / 'part0'},{tmp_path / 'part1'}", "--out-dir", str(merged)]) == 0
    mres = _strict_json(merged / "results.json")
    assert [(r["optimizer"], r["seed"]) for r in mres["runs"]] == [("sgd", 0), ("vsam", 0)]
    assert mres["summary"] == _strict_json(res_path)["summary"]
    assert (merged / "results.md").read_text().count("| vsam |") == 1
    for name in ("accuracy.png", "vsam_sampling.png", "vsam_psf.png"):
        _check_png(merged / name)
    with pytest.raises(SystemExit):                       # the same run twice
        main(["--merge", f"{tmp_path / 'part0'},{tmp_path / 'part0'}", "--out-dir", str(tmp_path / "bad")])


# -- the command line from anywhere; one-line errors that leave nothing on disk ------------------
def _cli(args, cwd, env_extra=None, drop=("VSAM_EXT_DATA",), timeout=300):
    """``python -m vsam_ext.train ARGS`` from ``cwd``, importing this checkout's package."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "vsam_ext.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


PROJECT_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.mark.skipif(not os.path.exists(os.path.join(PROJECT_DATA, "fashion_mnist", "train-images-idx3-ubyte.gz")),
                    reason=f"no Fashion-MNIST in {PROJECT_DATA} (the default data folder)")
def test_cli_finds_the_data_from_another_directory(tmp_path):
    # no --data-dir, no VSAM_EXT_DATA, run from a folder that has no ../shared/data: the default
    # is found from the package's location (../shared/data beside the project root)
    r = _cli(["--smoke", "--optimizers", "sgd", "--epochs", "1", "--threads", "1", "--no-progress",
              "--out-dir", "out"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").is_file()
    assert os.listdir(tmp_path) == ["out"]


def test_cli_missing_data_is_one_line_and_writes_nothing(tmp_path):
    missing = tmp_path / "no-such-data"
    err = _one_line_error(_cli(["--smoke", "--data-dir", str(missing), "--out-dir", "out"], cwd=tmp_path))
    assert "--data-dir" in err and str(missing) in err
    err = _one_line_error(_cli(["--smoke"], cwd=tmp_path, env_extra={"VSAM_EXT_DATA": str(missing)}))
    assert "VSAM_EXT_DATA" in err and str(missing) in err
    (tmp_path / "empty").mkdir()             # a folder that exists but lacks the dataset's files
    err = _one_line_error(_cli(["--smoke", "--data-dir", str(tmp_path / "empty")], cwd=tmp_path))
    assert "fashion_mnist" in err
    assert os.listdir(tmp_path) == ["empty"]              # no out/, no runs/


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path):
    err = _one_line_error(_cli(["--smoke", "--device", "cuda", "--out-dir", "out"], cwd=tmp_path))
    assert "--device" in err and "CUDA" in err
    err = _one_line_error(_cli(["--smoke", "--device", "nonsense", "--out-dir", "out"], cwd=tmp_path))
    assert "--device" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,names", [
    (["--dataset", "cifar10", "--model", "wrn3_1"], "--model"),      # WideResNet's depth rule
    (["--train-size", "0"], "--train-size"),
    (["--train-size", "-1"], "--train-size"),
    (["--test-size", "0"], "--test-size"),
])
def test_cli_bad_sizes_and_models_are_one_line_and_write_nothing(tmp_path, args, names):
    err = _one_line_error(_cli(["--smoke", *args, "--out-dir", "out"], cwd=tmp_path))
    assert names in err
    assert os.listdir(tmp_path) == []


# -- the vSAM plots and the verdict lines -------------------------------------------------------
def _fake_vsam_run(name, sam_at, total, seed=0):
    """A run record as train_run makes it, for the plots: SAM steps at ``sam_at``."""
    trace = {"step": [1, 11, 20, 30, total], "quota": [1.0, 1.0, 2.0, 3.0, 3.0],
             "probability": [1.0, 0.1, 0.2, 0.3, 0.3]}
    return {"optimizer": name, "seed": seed, "trace": trace, "sam_step_numbers": list(sam_at),
            "final": {"steps": total, "test_acc": 80.0},
            "psf": {"step": list(sam_at), "psf_norm": [1.0 + 0.01 * s for s in sam_at],
                    "grad_norm": [2.0] * len(sam_at), "ratio": [0.5 + 0.005 * s for s in sam_at]}}


def _capture_figures(monkeypatch):
    import matplotlib.figure
    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *a, **k):
        saved.append(self)
        return original(self, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def _lines_of(ax, name):
    from matplotlib.colors import to_rgba
    from vsam_ext.train.report import COLORS
    want = to_rgba(COLORS[name])[:3]
    return [ln for ln in ax.get_lines() if to_rgba(ln.get_color())[:3] == want]


def _shows_through(below, above):
    """Whether a line drawn first stays visible under an identical line drawn on top of it."""
    if above.get_linestyle() not in ("-", "solid") and above.get_linestyle() not in ("None", "", " "):
        return True                                   # dashed/dotted: gaps show the line below
    if below.get_linewidth() > above.get_linewidth() + 0.5 and below.get_linestyle() not in ("None", "", " "):
        return True                                   # a wider line below shows on both sides
    mb, ma = below.get_marker(), above.get_marker()
    if mb not in (None, "None", "", " ") and ma not in (None, "None", "", " ") and mb != ma:
        return True                                   # different markers
    return False


def test_plots_show_vsam_under_identical_vsam_a(tmp_path, monkeypatch):
    """In warm-up (and whenever they decide alike) vsam and vsam-a have the same curves: the one
    drawn first must stay visible."""
    from vsam_ext.train.report import plot_psf, plot_sampling
    saved = _capture_figures(monkeypatch)
    sam_at = list(range(1, 11)) + [12, 15, 22, 25, 32]
    runs = [_fake_vsam_run("vsam", sam_at, 40), _fake_vsam_run("vsam-a", sam_at, 40)]
    assert plot_sampling(runs, str(tmp_path / "s.png"), warmup=10, window=10)
    assert plot_psf(runs, str(tmp_path / "p.png"), warmup=10)
    for fig in saved:
        for ax in fig.axes:
            a, b = _lines_of(ax, "vsam"), _lines_of(ax, "vsam-a")
            assert a and b, ax.get_title()
            for la in a:
                for lb in b:
                    if list(la.get_xdata()) == list(lb.get_xdata()) and list(la.get_ydata()) == list(lb.get_ydata()):
                        below, above = sorted((la, lb), key=lambda ln: (ln.get_zorder(), ax.get_lines().index(ln)))
                        assert _shows_through(below, above), ax.get_title()


def test_sampling_plot_has_no_spike_from_a_short_last_window(tmp_path, monkeypatch):
    """Windows (after a 10-step warm-up, K = 10) start at steps 11, 20, 30, ... (the controller's
    first window is K - 1 steps long); the run ends at step 35, 6 steps into a window. That
    partial window's SAM steps (all 6) must not show as a fraction 1.0 spike."""
    from vsam_ext.train.report import plot_sampling
    saved = _capture_figures(monkeypatch)
    sam_at = list(range(1, 11)) + [12, 15, 22, 25] + list(range(30, 36))
    assert plot_sampling([_fake_vsam_run("vsam", sam_at, 35)], str(tmp_path / "s.png"), warmup=10, window=10)
    ax = saved[0].axes[2]
    (line,) = _lines_of(ax, "vsam")
    assert max(line.get_ydata()) <= 0.25
    assert "partial" in ax.get_title() or "partial" in ax.get_xlabel()
    from vsam_ext.train.report import window_fractions
    starts, frac, partial = window_fractions(sam_at, warmup=10, window=10, total=35)
    assert list(starts) == [11, 20, 30] and partial == 6
    assert list(frac) == pytest.approx([2 / 9, 2 / 10])          # full windows only


def _row(name, acc, std=float("nan"), time=10.0, cpu=10.0):
    return {"optimizer": name, "test_acc_mean": acc, "test_acc_std": std, "time_vs_sam": time / 20.0,
            "train_time": time, "train_cpu_time": cpu}


def test_verdict_lines_say_what_they_test():
    from vsam_ext.train.report import target_check
    rows = [_row("sgd", 88.0, 0.2, 8.0, 8.0), _row("sam", 90.0, 0.5, 20.0, 20.0),
            _row("vsam", 89.7, 0.3, 11.0, 11.0), _row("vsam-a", 89.0, 0.4, 14.0, 14.0)]
    lines = target_check(rows)
    assert len(lines) == 6                           # three tests per variant, one line each
    for line in lines:
        assert line.split(":")[0] in ("vsam", "vsam-a")
        assert line.rstrip().endswith(("PASS", "FAIL", "n/a")), line
    by = {(ln.split(":")[0], i % 3): ln for i, ln in enumerate(lines)}
    acc, sgd, time = by[("vsam", 0)], by[("vsam", 1)], by[("vsam", 2)]
    # what was compared (both values), and the threshold
    assert "89.70" in acc and "90.00" in acc and "0.50" in acc and "std" in acc and acc.endswith("PASS")
    assert "89.70" in sgd and "88.00" in sgd and "SGD" in sgd and sgd.endswith("PASS")
    assert "11.0" in time and "20.0" in time and "0.65" in time and time.endswith("PASS")
    acc_a, time_a = by[("vsam-a", 0)], by[("vsam-a", 2)]
    assert acc_a.endswith("FAIL") and time_a.endswith("FAIL")      # -1.00 < -0.50; 0.70 > 0.65
    one_seed = target_check([_row("sam", 90.0), _row("vsam", 89.0)])
    assert len(one_seed) == 2 and one_seed[0].endswith("n/a") and "seed" in one_seed[0]
    above = target_check([_row("sam", 90.0), _row("vsam", 90.5)])[0]
    assert above.endswith("PASS") and "seed" in above                # "or above" needs no std


def test_kl_schedule_scales_the_authors_saf_mesa_settings():
    from vsam_ext.train.loop import kl_schedule
    assert kl_schedule(200, 78_000) == (5, pytest.approx(0.9998))      # the authors' CIFAR-10 run
    start, decay = kl_schedule(8, 496)                                  # the --quick run: 8 epochs x 62 steps
    assert start == 0 and decay == pytest.approx(1 - 15.6 / 496)
    assert kl_schedule(40, 10, kl_start_epoch=7, mesa_decay=0.5) == (7, 0.5)
    assert kl_schedule(3, 5)[1] == 0.0                                  # never below 0


def test_table_has_ais_as_percent_of_sams():
    from vsam_ext.train.report import format_table, summarize

    def final(acc, ais, sam_steps):
        return {"test_acc": acc, "sam_steps": sam_steps, "steps": 10, "sam_fraction": sam_steps / 10,
                "train_time": 1000 / ais, "wall_time": 1.0, "ais": ais}
    runs = [{"optimizer": o, "seed": s, "final": final(a, ais, k)}
            for o, ais, k in (("sam", 400.0, 10), ("saf", 800.0, 0), ("mesa", 600.0, 0))
            for s, a in ((0, 90.0), (1, 91.0))]
    rows = summarize(runs, ["sam", "saf", "mesa"])
    assert [r["ais_vs_sam"] for r in rows] == [100.0, 200.0, 150.0]
    lines = format_table(rows).splitlines()
    head = [c.strip() for c in lines[0].split("|")]
    saf = [c.strip() for c in lines[3].split("|")]
    assert saf[head.index("AIS / SAM's (%)")] == "200" and saf[head.index("SAM steps")] == "0 / 10"
    assert saf[head.index("test acc (%)")] == "90.50 ± 0.71" and saf[head.index("sample fraction")] == "-"


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not found under {DATA} (set VSAM_EXT_DATA)")
def test_smoke_run_of_saf_and_mesa(tmp_path):
    """SAF and MESA through the tool: one pass per step (no SAM step), the KL term's settings in
    the JSON, AIS against SAM's in the table."""
    from vsam_ext.train import main

    out = tmp_path / "run"
    assert main(["--smoke", "--optimizers", "sam,saf,mesa", "--saf-epochs-ago", "1",
                 "--threads", "1", "--no-progress", "--data-dir", DATA, "--out-dir", str(out)]) == 0
    res = _strict_json(out / "results.json")
    by = {r["optimizer"]: r for r in res["runs"]}
    assert res["kl"]["kl_start_epoch"] == 0 and 0 < res["kl"]["mesa_decay"] < 0.9998
    for name in ("saf", "mesa"):
        f = by[name]["final"]
        assert f["sam_steps"] == 0 and f["steps"] == 24 and f["ais"] > 0 and f["train_loss"] > 0
        assert by[name]["kl_loss"]["kl_start_epoch"] == 0 and by[name]["kl_loss"]["memory_bytes"] > 0
    assert by["saf"]["kl_loss"]["memory_bytes"] == 384 * 2 * (10 * 4 + 4)
    assert by["mesa"]["kl_loss"]["updates"] == 24
    table = (out / "results.md").read_text()
    assert "AIS / SAM's (%)" in table and "| saf |" in table and "| mesa |" in table
