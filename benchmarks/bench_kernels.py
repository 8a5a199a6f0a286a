"""Micro-benchmark of every fused op of vsam_ext, every backend that runs on the device, against
the baselines, over a sweep of parameter counts and layer (tensor) counts.

Implementations (``impl`` column):

* ``vsam_ext[<backend>]``  the op of ``vsam_ext.ops.backend_module(backend)`` over flat buffers
  (``reference`` is the eager oracle; ``cpu``/``cuda`` the C++/CUDA extension; ``triton``);
* ``authors``   the authors' style: a Python loop over the parameters with eager ops and dict
  state (davda54/sam's ``old_p = p.data.clone()``, ``p.data = old_p``; vSAM's per-parameter
  ``g``/PSF clones, its statistics read back to the host); base steps are torch.optim.SGD/AdamW
  with ``foreach=False``;
* ``foreach``   a chain of ``torch._foreach_*`` ops over the per-layer tensors, in place; base
  steps are torch.optim.SGD/AdamW with ``foreach=True``;
* ``torch-fused``  torch.optim.SGD/AdamW with ``fused=True`` (the base steps only).

The baselines keep one tensor per layer, as a model does; vsam_ext keeps one flat buffer.

Bytes per op (fp32, N parameters, the fused design's traffic; every implementation of an op is
divided by the same count, so GB/s is an effective bandwidth):

    segment_sumsq   4N  read g (one sum per layer)
    perturb        16N  read p, g; write p, backup                       (SAM)
    perturb+keep   20N  ... and write a copy of g                        (vSAM)
    restore+psf    20N  read backup, g_sam, psf(=g); write p, psf         (+ 2 statistics)
    reuse          12N  read g, psf; write g
    sgd            20N  read p, g, m; write p, m
    sgd+reuse      24N  ... + read psf                                    (vSAM cheap step)
    sgd+restore    28N  read backup, g, psf, m; write p, psf, m           (SAM step, 2nd half)
    adamw          28N  read p, g, m, v; write p, m, v
    adamw+reuse    32N
    adamw+restore  36N
    copy            8N  dst.copy_(src): read + write (shown per size for reference)

``% copy`` is GB/s over the copy bandwidth ``dst.copy_(src)`` of a large buffer measured at the
start of the same run.

    python benchmarks/bench_kernels.py --device cuda                 # full sweep
    python benchmarks/bench_kernels.py --quick                       # CPU smoke run (CI)
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

from vsam_ext.ops import backend_module  # noqa: E402

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
BETAS, EPS, ADAMW_WD = (0.9, 0.999), 1e-8, 1e-2
COEFF = 0.7          # zeta ** age of the reused PSF
STAT_TENSORS = 10    # vSAM's statistics use the last L tensors

# op -> bytes per parameter (fp32), what is moved
OPS: Dict[str, tuple] = {
    "segment_sumsq": (4, "read g"),
    "perturb": (16, "read p,g; write p,backup"),
    "perturb+keep": (20, "read p,g; write p,backup,g copy"),
    "restore+psf": (20, "read backup,g_sam,psf; write p,psf"),
    "reuse": (12, "read g,psf; write g"),
    "sgd": (20, "read p,g,m; write p,m"),
    "sgd+reuse": (24, "read p,g,psf,m; write p,m"),
    "sgd+restore": (28, "read backup,g,psf,m; write p,psf,m"),
    "adamw": (28, "read p,g,m,v; write p,m,v"),
    "adamw+reuse": (32, "read p,g,psf,m,v; write p,m,v"),
    "adamw+restore": (36, "read backup,g,psf,m,v; write p,psf,m,v"),
    "copy": (8, "read src; write dst"),
}


def layer_sizes(n: int, layers: int) -> List[int]:
    """``n`` parameters over ``layers`` tensors of (nearly) equal size."""
    layers = max(1, min(layers, n))
    base = n // layers
    return [base] * (layers - 1) + [n - base * (layers - 1)]


def _randn(n: int, device, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, device=device).mul_(scale)


class FusedImpl:
    """One vsam_ext backend over flat buffers."""

    def __init__(self, backend: str, n: int, sizes: List[int], device) -> None:
        self.name = f"vsam_ext[{backend}]"
        self.kind = "fused" if backend != "reference" else "reference"
        m = backend_module(backend)
        p, g, mom, ea, eas, psf, backup = (_randn(n, device, s) for s in (0.1, 1e-3, 1e-3, 1e-3, 1e-6, 1e-4, 0.1))
        eas.abs_()
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        stat_start = bounds[max(0, len(sizes) - STAT_TENSORS)]
        scale = torch.tensor(0.05, device=device)
        self.tensors = (p, g, mom, ea, eas, psf, backup, scale)

        def sgd(psf_, backup_, coeff):
            return lambda: m.sgd_step(p, g, mom, psf_, backup_, coeff, stat_start, LR, WD, MOMENTUM, 0.0,
                                      False, False, False)

        def adamw(psf_, backup_, coeff):
            return lambda: m.adamw_step(p, g, ea, eas, psf_, backup_, coeff, stat_start, LR, BETAS[0], BETAS[1],
                                        EPS, ADAMW_WD, 10, False)
        self.ops: Dict[str, Callable] = {
            "segment_sumsq": lambda: m.segment_sumsq(g, bounds),
            "perturb": lambda: m.perturb(p, g, scale, backup, False, None),
            "perturb+keep": lambda: m.perturb(p, g, scale, backup, False, psf),
            "restore+psf": lambda: m.restore_psf_stats(p, backup, g, psf, stat_start),
            "reuse": lambda: m.reuse(g, psf, COEFF),
            "sgd": sgd(None, None, 0.0),
            "sgd+reuse": sgd(psf, None, COEFF),
            "sgd+restore": sgd(psf, backup, 0.0),
            "adamw": adamw(None, None, 0.0),
            "adamw+reuse": adamw(psf, None, COEFF),
            "adamw+restore": adamw(psf, backup, 0.0),
        }


class _PerLayer:
    """Per-layer tensors, as a model has them; torch optimizers built on them lazily."""

    def __init__(self, sizes: List[int], device) -> None:
        self.device = device
        self.ps = [torch.nn.Parameter(_randn(s, device, 0.1)) for s in sizes]
        for p in self.ps:
            p.grad = _randn(p.numel(), device, 1e-3)
        self.gs = [p.grad for p in self.ps]
        self.psfs = [_randn(p.numel(), device, 1e-4) for p in self.ps]
        self.last = slice(max(0, len(self.ps) - STAT_TENSORS), None)
        self.scale = torch.tensor(0.05, device=device)
        self._opts: Dict[str, torch.optim.Optimizer] = {}

    def opt(self, which: str, **flags) -> torch.optim.Optimizer:
        key = which + str(sorted(flags.items()))
        if key not in self._opts:
            if which == "sgd":
                o = torch.optim.SGD(self.ps, lr=LR, momentum=MOMENTUM, weight_decay=WD, **flags)
            else:
                o = torch.optim.AdamW(self.ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=ADAMW_WD, **flags)
            o.step()                     # creates the state (momentum buffer, exp_avg, ...)
            self._opts[key] = o
        return self._opts[key]


class AuthorsImpl(_PerLayer):
    """Python loop over the parameters with eager ops and dict state (davda54/sam, vSAM code)."""

    name, kind = "authors", "baseline"

    def __init__(self, sizes, device) -> None:
        super().__init__(sizes, device)
        self.state = {p: {"old_p": p.data.clone(), "g": g.clone(), "psf": s}
                      for p, g, s in zip(self.ps, self.gs, self.psfs)}
        sgd = self.opt("sgd", foreach=False)
        adamw = self.opt("adamw", foreach=False)
        self.ops = {
            "segment_sumsq": self.norms,
            "perturb": lambda: self.perturb(False),
            "perturb+keep": lambda: self.perturb(True),
            "restore+psf": self.restore,
            "reuse": self.reuse,
            "sgd": sgd.step,
            "sgd+reuse": lambda: (self.reuse(), sgd.step()),
            "sgd+restore": lambda: (self.restore(), sgd.step()),
            "adamw": adamw.step,
            "adamw+reuse": lambda: (self.reuse(), adamw.step()),
            "adamw+restore": lambda: (self.restore(), adamw.step()),
        }

    def norms(self):
        return torch.stack([p.grad.norm(p=2) for p in self.ps])

    def perturb(self, keep: bool):
        for p in self.ps:
            st = self.state[p]
            if keep:
                st["g"] = p.grad.clone()
            st["old_p"] = p.data.clone()
            p.add_(p.grad * self.scale.to(p))

    def restore(self):
        for p in self.ps:
            st = self.state[p]
            st["psf"] = p.grad - st["g"]
            p.data = st["old_p"]                  # davda54/sam: no copy, the saved tensor is taken
        last = self.ps[self.last]
        g_norm = torch.norm(torch.stack([self.state[p]["g"].norm(p=2) for p in last]), p=2)
        psf_norm = torch.norm(torch.stack([self.state[p]["psf"].norm(p=2) for p in last]), p=2)
        return torch.stack([g_norm, psf_norm]).tolist()     # the statistics read on the host

    def reuse(self):
        for p in self.ps:
            p.grad.add_(self.state[p]["psf"], alpha=COEFF)


class ForeachImpl(_PerLayer):
    """A chain of torch._foreach_* ops over the per-layer tensors; torch's foreach base steps."""

    name, kind = "foreach", "baseline"

    def __init__(self, sizes, device) -> None:
        super().__init__(sizes, device)
        self.backups = [p.detach().clone() for p in self.ps]
        self.params = [p.detach() for p in self.ps]
        sgd = self.opt("sgd", foreach=True)
        adamw = self.opt("adamw", foreach=True)
        self.ops = {
            "segment_sumsq": lambda: torch.stack(torch._foreach_norm(self.gs)),
            "perturb": lambda: self.perturb(False),
            "perturb+keep": lambda: self.perturb(True),
            "restore+psf": self.restore,
            "reuse": self.reuse,
            "sgd": sgd.step,
            "sgd+reuse": lambda: (self.reuse(), sgd.step()),
            "sgd+restore": lambda: (self.restore(), sgd.step()),
            "adamw": adamw.step,
            "adamw+reuse": lambda: (self.reuse(), adamw.step()),
            "adamw+restore": lambda: (self.restore(), adamw.step()),
        }

    def perturb(self, keep: bool):
        torch._foreach_copy_(self.backups, self.params)
        if keep:
            torch._foreach_copy_(self.psfs, self.gs)
        torch._foreach_add_(self.params, torch._foreach_mul(self.gs, self.scale))

    def restore(self):
        torch._foreach_copy_(self.params, self.backups)
        g_sq = torch._foreach_norm(self.psfs[self.last])
        torch._foreach_sub_(self.psfs, self.gs)      # g - g_sam
        torch._foreach_neg_(self.psfs)               # PSF = g_sam - g
        psf_sq = torch._foreach_norm(self.psfs[self.last])
        return torch.stack([torch.stack(g_sq).norm(), torch.stack(psf_sq).norm()])   # stays on the device

    def reuse(self):
        torch._foreach_add_(self.gs, self.psfs, alpha=COEFF)


