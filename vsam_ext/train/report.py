"""Outputs of the training tool: the summary table (text/markdown), the JSON file of every
epoch, and the PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
import os
from statistics import mean, stdev
from typing import Dict, Iterable, List, Optional

__all__ = ["summarize", "format_table", "target_check", "write_json", "window_fractions", "plot_all"]

COLORS = {"sgd": "tab:gray", "sam": "tab:blue", "sam5": "tab:orange", "vsam": "tab:red", "vsam-a": "tab:purple",
          "asam": "tab:cyan", "looksam": "tab:green", "aesam": "tab:olive", "esam": "tab:brown", "ausam": "tab:pink",
          "saf": "gold", "mesa": "teal"}
NO_SAM = ("sgd", "saf", "mesa")      # one pass per step: no SAM step, no sample fraction

# vsam and vsam-a share their warm-up (every step SAM, the same statistics) and often their
# quota: their curves coincide there. vsam is drawn wide and solid underneath, vsam-a thin and
# dashed on top (zorder), so both stay visible wherever they overlap; in scatter plots they get
# different markers.
LINE_STYLES = {"vsam": dict(linestyle="-", linewidth=3.6, alpha=0.45, zorder=2),
               "vsam-a": dict(linestyle=(0, (4, 2.5)), linewidth=1.5, alpha=1.0, zorder=3)}
MARKER_STYLES = {"vsam": dict(marker="o", markersize=3.0, alpha=0.45, zorder=2),
                 "vsam-a": dict(marker="x", markersize=3.5, alpha=0.8, zorder=3)}


def _m(xs: List[float]) -> float:
    return mean(xs) if xs else float("nan")


def _s(xs: List[float]) -> float:
    return stdev(xs) if len(xs) > 1 else float("nan")


def summarize(runs: List[dict], optimizers: Iterable[str]) -> List[dict]:
    """One row per optimizer: means (and sample std of the accuracy) over its seeds."""
    rows = []
    by = {}
    for r in runs:
        by.setdefault(r["optimizer"], []).append(r["final"])
    sam_time = _m([f["train_time"] for f in by.get("sam", [])])
    sam_ais = _m([f["ais"] for f in by.get("sam", [])])
    for name in optimizers:
        fs = by.get(name)
        if not fs:
            continue
        acc = [f["test_acc"] for f in fs]
        row = {"optimizer": name, "seeds": len(fs), "test_acc_mean": _m(acc), "test_acc_std": _s(acc),
               "test_acc": acc, "sam_steps": _m([f["sam_steps"] for f in fs]), "steps": _m([f["steps"] for f in fs]),
               "sam_fraction": _m([f["sam_fraction"] for f in fs]),
               "sample_fraction": _m([f.get("sample_fraction", 1.0) for f in fs]),
               "train_time": _m([f["train_time"] for f in fs]), "wall_time": _m([f["wall_time"] for f in fs]),
               "train_cpu_time": _m([f.get("train_cpu_time", float("nan")) for f in fs]),
               "ais": _m([f["ais"] for f in fs]), "diverged": sum(bool(f.get("diverged")) for f in fs)}
        row["time_vs_sam"] = row["train_time"] / sam_time if sam_time == sam_time and sam_time > 0 else float("nan")
        row["ais_vs_sam"] = 100.0 * row["ais"] / sam_ais if sam_ais == sam_ais and sam_ais > 0 else float("nan")
        if all("val_acc" in f for f in fs):
            val = [f["val_acc"] for f in fs]
            row["val_acc_mean"], row["val_acc_std"] = _m(val), _s(val)
        rows.append(row)
    return rows


def _pm(m: float, s: float) -> str:
    if m != m:
        return "-"
    return f"{m:.2f}" if s != s else f"{m:.2f} ± {s:.2f}"


def format_table(rows: List[dict]) -> str:
    """A markdown table (readable as plain text)."""
    has_val = any("val_acc_mean" in r for r in rows)
    head = ["optimizer", "seeds", "test acc (%)"] + (["val acc (%)"] if has_val else []) + \
           ["SAM steps", "SAM fraction", "sample fraction", "wall time (s)", "time / SAM", "AIS (img/s)",
            "AIS / SAM's (%)", "CPU time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        cells = [r["optimizer"] + (" (diverged)" if r["diverged"] else ""), str(r["seeds"]),
                 _pm(r["test_acc_mean"], r["test_acc_std"])]
        if has_val:
            cells.append(_pm(r.get("val_acc_mean", float("nan")), r.get("val_acc_std", float("nan"))))
        cells += [f"{r['sam_steps']:.0f} / {r['steps']:.0f}", f"{r['sam_fraction']:.3f}",
                  "-" if r["optimizer"] in NO_SAM else f"{r['sample_fraction']:.3f}",
                  f"{r['train_time']:.1f}",
                  "-" if r["time_vs_sam"] != r["time_vs_sam"] else f"{r['time_vs_sam']:.2f}",
                  f"{r['ais']:.0f}",
                  "-" if r.get("ais_vs_sam", float("nan")) != r.get("ais_vs_sam", float("nan"))
                  else f"{r['ais_vs_sam']:.0f}",
                  "-" if r["train_cpu_time"] != r["train_cpu_time"] else f"{r['train_cpu_time']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_check(rows: List[dict], max_time_ratio: float = 0.65) -> List[str]:
    """The project's target for each vSAM variant, one line per check, each saying what it
    compares, the threshold, and ``PASS``, ``FAIL`` or ``n/a`` at the end:

    * test accuracy (mean over seeds) within one sample std of SAM's, or above it
      (difference >= -SAM's std; ``n/a`` with one seed: no std);
    * test accuracy above SGD's (difference > 0; only when sgd ran);
    * training wall time <= ``max_time_ratio`` x SAM's (the CPU-time ratio is shown beside it).
    """
    by = {r["optimizer"]: r for r in rows}
    out = []
    sam, sgd = by.get("sam"), by.get("sgd")

    def verdict(ok) -> str:
        return "n/a" if ok is None else "PASS" if ok else "FAIL"

    for name in ("vsam", "vsam-a"):
        v = by.get(name)
        if v is None or sam is None:
            continue
        acc, ref = v["test_acc_mean"], sam["test_acc_mean"]
        diff, std = acc - ref, sam["test_acc_std"]
        test = f"{name}: test accuracy within one std of SAM's, or above"
        if std == std:
            out.append(f"{test}: {acc:.2f} % vs SAM {ref:.2f} ± {std:.2f} % (difference {diff:+.2f}, "
                       f"needs >= {-std:+.2f}): {verdict(diff >= -std)}")
        elif diff >= 0:
            out.append(f"{test}: {acc:.2f} % vs SAM {ref:.2f} % (difference {diff:+.2f}, needs >= 0 with one "
                       f"seed, no std): PASS")
        else:
            out.append(f"{test}: {acc:.2f} % vs SAM {ref:.2f} % (difference {diff:+.2f}); one seed, no std "
                       f"to judge by (give several --seeds): n/a")
        if sgd is not None:
            d = acc - sgd["test_acc_mean"]
            out.append(f"{name}: test accuracy above SGD's: {acc:.2f} % vs SGD {sgd['test_acc_mean']:.2f} % "
                       f"(difference {d:+.2f}, needs > 0): {verdict(d > 0 if d == d else None)}")
        ratio = v["time_vs_sam"]
        cpu = v["train_cpu_time"] / sam["train_cpu_time"] if sam["train_cpu_time"] > 0 else float("nan")
        out.append(f"{name}: training wall time at most {max_time_ratio} x SAM's: {v['train_time']:.1f} s vs SAM "
                   f"{sam['train_time']:.1f} s = {ratio:.3f} x (needs <= {max_time_ratio}"
                   + (f"; CPU time {cpu:.2f} x" if cpu == cpu else "") + f"): "
                   f"{verdict(ratio <= max_time_ratio if ratio == ratio else None)}")
    return out


def _clean(obj):
    """JSON without NaN/Infinity (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(payload), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


# -- plots ---------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(runs: List[dict], optimizers: List[str], path: str, title: str = "") -> None:
    """Test accuracy per epoch (mean ± std over seeds), test accuracy against training time,
    training loss per epoch."""
    import numpy as np
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for name in optimizers:
        rs = [r for r in runs if r["optimizer"] == name]
        if not rs:
            continue
        n = min(len(r["epochs"]) for r in rs)
        ep = np.arange(1, n + 1)
        acc = np.array([[e["test_acc"] for e in r["epochs"][:n]] for r in rs])
        loss = np.array([[e["train_loss"] for e in r["epochs"][:n]] for r in rs])
        tt = np.array([[e["train_time"] for e in r["epochs"][:n]] for r in rs]).mean(0)
        c = COLORS.get(name)
        m, s = acc.mean(0), acc.std(0, ddof=1) if len(rs) > 1 else np.zeros(n)
        label = f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
        axes[0].plot(ep, m, color=c, label=label)
        axes[0].fill_between(ep, m - s, m + s, color=c, alpha=0.2, linewidth=0)
        axes[1].plot(tt, m, color=c, label=name, marker=".", markersize=3)
        axes[2].plot(ep, loss.mean(0), color=c, label=name)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (mean ± std)")
    axes[1].set(xlabel="training time (s)", ylabel="test accuracy (%)", title="accuracy against training time")
    axes[2].set(xlabel="epoch", ylabel="training loss (label-smoothed)", title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    # zoom the accuracy panels on the upper part of the curves
    finals = [r["final"]["test_acc"] for r in runs if r["final"]["test_acc"] == r["final"]["test_acc"]]
    if finals:
        lo = max(0.0, min(finals) - 10.0)
        for ax in axes[:2]:
            ax.set_ylim(lo, min(100.0, max(finals) + 2.0))
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shade_warmup(ax, warmup: int) -> None:
    if warmup > 0:
        ax.axvspan(0, warmup, color="0.85", alpha=0.5, linewidth=0, label="warm-up (all SAM)")


def window_fractions(sam_at, warmup: int, window: int, total: int):
    """The fraction of SAM steps in each *full* vSAM window after the warm-up.

    The controller's windows start at steps ``warmup + 1``, ``warmup + K``, ``warmup + 2K``, ...
    (1-based step numbers; the first window is K - 1 steps long: its boundary comes at the K-th
    step after the warm-up). A run usually ends inside a window; that partial window is left
    out: a few steps, forced to SAM by the quota, would show as a spike to 1. Returns
    ``(edges, fractions, partial)``: ``edges`` the first step of each full window followed by
    the step after the last one (``len(fractions) + 1`` values, none when there is no full
    window), ``partial`` the number of steps of the partial window left out (0: none)."""
    import numpy as np
    none = (np.zeros(0, np.int64), np.zeros(0))
    if total <= warmup:
        return none + (0,)
    starts = [warmup + 1] + list(range(warmup + window, total + 1, window))   # the windows begun by `total`
    ends = [warmup + window] + [s + window for s in starts[1:]]               # the step after each
    n_full = sum(e - 1 <= total for e in ends)                                # a prefix: all but maybe the last
    partial = total - starts[-1] + 1 if n_full < len(starts) else 0
    if not n_full:
        return none + (partial,)
    edges = np.array(starts[:n_full] + [ends[n_full - 1]], np.int64)
    counts, _ = np.histogram(np.asarray(sam_at, np.float64), bins=edges - 0.5)
    return edges, counts / np.diff(edges), partial


def plot_sampling(runs: List[dict], path: str, warmup: int, window: int, title: str = "") -> bool:
    """vSAM's sampling probability p = s/K and quota s per step (they change at window
    boundaries), and the fraction of SAM steps in each full window (:func:`window_fractions`:
    the run's last, partial window is left out and the panel says so). vsam and vsam-a are told
    apart by line style (:data:`LINE_STYLES`): solid and wide underneath, dashed on top. False
    when there is no vSAM run."""
    vs = [r for r in runs if r["optimizer"] in ("vsam", "vsam-a") and "trace" in r]
    if not vs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax in axes:
        _shade_warmup(ax, warmup)
    seen = set()
    partials = set()
    for r in vs:
        name = r["optimizer"]
        style = dict(color=COLORS.get(name), **LINE_STYLES.get(name, {}))
        label = name if name not in seen else None
        seen.add(name)
        tr = r["trace"]
        axes[0].step(tr["step"], tr["probability"], where="post", label=label, **style)
        axes[1].step(tr["step"], tr["quota"], where="post", label=label, **style)
        sam_at = r.get("sam_step_numbers", [])
        if len(sam_at):
            edges, frac, partial = window_fractions(sam_at, warmup, window, r["final"]["steps"])
            if partial:
                partials.add(partial)
            if len(frac):
                axes[2].step(edges, list(frac) + list(frac[-1:]), where="post", label=label, **style)
    axes[0].set(xlabel="step", ylabel="p = s / K (1 in warm-up)", title="sampling probability")
    axes[1].set(xlabel="step", ylabel="s (SAM steps wanted per window)", title=f"quota (window K = {window})")
    left_out = ""
    if partials:
        left_out = (f"\n(the last, partial window of {'/'.join(map(str, sorted(partials)))} of {window} steps "
                    f"is left out)")
    axes[2].set(xlabel="step", ylabel="SAM steps / window length",
                title="SAM-step fraction per full window" + left_out)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_psf(runs: List[dict], path: str, warmup: int, title: str = "") -> bool:
    """PSF norm and PSF/gradient-norm ratio (last L parameter tensors) at every SAM step of the
    vSAM runs (vsam: circles, vsam-a: crosses on top, :data:`MARKER_STYLES`). False when there
    is no vSAM run."""
    vs = [r for r in runs if r["optimizer"] in ("vsam", "vsam-a") and "psf" in r]
    if not vs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax in axes:
        _shade_warmup(ax, warmup)
    seen = set()
    for r in vs:
        name = r["optimizer"]
        style = dict(color=COLORS.get(name), linestyle="none", **MARKER_STYLES.get(name, dict(marker=".")))
        label = name if name not in seen else None
        seen.add(name)
        p = r["psf"]
        steps = p["step"]
        axes[0].plot(steps, p["psf_norm"], label=label, **style)
        ratio = [x if x is not None else float("nan") for x in p["ratio"]]
        axes[1].plot(steps, ratio, label=label, **style)
    axes[0].set(xlabel="step", ylabel="||PSF|| (last L tensors)", title="PSF norm at SAM steps")
    axes[1].set(xlabel="step", ylabel="||PSF|| / ||g||", title="PSF / gradient norm ratio at SAM steps")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, markerscale=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_all(runs: List[dict], optimizers: List[str], out_dir: str, warmup: int, window: int,
             title: str = "") -> Dict[str, Optional[str]]:
    """Every plot; returns {name: path or None (not drawn: no vSAM run)}."""
    paths = {"accuracy": os.path.join(out_dir, "accuracy.png"),
             "vsam_sampling": os.path.join(out_dir, "vsam_sampling.png"),
             "vsam_psf": os.path.join(out_dir, "vsam_psf.png")}
    plot_accuracy(runs, optimizers, paths["accuracy"], title)
    if not plot_sampling(runs, paths["vsam_sampling"], warmup, window, title):
        paths["vsam_sampling"] = None
    if not plot_psf(runs, paths["vsam_psf"], warmup, title):
        paths["vsam_psf"] = None
    return paths
