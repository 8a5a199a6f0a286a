"""Tensor lists vs flat buffers on the CPU: the cpu backend's ``*_list`` ops (one call, one
parallel loop over every tensor) against the flat op over one buffer of the same elements, at a
model's parameter shapes (``model_shapes.param_shapes``), fp32.

Implementations (columns):

* ``flat``  the flat op (``vsam_ext.ops.extension.<op>``) over one 1-D buffer per argument;
* ``list``  the list op over the model's tensors, each allocated on its own as a model's
  parameters (or FSDP2 shards, or a base optimizer's state) are;
* ``loop``  the naive form: a Python loop calling the flat op on each tensor (``t.view(-1)``),
  the sums/statistics stacked and added, for comparison.

Ops (fp32, N parameters, the bytes the fused design moves; bench_kernels.py's counts):

    sgd+reuse         24N  vSAM reuse step: sgd_step, momentum, g + coeff * PSF
    segment_sumsq      4N  SAM step 1/3: the per-tensor norms of g
    perturb+keep      20N  SAM step 2/3: ascent, backup of p, copy of g
    sgd+restore+psf   28N  SAM step 3/3: restore p, PSF = g_sam - g with statistics, SGD-momentum
    adamw             28N  AdamW step
    copy               8N  dst.copy_(src) of N fp32 elements: the bandwidth reference

The machine may be shared: the implementations of an op are timed in rounds, interleaved (the
order rotated each round), each timing the median of repeated runs with the caches flushed
(``_common.Timer``); ms is the median over the rounds, and list/flat (loop/flat) the median over
the rounds of flat's time / the list's time in the same round (paired: a slow spell of the machine
hits both). Criterion (the issue): the list path within 5 % of the flat path's bandwidth, i.e.
list/flat >= 0.95.

    python benchmarks/bench_lists.py --threads 2 --results-md benchmarks/RESULTS.md
    python benchmarks/bench_lists.py --quick          # smoke run (CI): resnet18's first 24 tensors, one round
"""
from __future__ import annotations

import math
import os
import statistics
import sys
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

from model_shapes import param_shapes  # noqa: E402

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
BETAS, EPS, ADAMW_WD = (0.9, 0.999), 1e-8, 1e-2
COEFF = 0.7          # zeta ** age of the reused PSF
STAT_TENSORS = 10    # vSAM's statistics: the last L tensors

OPS: Dict[str, tuple] = {
    "sgd+reuse": (24, "vSAM reuse step"),
    "segment_sumsq": (4, "SAM step 1/3"),
    "perturb+keep": (20, "SAM step 2/3"),
    "sgd+restore+psf": (28, "SAM step 3/3"),
    "adamw": (28, "AdamW step"),
}
SAM_STEP = ("segment_sumsq", "perturb+keep", "sgd+restore+psf")
IMPLS = ["flat", "list", "loop"]


class Buffers:
    """The arguments of every op, flat (one buffer each) or as a list of tensors of ``shapes``."""

    NAMES = ("p", "g", "mom", "psf", "backup", "ea", "eas")

    def __init__(self, shapes, flat: bool) -> None:
        self.numels = [math.prod(s) for s in shapes]
        n = sum(self.numels)
        gen = torch.Generator().manual_seed(0)
        self.t: Dict[str, object] = {}
        for k, name in enumerate(self.NAMES):
            scale = (0.1, 1e-3, 1e-3, 1e-4, 0.1, 1e-3, 1e-6)[k]
            if flat:
                self.t[name] = torch.randn(n, generator=gen).mul_(scale)
            else:
                self.t[name] = [torch.randn(s, generator=gen).mul_(scale) for s in shapes]
        for x in (self.t["eas"] if not flat else [self.t["eas"]]):
            x.abs_()
        self.bounds = [0]
        for m in self.numels:
            self.bounds.append(self.bounds[-1] + m)
        self.stat_first = max(0, len(shapes) - STAT_TENSORS)
        self.scale = torch.tensor(0.05)


def flat_ops(b: Buffers, E) -> Dict[str, Callable]:
    p, g, mom, psf, backup, ea, eas = (b.t[k] for k in Buffers.NAMES)
    st = b.bounds[b.stat_first]
    return {
        "sgd+reuse": lambda: E.sgd_step(p, g, mom, psf, None, COEFF, st, LR, WD, MOMENTUM, 0.0, False, False, False),
        "segment_sumsq": lambda: E.segment_sumsq(g, b.bounds),
        "perturb+keep": lambda: E.perturb(p, g, b.scale, backup, False, psf),
        "sgd+restore+psf": lambda: E.sgd_step(p, g, mom, psf, backup, 0.0, st, LR, WD, MOMENTUM, 0.0, False, False,
                                              False),
        "adamw": lambda: E.adamw_step(p, g, ea, eas, None, None, 0.0, st, LR, BETAS[0], BETAS[1], EPS, ADAMW_WD, 10,
                                      False),
    }