class TorchFusedImpl(_PerLayer):
    name, kind = "torch-fused", "baseline"

    def __init__(self, sizes, device) -> None:
        super().__init__(sizes, device)
        self.ops = {"sgd": self.opt("sgd", fused=True).step, "adamw": self.opt("adamw", fused=True).step}


def default_sizes(device: torch.device, quick: bool, max_size: Optional[int]) -> List[int]:
    if quick:
        return [1 << 18, 1 << 20]
    # the largest N whose tensors fit: ~8 N-sized fp32 tensors of state plus the reference
    # backend's eager temporaries: 64 bytes per parameter
    largest = C.memory_budget_bytes(device) // 64
    if max_size:
        largest = min(largest, max_size)
    elif device.type == "cpu":
        # the eager reference backend takes seconds per call at 256 M on a few cores: a CPU sweep
        # stops at 64 M unless --max-size asks for more
        largest = min(largest, 64 << 20)
    largest = max(1 << 20, (largest // (1 << 20)) * (1 << 20))
    sizes, n = [], 1 << 20
    while n <= largest:
        sizes.append(n)
        n *= 4
    if largest > sizes[-1] * 1.5:
        sizes.append(largest)
    return sizes


def main(argv=None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--sizes", type=str, default=None,
                    help="comma-separated parameter counts, suffixes K/M/B allowed (default: 1M, 4M, 16M, ... "
                         "up to the largest that fits)")
    ap.add_argument("--max-size", type=str, default=None,
                    help="cap of the default size sweep, e.g. 1B (default: what fits in memory; 64M on cpu)")
    ap.add_argument("--layers", type=str, default=None, help="comma-separated layer counts (default 1,128,1024)")
    ap.add_argument("--ops", type=str, default=None, help=f"comma-separated subset of {list(OPS)}")
    ap.add_argument("--impls", type=str, default=None,
                    help="comma-separated subset of: reference, cpu, cuda, triton, authors, foreach, torch-fused")
    args = ap.parse_args(argv)
    device = C.setup(args)
    torch.set_grad_enabled(False)
    env = C.env_info(device)
    timer = C.Timer(device, args.quick)

    sizes = ([parse_count(s) for s in args.sizes.split(",")] if args.sizes else
             default_sizes(device, args.quick, parse_count(args.max_size) if args.max_size else None))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else ([1, 32] if args.quick else [1, 128, 1024])
    ops = args.ops.split(",") if args.ops else list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"--ops: unknown {unknown}; known {list(OPS)}")
    backends = C.backends_for(device)
    impl_names = [f"vsam_ext[{b}]" for b in backends] + ["authors", "foreach", "torch-fused"]
    impl_names = C.select_impls(impl_names, args.impls)

    copy_n = max(16 << 20, min(64 << 20, max(sizes))) if not args.quick else 16 << 20
    copy = C.measure_copy(device, timer, copy_n)
    copy_gbps = copy["gbps"]
    print(f"# copy bandwidth: dst.copy_(src), {C.fmt_count(copy_n)} fp32 elements: {copy['ms']:.3f} ms, "
          f"{copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)

    rows: List[dict] = []
    combos = [(n, l) for n in sizes for l in layers]
    bar = _progress(len(combos) * len(impl_names))
    for n, nl in combos:
        sizes_l = layer_sizes(n, nl)
        if "copy" in ops:
            _record(rows, device, "copy", n, len(sizes_l), "torch copy_", "reference",
                    C.time_copy(device, timer, n), copy_gbps)
        for impl_name in impl_names:
            bar.set_description(f"{C.fmt_count(n)} x{nl} {impl_name}")
            try:
                impl = _build(impl_name, n, sizes_l, device)
            except Exception as exc:  # noqa: BLE001
                if not C.is_oom(exc):
                    raise
                print(f"# {impl_name} at N={C.fmt_count(n)}, {nl} layers: out of memory building its state",
                      file=sys.stderr)
                impl = None
            for op in ops if impl is not None else []:
                fn = impl.ops.get(op)
                if fn is None:
                    continue
                try:
                    ms = timer(fn)
                except Exception as exc:  # noqa: BLE001
                    if not C.is_oom(exc):
                        raise
                    ms = None
                _record(rows, device, op, n, len(sizes_l), impl.name, impl.kind, ms, copy_gbps)
            del impl
            C.free_memory(device)
            bar.update(1)
    bar.close()
    _speedups(rows)

    base = f"bench_kernels_{device.type}"
    columns = ["device", "op", "bytes_per_param", "params", "layers", "impl", "kind", "ms", "gbps",
               "pct_copy", "x_vs_authors", "x_vs_foreach", "copy_gbps"]
    C.write_csv(os.path.join(args.out, base + ".csv"), rows, columns)
    body = _report(rows, ops, impl_names, copy, sizes, layers, device)
    print(C.env_block(env))
    print()
    print(body)
    C.write_report(args, "bench_kernels", device, env, body)
    if not args.no_plot:
        C.save_plot(_plot, rows, ops, impl_names, layers, copy_gbps, os.path.join(args.out, base + ".png"), env)
    print(f"\nwrote {os.path.join(args.out, base)}.*", file=sys.stderr)
    return 0


def parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "B": 1 << 30, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s.rstrip("KMBG")) * mult)


