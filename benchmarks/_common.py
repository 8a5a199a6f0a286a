"""Shared plumbing of the benchmark scripts: arguments, timing, copy bandwidth, output.

Timing
  * CUDA: ``triton.testing.do_bench`` (median, L2 cache flushed before every run, warm-up runs
    excluded). It times with CUDA events, so a step that is bound by host work (Python loops,
    kernel launches) is timed at its host cost: the events see the device idle in between.
  * CPU: the median of repeated wall-clock runs after warm-up runs; a buffer twice the size of the
    last-level cache (64 MiB at least) is written between runs so that, as on the GPU, no run
    starts with its data in the caches.

Bytes are counted as ``benchmarks/README.md`` says (the fused design's traffic, DESIGN.md's
performance model); every implementation of an op is divided by the same count, so GB/s is an
*effective* bandwidth and its ratio to the copy bandwidth says how close to the floor it is.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib.util
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:              # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, REPO)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

MB = 1 << 20


# -- arguments ---------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repeats: a CPU smoke run (CI), not a measurement")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="folder for the CSV, PNG and markdown (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --quick, a smoke run on a shared CI machine "
                        "where oversubscribed OpenMP threads can make torch's CPU ops 50x slower)")
    p.add_argument("--results-md", default=None, metavar="PATH",
                   help="also put this run's tables into PATH (e.g. benchmarks/RESULTS.md), replacing "
                        "the section of the same script and device")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--label", default="", help="a note for the report's title, e.g. 'noisy: shared machine'")
    return p


def setup(args) -> torch.device:
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
        torch.cuda.set_device(dev.index or 0)
        dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        sys.exit(f"--device must be cpu or cuda, got {args.device!r}")
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    os.makedirs(args.out, exist_ok=True)
    return dev


# -- environment -------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def env_info(device: torch.device) -> Dict[str, str]:
    """Device, versions, date and the exact command: the header of every result."""
    try:
        import triton
        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = "not installed"
    import vsam_ext
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_v,
        "vsam_ext": f"{vsam_ext.__version__} (git {_git()}), backends {vsam_ext.available_backends()}",
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }


def backends_for(device: torch.device) -> List[str]:
    """The vsam_ext backends that run on ``device`` (Triton under its CPU interpreter is a test
    tool, not a backend to time)."""
    from vsam_ext import available_backends
    have = available_backends()
    want = ["reference", "cpu"] if device.type == "cpu" else ["reference", "triton", "cuda"]
    return [b for b in want if b in have]


def select_impls(impls: List[str], wanted: Optional[str]) -> List[str]:
    """``impls`` filtered by a comma-separated ``--impls`` value; a backend may be named alone
    (``cpu`` for ``vsam_ext[cpu]``)."""
    if not wanted:
        return impls
    names = {w.strip() for w in wanted.split(",")}
    short = lambda i: i[len("vsam_ext["):-1] if i.startswith("vsam_ext[") else i  # noqa: E731
    unknown = names - {i for i in impls} - {short(i) for i in impls}
    if unknown:
        sys.exit(f"--impls: {sorted(unknown)} not available here; available: {[short(i) for i in impls]}")
    return [i for i in impls if i in names or short(i) in names]


def gbps_panel(ax, rows, impls, copy_gbps, title, xlabel, ms=3) -> None:
    """One log-log panel of effective GB/s against parameter count: a line per implementation
    (``rows`` already filtered to this panel; ours solid, baselines dashed) and the copy
    bandwidth as a dotted line."""
    for impl in impls:
        pts = sorted((r["params"], r["gbps"]) for r in rows if r["impl"] == impl and r.get("gbps"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=ms, color=f"C{impls.index(impl)}",
                    ls="-" if impl.startswith("vsam_ext") else "--", label=impl)
    ax.axhline(copy_gbps, color="k", lw=0.8, ls=":", label="copy")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("effective GB/s", fontsize=8)
    ax.tick_params(labelsize=7)


def legend_all(fig, axes, spare=None) -> None:
    """One legend with every line of every subplot: in the ``spare`` (empty) subplot if given,
    else at the right of the figure."""
    seen = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if spare is not None:
        spare.legend(list(seen.values()), list(seen), loc="center", fontsize=8)
    else:
        fig.legend(list(seen.values()), list(seen), loc="center right", fontsize=7)


def fused_backends(device: torch.device) -> List[str]:
    return [b for b in backends_for(device) if b != "reference"]


# -- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``timer(fn)`` -> median milliseconds of one call of ``fn`` (see the module docstring)."""

    def __init__(self, device: torch.device, quick: bool = False) -> None:
        self.device = device
        self.quick = quick
        if device.type == "cuda":
            from triton.testing import do_bench
            self._do_bench = do_bench
            self.warmup_ms, self.rep_ms = (5, 20) if quick else (25, 100)
        else:
            self.min_reps, self.max_reps = (3, 5) if quick else (3, 30)
            self.budget_s = 0.15 if quick else 1.0          # time to spend on the measured runs
            self._flush = torch.empty(_flush_bytes() // 4, dtype=torch.float32)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()                                          # warm-up: first-call allocations, lazy state
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_s / max(first, 1e-6))))
        times = []
        for _ in range(reps):
            self._flush.zero_()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def _flush_bytes() -> int:
    """Twice the last-level cache, at least 64 MiB."""
    size = 0
    for index in range(4):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            size = max(size, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            pass
    return max(64 * MB, 2 * size)


def time_copy(device: torch.device, timer: Timer, numel: int) -> float:
    """Milliseconds of ``dst.copy_(src)``, two fp32 buffers of ``numel`` elements (freed on return)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def measure_copy(device: torch.device, timer: Timer, numel: int) -> Dict[str, float]:
    """The copy bandwidth: ``dst.copy_(src)`` of ``numel`` fp32 elements, read + write counted."""
    ms = time_copy(device, timer, numel)
    free_memory(device)
    return {"numel": numel, "ms": ms, "gbps": 2 * 4 * numel / ms / 1e6}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_budget_bytes(device: torch.device) -> int:
    """Bytes this run may use for tensors: 85% of what is free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info.get("MemAvailable", 8 << 30) * 0.85)
    except OSError:
        return 8 << 30


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() \
        or isinstance(exc, MemoryError)