def list_ops(b: Buffers, E) -> Dict[str, Callable]:
    p, g, mom, psf, backup, ea, eas = (b.t[k] for k in Buffers.NAMES)
    sf = b.stat_first
    return {
        "sgd+reuse": lambda: E.sgd_step_list(p, g, mom, psf, None, COEFF, sf, LR, WD, MOMENTUM, 0.0, False, False,
                                             False),
        "segment_sumsq": lambda: E.segment_sumsq_list(g),
        "perturb+keep": lambda: E.perturb_list(p, g, b.scale, backup, False, psf),
        "sgd+restore+psf": lambda: E.sgd_step_list(p, g, mom, psf, backup, 0.0, sf, LR, WD, MOMENTUM, 0.0, False,
                                                   False, False),
        "adamw": lambda: E.adamw_step_list(p, g, ea, eas, None, None, 0.0, sf, LR, BETAS[0], BETAS[1], EPS, ADAMW_WD,
                                           10, False),
    }


def loop_ops(b: Buffers, E) -> Dict[str, Callable]:
    """The flat op called per tensor from Python (each tensor seen as a 1-D buffer)."""
    views = {k: [x.view(-1) for x in b.t[k]] for k in Buffers.NAMES}
    p, g, mom, psf, backup, ea, eas = (views[k] for k in Buffers.NAMES)
    idx = range(len(p))
    sf = b.stat_first

    def st(i):
        return 0 if i >= sf else p[i].numel()

    def stats(rows):
        rows = [r for r in rows if r is not None]
        return torch.stack(rows).sum(0) if rows else None

    return {
        "sgd+reuse": lambda: [E.sgd_step(p[i], g[i], mom[i], psf[i], None, COEFF, st(i), LR, WD, MOMENTUM, 0.0,
                                         False, False, False) for i in idx],
        "segment_sumsq": lambda: torch.cat([E.segment_sumsq(g[i], [0, g[i].numel()]) for i in idx]),
        "perturb+keep": lambda: [E.perturb(p[i], g[i], b.scale, backup[i], False, psf[i]) for i in idx],
        "sgd+restore+psf": lambda: stats([E.sgd_step(p[i], g[i], mom[i], psf[i], backup[i], 0.0, st(i), LR, WD,
                                                     MOMENTUM, 0.0, False, False, False) for i in idx]),
        "adamw": lambda: [E.adamw_step(p[i], g[i], ea[i], eas[i], None, None, 0.0, st(i), LR, BETAS[0], BETAS[1],
                                       EPS, ADAMW_WD, 10, False) for i in idx],
    }


def measure(model: str, ops: List[str], impls: List[str], rounds: int, timer: C.Timer, E,
            first_tensors: int = 0) -> List[dict]:
    shapes = param_shapes(model)
    if first_tensors:
        shapes = shapes[:first_tensors]
    n = sum(math.prod(s) for s in shapes)
    flat, lst = Buffers(shapes, flat=True), Buffers(shapes, flat=False)
    fns = {"flat": flat_ops(flat, E), "list": list_ops(lst, E), "loop": loop_ops(lst, E)}
    src, dst = torch.randn(n), torch.empty(n)
    times: Dict[tuple, List[float]] = {}
    for r in range(rounds):
        for op in ops + ["copy"]:
            order = ["copy"] if op == "copy" else impls[r % len(impls):] + impls[:r % len(impls)]
            for impl in order:
                fn = (lambda: dst.copy_(src)) if op == "copy" else fns[impl][op]
                times.setdefault((op, impl), []).append(timer(fn))
    copy_ms = statistics.median(times[("copy", "copy")])
    copy_gbps = 8 * n / copy_ms / 1e6
    if all(o in ops for o in SAM_STEP):        # the SAM step: the sum of its three ops, round by round
        for impl in impls:
            times[("sam", impl)] = [sum(times[(o, impl)][r] for o in SAM_STEP) for r in range(rounds)]
    rows = []
    for op in ops + (["sam"] if ("sam", impls[0]) in times else []):
        per = sum(OPS[o][0] for o in SAM_STEP) if op == "sam" else OPS[op][0]
        row = {"model": model, "params": n, "tensors": len(shapes), "bytes_per_param": per,
               "op": "SAM step (sum of 1/3-3/3)" if op == "sam" else op, "copy_gbps": copy_gbps, "rounds": rounds}
        for impl in impls:
            ms = statistics.median(times[(op, impl)])
            row[f"{impl}_ms"] = ms
            row[f"{impl}_gbps"] = per * n / ms / 1e6
            row[f"{impl}_pct_copy"] = 100 * row[f"{impl}_gbps"] / copy_gbps
            row[f"{impl}_spread"] = (max(times[(op, impl)]) - min(times[(op, impl)])) / ms
            if impl != "flat" and "flat" in impls:
                # paired: flat's time over this one's in the same round, the median over the rounds
                row[f"{impl}_vs_flat"] = statistics.median(
                    f / t for f, t in zip(times[(op, "flat")], times[(op, impl)]))
        rows.append(row)
    for row in rows:
        row["copy_ms"] = copy_ms
    del flat, lst, fns, src, dst
    C.free_memory(torch.device("cpu"))
    return rows