def _build(name: str, n: int, sizes: List[int], device):
    if name.startswith("vsam_ext["):
        return FusedImpl(name[len("vsam_ext["):-1], n, sizes, device)
    return {"authors": AuthorsImpl, "foreach": ForeachImpl, "torch-fused": TorchFusedImpl}[name](sizes, device)


def _record(rows, device, op, n, nl, impl, kind, ms, copy_gbps) -> None:
    per = OPS[op][0]
    gbps = per * n / ms / 1e6 if ms else None
    rows.append({"device": device.type, "op": op, "bytes_per_param": per, "params": n, "layers": nl,
                 "impl": impl, "kind": kind, "ms": ms, "gbps": gbps,
                 "pct_copy": 100 * gbps / copy_gbps if gbps else None, "copy_gbps": copy_gbps})


def _speedups(rows) -> None:
    by = {(r["op"], r["params"], r["layers"], r["impl"]): r["ms"] for r in rows}
    for r in rows:
        for other, col in (("authors", "x_vs_authors"), ("foreach", "x_vs_foreach")):
            t = by.get((r["op"], r["params"], r["layers"], other))
            r[col] = t / r["ms"] if (t and r["ms"]) else None


def _report(rows, ops, impl_names, copy, sizes, layers, device) -> str:
    out = [f"Copy bandwidth (same run): `dst.copy_(src)` of {C.fmt_count(copy['numel'])} fp32 elements, "
           f"{copy['ms']:.3f} ms = **{copy['gbps']:.1f} GB/s** (read + write).",
           "Bytes per op are the fused design's traffic (see bench_kernels.py); every implementation of an op "
           "is divided by the same bytes, so GB/s is effective bandwidth. Cells: `ms / GB/s / % of copy`.",
           ""]
    for op in ops:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        impls = [i for i in impl_names + ["torch copy_"] if any(r["impl"] == i for r in op_rows)]
        table = []
        for n in sizes:
            for nl in sorted({r["layers"] for r in op_rows if r["params"] == n}):
                line = {"params": C.fmt_count(n), "layers": nl}
                for i in impls:
                    r = next((r for r in op_rows if r["params"] == n and r["layers"] == nl and r["impl"] == i), None)
                    line[i] = ("OOM" if r["ms"] is None else
                               f"{r['ms']:.3g} / {r['gbps']:.0f} / {r['pct_copy']:.0f}%") if r else "-"
                table.append(line)
        out.append(f"### {op} ({OPS[op][0]} bytes/param: {OPS[op][1]})\n")
        out.append(C.markdown_table(table, ["params", "layers"] + impls))
        out.append("")
    out.append(_targets(rows, device))
    return "\n".join(out)