# -- the optimizer's view of a backward ----------------------------------------------------------
def simulate_backward(opt) -> None:
    """Record what autograd's gradient hooks record during a real backward: every managed
    parameter got a gradient, and the flat gradient buffer is dirty (so the optimizer's own
    in-place zeroing does its real work). The gradient *values* stay as they are: the
    benchmarks time the optimizer alone, with the backward replaced by nothing."""
    flat = getattr(opt, "flat", None)
    received = getattr(flat, "_received", None)
    if received is None or not hasattr(flat, "_dirty"):
        raise RuntimeError("vsam_ext.flat.FlatParams no longer has _received/_dirty: update "
                           "benchmarks/_common.simulate_backward to the new gradient bookkeeping")
    received[:] = [True] * len(received)           # in place: the hooks hold this list
    flat._dirty = True


# -- output ------------------------------------------------------------------------------------
def fmt_count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{suffix}" if v >= 100 or v == int(v) else f"{v:.3g}{suffix}"
    return str(int(n))


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    headers = list(headers or columns)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [bool(cells) and all(_numeric(c[i]) for c in cells) for i in range(len(headers))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |"
    return "\n".join([line(headers), sep] + [line(c) for c in cells])


def _numeric(s: str) -> bool:
    s = s.replace(",", "").rstrip("x%")
    try:
        float(s)
        return True
    except ValueError:
        return s == "-"


def env_block(env: Dict[str, str]) -> str:
    return "\n".join(f"* {k}: `{v}`" if k == "command" else f"* {k}: {v}" for k, v in env.items())


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def write_report(args, name: str, device: torch.device, env: Dict[str, str], body: str) -> str:
    """Writes ``<out>/<name>_<device>.md`` and, with ``--results-md``, replaces this script's
    section of that file. Returns the markdown."""
    title = f"## {name} — {device.type}" + (" (--quick smoke run: not a measurement)" if args.quick else "") \
        + (f" — {args.label}" if args.label else "")
    md = f"{title}\n\n{env_block(env)}\n\n{body.strip()}\n"
    with open(os.path.join(args.out, f"{name}_{device.type}.md"), "w") as f:
        f.write(md)
    if args.results_md:
        update_results(args.results_md, f"{name} {device.type}", md)
    return md


def update_results(path: str, key: str, md: str) -> None:
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{begin}\n{md.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def save_plot(plot_fn, *args) -> None:
    """Runs ``plot_fn(*args)``; without matplotlib, says so and goes on (the CSV and tables
    are written anyway)."""
    try:
        missing = importlib.util.find_spec("matplotlib") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        print("# matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    plot_fn(*args)