def report(rows: List[dict], impls: List[str]) -> str:
    out = ["Cells: `ms / GB/s / % of copy`; GB/s counts the bytes each op moves (fp32, see bench_lists.py); "
           "copy: `dst.copy_(src)` of the model's N fp32 elements, timed in the same rounds (its destination is "
           "only written, so the CPU also reads it in (write-allocate), 12 bytes moved for the 8 counted; the ops "
           "write mostly what they have just read, so they can pass 100 %). "
           "`list/flat` and `loop/flat`: flat's time / theirs in the same round, median over the rounds "
           "(> 1: faster than flat); "
           "criterion: list/flat >= 0.95 (the list path within 5 % of the flat path's bandwidth).", ""]
    table = []
    for r in rows:
        line = {"model": r["model"], "op": r["op"], "B/param": r["bytes_per_param"]}
        for impl in impls:
            line[impl] = f"{r[impl + '_ms']:.3g} / {r[impl + '_gbps']:.1f} / {r[impl + '_pct_copy']:.0f}%"
        for impl in impls:
            if impl != "flat" and "flat" in impls:
                line[f"{impl}/flat"] = f"{r[impl + '_vs_flat']:.3f}"
        if "list" in impls and "flat" in impls:
            line["within 5%"] = "yes" if r["list_vs_flat"] >= 0.95 else "NO"
        table.append(line)
    cols = ["model", "op", "B/param"] + impls + [f"{i}/flat" for i in impls if i != "flat" and "flat" in impls]
    if "list" in impls and "flat" in impls:
        cols.append("within 5%")
    out.append(C.markdown_table(table, cols))
    out.append("")
    models = []
    for r in rows:
        if r["model"] not in models:
            models.append(r["model"])
    for m in models:
        r = next(r for r in rows if r["model"] == m)
        out.append(f"* {m}: {r['params']:,} parameters in {r['tensors']} tensors; copy {r['copy_ms']:.3g} ms = "
                   f"{r['copy_gbps']:.1f} GB/s; {r['rounds']} round(s) per cell.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--models", default=None, help="comma-separated model_shapes names (default resnet50,gpt2; "
                                                   "resnet18 with --quick)")
    ap.add_argument("--ops", default=None, help=f"comma-separated subset of {list(OPS)}")
    ap.add_argument("--impls", default=None, help=f"comma-separated subset of {IMPLS}")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 5; 1 with --quick)")
    ap.add_argument("--first-tensors", type=int, default=None,
                    help="only each model's first K tensors (default all; 24 with --quick)")
    args = ap.parse_args(argv)
    device = C.setup(args)
    if device.type != "cpu":
        ap.error("the list ops are CPU kernels: --device cpu")
    from vsam_ext.ops import available_backends
    if "cpu" not in available_backends():
        sys.exit("the cpu backend is not built (python setup.py build_ext --inplace)")
    from vsam_ext.ops import extension as E
    torch.set_grad_enabled(False)
    models = args.models.split(",") if args.models else (["resnet18"] if args.quick else ["resnet50", "gpt2"])
    ops = args.ops.split(",") if args.ops else list(OPS)
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    bad = [o for o in ops if o not in OPS] + [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"unknown {bad}; ops {list(OPS)}, impls {IMPLS}")
    rounds = args.rounds or (1 if args.quick else 5)
    first = args.first_tensors if args.first_tensors is not None else (24 if args.quick else 0)
    env = C.env_info(device)
    timer = C.Timer(device, args.quick)
    rows = []
    for model in models:
        print(f"# {model} ...", file=sys.stderr, flush=True)
        rows += measure(model, ops, impls, rounds, timer, E, first)
    body = report(rows, impls)
    title = "## Tensor lists vs flat buffers (CPU)" + (" (--quick smoke run: not a measurement)" if args.quick else "")
    title += f" — {args.label}" if args.label else ""
    md = f"{title}\n\n{C.env_block(env)}\n\n{body}\n"
    print(md)
    base = os.path.join(args.out, "bench_lists_cpu")
    with open(base + ".md", "w") as f:
        f.write(md)
    cols = ["model", "params", "tensors", "op", "bytes_per_param", "copy_ms", "copy_gbps", "rounds"] + \
        [f"{i}_{k}" for i in impls for k in ("ms", "gbps", "pct_copy", "spread")] + \
        [f"{i}_vs_flat" for i in impls if i != "flat"]
    C.write_csv(base + ".csv", rows, cols)
    if args.results_md:
        C.update_results(args.results_md, "bench_lists cpu", md)
    print(f"wrote {base}.md, .csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