def _targets(rows, device) -> str:
    """GPU target: fused ops >= 85% of copy bandwidth at >= 50 M parameters."""
    lines = ["### Target: fused ops >= 85% of the copy bandwidth at >= 50 M parameters"
             + ("" if device.type == "cuda" else " (a GPU target; shown for information on CPU)"), ""]
    fused = sorted({r["impl"] for r in rows if r["kind"] == "fused"})
    big = [r for r in rows if r["kind"] == "fused" and r["params"] >= 50_000_000 and r["ms"]]
    if not big:
        lines.append("no fused rows at >= 50 M parameters in this run")
        return "\n".join(lines)
    table = []
    for impl in fused:
        mine = [r for r in big if r["impl"] == impl]
        for op in sorted({r["op"] for r in mine}, key=list(OPS).index):
            worst = min((r for r in mine if r["op"] == op), key=lambda r: r["pct_copy"])
            table.append({"impl": impl, "op": op, "worst % copy": f"{worst['pct_copy']:.0f}%",
                          "at": f"{C.fmt_count(worst['params'])} x{worst['layers']}",
                          "met": "yes" if worst["pct_copy"] >= 85 else "no"})
    lines.append(C.markdown_table(table, ["impl", "op", "worst % copy", "at", "met"]))
    return "\n".join(lines)


def _plot(rows, ops, impl_names, layers, copy_gbps, path, env) -> None:
    plt = C.plt()
    show_layers = sorted(layers)[len(layers) // 2]
    ops = [o for o in ops if o != "copy"]
    cols = 4
    nrows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r["op"] == op and r["layers"] == show_layers]
        C.gbps_panel(ax, mine, impl_names, copy_gbps, f"{op} ({OPS[op][0]} B/param)", "parameters")
    spare = list(axes.flat)[len(ops):]
    for ax in spare:
        ax.axis("off")
    C.legend_all(fig, list(axes.flat)[:len(ops)], spare[0] if spare else None)
    fig.suptitle(f"vsam_ext fused ops, {show_layers} layers — {env['device']}\n"
                 f"torch {env['torch']}, triton {env['triton']}, {env['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 if spare else 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _NoBar:
    def set_description(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, file=sys.stderr, leave=False, mininterval=1.0, disable=not sys.stderr.isatty())
    except ImportError:
        return _NoBar()


if __name__ == "__main__":
    sys.exit(main())
