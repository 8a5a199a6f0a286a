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
