"""The whole optimizer step (host and device work; forward and backward excluded) at the parameter
shapes of real models: base SGD, a SAM step, a vSAM sampling step and a vSAM reuse step.

How the optimizer alone is timed: every parameter gets a fixed random gradient once; a step is
then the optimizer's own calls with the backward(s) replaced by nothing. For vsam_ext that is
``first_step()`` then ``second_step()`` (the two-call form), with the bookkeeping that autograd's
hooks would do in a backward recorded by hand (``_common.simulate_backward``), so the
optimizer's in-place gradient zeroing does its real work. The second backward of a SAM step is
replaced by nothing: the gradients stay as they are (zero for vsam_ext, which zeroes them in
``first_step()``; unchanged for the baselines, which would set them to None). The kind of
step is forced: ``opt.controller.decide`` is replaced by a constant (a VSAM built with
``warmup_steps=0``; one SAM step first forms the PSF; the reuse rows reset ``psf_age`` each step
so that every step adds ``zeta * PSF``).

Implementations (``impl``):

* ``vsam_ext[<backend>]``  SAM / VSAM / PeriodicSAM (its cheap step is the plain base step)
  around torch.optim.SGD, with the base step fused into the backend's ops;
* ``vsam_ext[<backend>/in_place]``  the same with ``param_storage="in_place"`` (the layout of
  FSDP2's shards: tensor lists, the parameters and gradients where they live); its simulated
  backward hands each parameter its gradient tensor (``p.grad = g``, what autograd does for a
  gradient that is None), so its "zero grads" costs nothing;
* ``authors``  per-parameter Python loops with dict state: davda54/sam's SAM
  (``old_p = p.data.clone()``, ``p.add_(g * scale)``, ``p.data = old_p``), the vSAM authors'
  ``g`` and PSF clones, its statistics read on the host (``.tolist()``, a sync), reuse
  ``p.grad.add_(psf, alpha=zeta**a)``; base step torch.optim.SGD(foreach=False);
* ``foreach``  the same maths as a ``torch._foreach_*`` chain, statistics left on the device;
  base step torch.optim.SGD(foreach=True);
* ``torch-fused``  torch.optim.SGD(fused=True) (the base step only).

Bytes per step (fp32, N parameters; fused design, DESIGN.md's model made exact):

    sgd             20N  read p, g, m; write p, m
    sam             44N  norm 4N + perturb 16N + zero grads 4N + restore & SGD 20N
    vsam_sampling   56N  norm 4N + perturb, keep g 20N + zero grads 4N + restore, PSF & SGD 28N
    vsam_reuse      24N  read p, g, PSF, m; write p, m

(DESIGN.md's "~48N" for a sampling step leaves out the copy of g and the zeroing.)

    python benchmarks/bench_step.py --device cuda
    python benchmarks/bench_step.py --quick           # CPU smoke run: ResNet-18 shapes
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import model_shapes  # noqa: E402

import torch  # noqa: E402

from vsam_ext import SAM, VSAM, PeriodicSAM  # noqa: E402

LR, MOMENTUM, WD, RHO, ZETA = 0.1, 0.9, 5e-4, 0.05, 0.7
STAT_TENSORS = 10
EPS = 1e-12

STEPS: Dict[str, tuple] = {
    "sgd": (20, "base SGD-momentum step"),
    "sam": (44, "SAM step: norm, perturb, zero grads, restore + SGD"),
    "vsam_sampling": (56, "vSAM sampling step: norm, perturb + keep g, zero grads, restore + PSF + stats + SGD"),
    "vsam_reuse": (24, "vSAM reuse step: g + zeta*PSF + SGD"),
}
TARGETS = [
    # (device type, step, model, ours vs impl, ratio)
    ("cuda", "vsam_reuse", "resnet50", "foreach", 3.0),
    ("cuda", "vsam_reuse", "resnet50", "authors", 10.0),
    ("cpu", "vsam_reuse", "resnet18", "vsam_ext[reference]", 2.5),
]


def make_params(shapes, device) -> List[torch.nn.Parameter]:
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device).mul_(0.02))
        p.grad = torch.randn(s, device=device).mul_(1e-3)
        ps.append(p)
    return ps


def _force(opt, sample: bool) -> None:
    opt.controller.decide = (lambda: True) if sample else (lambda: False)


def build_ours(step: str, backend: str, shapes, device) -> Callable[[], None]:
    backend, _, storage = backend.partition("/")
    ps = make_params(shapes, device)
    grads = [p.grad for p in ps]
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, param_storage=storage or "flat")
    if step == "sgd":
        opt = PeriodicSAM(ps, torch.optim.SGD, period=1, rho=RHO, backend=backend, **kw)
        _force(opt, False)
    elif step == "sam":
        opt = SAM(ps, torch.optim.SGD, rho=RHO, backend=backend, **kw)
    else:
        opt = VSAM(ps, torch.optim.SGD, rho=RHO, warmup_steps=0, stat_tensors=STAT_TENSORS,
                   reuse_decay=ZETA, backend=backend, **kw)
        _force(opt, True)
    if opt.backend != backend:
        raise RuntimeError(f"asked for backend {backend!r}, the optimizer uses {opt.backend!r}")
    reuse = step == "vsam_reuse"

    def backward():
        if storage:
            for p, g in zip(ps, grads):      # autograd hands the new gradient over
                p.grad = g
        else:
            C.simulate_backward(opt)         # the backward's gradient hooks

    def fn():
        if reuse:
            opt.psf_age = 0                  # every step reuses the PSF with weight zeta ** 1
        backward()
        if opt.first_step() and storage:
            backward()                       # the second forward/backward: its gradients only
        opt.second_step()

    fn()                                     # first step: state, backup, PSF
    if reuse:
        _force(opt, False)
        fn()
        if not opt.has_psf:
            raise RuntimeError("the VSAM reuse rows need a PSF, and there is none")
    if getattr(opt, "_fused_base", None) is None:
        print(f"# warning: vsam_ext[{backend}] {step}: base step not fused", file=sys.stderr)
    fn.opt = opt
    return fn


class Authors:
    """Per-parameter Python loops with dict state (davda54/sam; the vSAM authors' code)."""

    def __init__(self, step: str, shapes, device, foreach_base: bool = False) -> None:
        self.ps = make_params(shapes, device)
        self.base = torch.optim.SGD(self.ps, lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=foreach_base)
        self.base.step()
        self.state = {p: {"psf": torch.randn_like(p).mul_(1e-4)} for p in self.ps}
        self.last = self.ps[-STAT_TENSORS:]
        self.fn = {"sgd": self.base.step, "sam": lambda: self.sam(False), "vsam_sampling": lambda: self.sam(True),
                   "vsam_reuse": self.reuse_step}[step]

    def sam(self, vsam: bool):
        # first_step
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.ps]), p=2)
        scale = RHO / (grad_norm + EPS)
        for p in self.ps:
            st = self.state[p]
            if vsam:
                st["g"] = p.grad.clone()
            st["old_p"] = p.data.clone()
            p.add_(p.grad * scale.to(p))
        # (the second forward/backward: replaced by nothing; the gradients stay)
        # second_step
        for p in self.ps:
            st = self.state[p]
            if vsam:
                st["psf"] = p.grad - st["g"]
            p.data = st["old_p"]
        if vsam:      # the controller's statistics over the last L tensors, read on the host
            g_norm = torch.norm(torch.stack([self.state[p]["g"].norm(p=2) for p in self.last]), p=2)
            psf_norm = torch.norm(torch.stack([self.state[p]["psf"].norm(p=2) for p in self.last]), p=2)
            torch.stack([g_norm, psf_norm]).tolist()
        self.base.step()

    def reuse_step(self):
        for p in self.ps:
            p.grad.add_(self.state[p]["psf"], alpha=ZETA)
        self.base.step()


class Foreach:
    """The same maths as torch._foreach_* chains; statistics stay on the device."""

    def __init__(self, step: str, shapes, device) -> None:
        self.ps = make_params(shapes, device)
        self.params = [p.detach() for p in self.ps]
        self.gs = [p.grad for p in self.ps]
        self.base = torch.optim.SGD(self.ps, lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=True)
        self.base.step()
        if step in ("sam", "vsam_sampling"):
            self.backups = [p.clone() for p in self.params]
        if step.startswith("vsam"):
            self.psfs = [torch.randn_like(p).mul_(1e-4) for p in self.params]
        self.last = slice(max(0, len(self.ps) - STAT_TENSORS), None)
        self.fn = {"sgd": self.base.step, "sam": lambda: self.sam(False), "vsam_sampling": lambda: self.sam(True),
                   "vsam_reuse": self.reuse_step}[step]

    def sam(self, vsam: bool):
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.gs)))
        scale = RHO / (norm + EPS)
        torch._foreach_copy_(self.backups, self.params)
        if vsam:
            torch._foreach_copy_(self.psfs, self.gs)
        torch._foreach_add_(self.params, torch._foreach_mul(self.gs, scale))
        # (the second forward/backward: replaced by nothing)
        torch._foreach_copy_(self.params, self.backups)
        if vsam:
            g_sq = torch._foreach_norm(self.psfs[self.last])
            torch._foreach_sub_(self.psfs, self.gs)
            torch._foreach_neg_(self.psfs)          # PSF = g_sam - g
            psf_sq = torch._foreach_norm(self.psfs[self.last])
            self.stats = torch.stack([torch.stack(g_sq).norm(), torch.stack(psf_sq).norm()])
        self.base.step()

    def reuse_step(self):
        torch._foreach_add_(self.gs, self.psfs, alpha=ZETA)
        self.base.step()


def build(impl: str, step: str, shapes, device) -> Optional[Callable[[], None]]:
    if impl.startswith("vsam_ext["):
        return build_ours(step, impl[len("vsam_ext["):-1], shapes, device)
    if impl == "authors":
        return Authors(step, shapes, device).fn
    if impl == "foreach":
        return Foreach(step, shapes, device).fn
    if impl == "torch-fused":
        if step != "sgd":
            return None
        ps = make_params(shapes, device)
        opt = torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, weight_decay=WD, fused=True)
        opt.step()
        return opt.step
    raise ValueError(impl)


def main(argv=None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--models", default=None,
                    help=f"comma-separated subset of {list(model_shapes.MODELS)} (default: all on cuda, all but "
                         f"gpt_1_3b on cpu; --quick: resnet18)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of {list(STEPS)}")
    ap.add_argument("--impls", default=None,
                    help="comma-separated subset of: reference, cpu, cuda, triton, authors, foreach, torch-fused")
    args = ap.parse_args(argv)
    device = C.setup(args)
    torch.set_grad_enabled(False)
    env = C.env_info(device)
    timer = C.Timer(device, args.quick)

    if args.models:
        models = args.models.split(",")
    elif args.quick:
        models = ["resnet18"]
    else:
        models = [m for m in model_shapes.MODELS if device.type == "cuda" or m != "gpt_1_3b"]
    bad = [m for m in models if m not in model_shapes.MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; known {list(model_shapes.MODELS)}")
    steps = args.steps.split(",") if args.steps else list(STEPS)
    bad = [s for s in steps if s not in STEPS]
    if bad:
        ap.error(f"--steps: unknown {bad}; known {list(STEPS)}")
    impls = ([f"vsam_ext[{b}]" for b in C.backends_for(device)]
             + [f"vsam_ext[{b}/in_place]" for b in C.backends_for(device) if b != "reference"]
             + ["authors", "foreach", "torch-fused"])
    impls = C.select_impls(impls, args.impls)

    copy = C.measure_copy(device, timer, (16 << 20) if args.quick else (64 << 20))
    print(f"# copy bandwidth: {copy['gbps']:.1f} GB/s", file=sys.stderr)

    rows: List[dict] = []
    for model in models:
        shapes = model_shapes.param_shapes(model)
        n = sum(math.prod(s) for s in shapes)
        for step in steps:
            for impl in impls:
                row = {"device": device.type, "model": model, "params": n, "tensors": len(shapes), "step": step,
                       "impl": impl, "bytes_per_param": STEPS[step][0], "copy_gbps": copy["gbps"]}
                try:
                    fn = build(impl, step, shapes, device)
                    if fn is None:
                        continue
                    row["ms"] = timer(fn)
                except Exception as exc:  # noqa: BLE001
                    if not C.is_oom(exc):
                        raise
                    row["ms"] = None
                    row["note"] = "out of memory"
                fn = None
                C.free_memory(device)
                if row["ms"]:
                    row["gbps"] = row["bytes_per_param"] * n / row["ms"] / 1e6
                    row["pct_copy"] = 100 * row["gbps"] / copy["gbps"]
                rows.append(row)
                print(f"# {model:9s} {step:14s} {impl:20s} "
                      f"{'OOM' if row['ms'] is None else format(row['ms'], '.3f') + ' ms'}", file=sys.stderr)
    _speedups(rows)

    base = f"bench_step_{device.type}"
    columns = ["device", "model", "params", "tensors", "step", "impl", "bytes_per_param", "ms", "gbps", "pct_copy",
               "x_vs_reference", "x_vs_authors", "x_vs_foreach", "x_vs_torch_fused", "copy_gbps", "note"]
    C.write_csv(os.path.join(args.out, base + ".csv"), rows, columns)
    body = _report(rows, steps, impls, models, copy, device)
    print(C.env_block(env))
    print()
    print(body)
    C.write_report(args, "bench_step", device, env, body)
    if not args.no_plot:
        C.save_plot(_plot, rows, steps, impls, copy["gbps"], os.path.join(args.out, base + ".png"), env)
    print(f"\nwrote {os.path.join(args.out, base)}.*", file=sys.stderr)
    return 0


def _speedups(rows) -> None:
    by = {(r["model"], r["step"], r["impl"]): r.get("ms") for r in rows}
    for r in rows:
        for other, col in (("vsam_ext[reference]", "x_vs_reference"), ("authors", "x_vs_authors"),
                           ("foreach", "x_vs_foreach"), ("torch-fused", "x_vs_torch_fused")):
            t = by.get((r["model"], r["step"], other))
            r[col] = t / r["ms"] if (t and r.get("ms")) else None


def _report(rows, steps, impls, models, copy, device) -> str:
    out = [f"Optimizer step only (no forward/backward; the second backward of a SAM step replaced by nothing). "
           f"Copy bandwidth (same run): **{copy['gbps']:.1f} GB/s**. Bytes per step: the fused design's traffic "
           f"(see bench_step.py), the same for every implementation. Cells: `ms / GB/s / % of copy`.", ""]
    for step in steps:
        table = []
        for model in models:
            mine = [r for r in rows if r["model"] == model and r["step"] == step]
            if not mine:
                continue
            line = {"model": model, "params": C.fmt_count(mine[0]["params"]), "tensors": mine[0]["tensors"]}
            for r in mine:
                line[r["impl"]] = ("OOM" if r["ms"] is None else
                                   f"{r['ms']:.3g} / {r['gbps']:.0f} / {r['pct_copy']:.0f}%")
            table.append(line)
        cols = [i for i in impls if any(i in t for t in table)]
        out.append(f"### {step} ({STEPS[step][0]} bytes/param: {STEPS[step][1]})\n")
        out.append(C.markdown_table(table, ["model", "params", "tensors"] + cols))
        out.append("")
    # speedups of the fused backends: first against what a user would otherwise run (the authors'
    # loop, a foreach chain, torch's fused SGD), then against our own eager reference backend
    fused = [i for i in impls if i.startswith("vsam_ext[") and i != "vsam_ext[reference]"]
    table = []
    for r in rows:
        if r["impl"] in fused and r.get("ms"):
            table.append({"model": r["model"], "step": r["step"], "impl": r["impl"],
                          "vs authors": _x(r["x_vs_authors"]), "vs foreach": _x(r["x_vs_foreach"]),
                          "vs torch-fused": _x(r.get("x_vs_torch_fused")),
                          "vs reference": _x(r["x_vs_reference"])})
    if table:
        out.append("### Speed-up of the fused backends (time of the other / time of ours; torch-fused: "
                   "SGD(fused=True), base step only; reference: our own eager backend)\n")
        out.append(C.markdown_table(table, ["model", "step", "impl", "vs authors", "vs foreach", "vs torch-fused",
                                            "vs reference"]))
        out.append("")
    out.append(_targets(rows, device))
    return "\n".join(out)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _targets(rows, device) -> str:
    lines = ["### Targets (ratios in this run)", ""]
    table = []
    by = {(r["model"], r["step"], r["impl"]): r.get("ms") for r in rows}
    fused = sorted({r["impl"] for r in rows if r["impl"].startswith("vsam_ext[") and r["impl"] != "vsam_ext[reference]"})
    for dev, step, model, other, ratio in TARGETS:
        for ours in fused:
            t_ours, t_other = by.get((model, step, ours)), by.get((model, step, other))
            applies = dev == device.type
            if not (t_ours and t_other):
                continue
            x = t_other / t_ours
            table.append({"target": f"{step} {ours} >= {ratio:g}x {other} at {model}",
                          "for": dev + ("" if applies else " (info only here)"), "measured": f"{x:.2f}x",
                          "met": ("yes" if x >= ratio else "no") if applies else "-"})
    if not table:
        lines.append("no target rows in this run (targets are at resnet50 on cuda, resnet18 on cpu)")
    else:
        lines.append(C.markdown_table(table, ["target", "for", "measured", "met"]))
    return "\n".join(lines)


def _plot(rows, steps, impls, copy_gbps, path, env) -> None:
    plt = C.plt()
    fig, axes = plt.subplots(1, len(steps), figsize=(4.3 * len(steps), 3.6), squeeze=False)
    for ax, step in zip(axes.flat, steps):
        C.gbps_panel(ax, [r for r in rows if r["step"] == step], impls, copy_gbps,
                     f"{step} ({STEPS[step][0]} B/param)", "parameters (model shapes)", ms=4)
    C.legend_all(fig, list(axes.flat))
    fig.suptitle(f"vsam_ext optimizer step — {env['device']}\ntorch {env['torch']}, triton {env['triton']}, "
                 f"{env['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
