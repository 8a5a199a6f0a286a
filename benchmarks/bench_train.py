"""End-to-end training throughput: the vSAM paper's AIS (average images per second over a whole
timed run: data loading, forward, backward(s) and optimizer step included) for SGD, SAM, SAM-5
and vSAM, on ResNet-18 and WideResNet-28-10 at CIFAR shapes (3x32x32, 10 classes), batch 128,
synthetic data through a DataLoader with the CIFAR augmentation (random crop with 4-pixel
padding, horizontal flip; normalisation on the device).

Methods (``method``):

* ``sgd-foreach`` / ``sgd-fused``  torch.optim.SGD(foreach=True) / SGD(fused=True);
* ``sam-torch``   SAM with torch ops only: a ``torch._foreach_*`` perturbation and restore around
  the faster of the two torch SGDs (the fastest torch baseline);
* ``sam-authors`` davda54/sam's per-parameter loop around SGD(foreach=False);
* ``sam``, ``sam5``, ``vsam``  vsam_ext's SAM, PeriodicSAM(period=5) and VSAM (paper defaults,
  ``warmup_steps`` = this script's warm-up steps, so the timed run is all in the sampling regime)
  with their default backend;
* ``sam-graphed``, ``vsam-graphed``  ``sam`` and ``vsam`` stepped by ``vsam_ext.GraphedStep``: the
  whole step (both forward/backward passes included) replayed from CUDA graphs, the batch copied
  into static tensors each step; ``--fixed-batch`` on cuda only (left out of the default list
  elsewhere);
* ``asam``, ``looksam``, ``aesam``, ``esam``, ``ausam``  the rest of vsam_ext's family with the
  authors' defaults (ASAM official flavour rho 0.5; LookSAM-5; AE-SAM over the warm-up + timed
  steps; ESAM beta = gamma = 0.5; AUSAM alpha 0.5, its first epoch = the whole batch, so the
  synthetic set is seen once during the warm-up only if it is small: see ``--dataset-size``).
  ESAM and AUSAM train on subsets of each batch, so they have no "ideal" in the sense below.

The *ideal* time of a run with ``n_sam`` SAM steps out of ``n`` is
``(n - n_sam) * t_sgd + n_sam * t_sam`` with the per-step times of the fastest torch SGD and of
``sam-torch``, measured in the same run: the time the method would take if its optimizer
cost nothing more than torch's. ``AIS / ideal AIS`` below 1 is the optimizer's own overhead
(for vSAM: the controller, the PSF reuse, the statistics).

Warm-up steps (cuDNN autotuning, the DataLoader's workers starting) are excluded from the
timing; the timed run is ``--steps`` steps.

``--fixed-batch``: no DataLoader. One batch (augmented and normalised as above) is made once on
the device and every step reuses it, so the model and the optimizer, not the loader, set the
time: the optimizer's own cost is what is left between a method and its ideal. (On an H200 the
4-worker loader set most of the default mode's gaps at ResNet-18.) AUSAM still counts its
epochs against ``--dataset-size`` samples. Its outputs are ``bench_train_fixed_<device>.*`` and
its ``--results-md`` section is ``bench_train_fixed <device>``, apart from the loader mode's.

    python benchmarks/bench_train.py --device cuda --repeats 3
    python benchmarks/bench_train.py --device cuda --fixed-batch --models resnet18 --steps 200 --repeats 2
    python benchmarks/bench_train.py --device cuda --fixed-batch --models resnet18 --batch 32 \
        --methods sgd-fused,sam-torch,sam,sam-graphed,vsam,vsam-graphed --steps 200 --repeats 2
    python benchmarks/bench_train.py --quick          # CPU smoke run: ResNet-18, batch 8, 3 steps
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vsam_ext import AESAM, AUSAM, ESAM, SAM, VSAM, IndexedDataset, LookSAM, PeriodicSAM  # noqa: E402
from vsam_ext.graphs import GraphedStep  # noqa: E402

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.05
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
METHODS = ["sgd-foreach", "sgd-fused", "sam-torch", "sam-authors", "sam", "sam5", "vsam",
           "asam", "looksam", "aesam", "esam", "ausam", "sam-graphed", "vsam-graphed"]
OURS = ["sam", "sam5", "vsam", "asam", "looksam", "aesam", "esam", "ausam", "sam-graphed", "vsam-graphed"]
GRAPHED = ["sam-graphed", "vsam-graphed"]    # GraphedStep: CUDA graphs, --fixed-batch on cuda only
SUBSET = ["esam", "ausam"]         # SAM passes on a subset of each batch: no ideal


# -- models ----------------------------------------------------------------------------------------
def load_model_builder():
    """``vsam_ext.train.models.build_model(name, num_classes=10)``; without it, this folder's
    CIFAR ResNet-18 (and no WideResNet), with a message."""
    try:
        from vsam_ext.train.models import build_model
        return build_model, None
    except ImportError as exc:
        import model_shapes

        def fallback(name: str, num_classes: int = 10):
            if name == "resnet18":
                return model_shapes.ResNet(model_shapes.BasicBlock, [2, 2, 2, 2], num_classes, small_input=True)
            raise ValueError(f"model {name!r} needs vsam_ext.train.models, which is not importable")
        return fallback, (f"vsam_ext.train.models is not importable ({exc}); using benchmarks/model_shapes.py's "
                          f"CIFAR ResNet-18, and skipping the other models")


# -- data ------------------------------------------------------------------------------------------
class SyntheticCIFAR(torch.utils.data.Dataset):
    """Random uint8 32x32 RGB images and labels, with CIFAR's training augmentation per sample."""

    def __init__(self, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 10, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        dx, dy = torch.randint(-4, 5, (2,)).tolist()          # random crop of the 4-padded image
        out = torch.zeros_like(img)
        out[:, max(0, -dy):32 - max(0, dy), max(0, -dx):32 - max(0, dx)] = \
            img[:, max(0, dy):32 - max(0, -dy), max(0, dx):32 - max(0, -dx)]
        if torch.rand(()) < 0.5:
            out = out.flip(2)
        return out, self.labels[i]


def make_loader(args, device) -> torch.utils.data.DataLoader:
    ds = IndexedDataset(SyntheticCIFAR(args.dataset_size))      # (x, y, index): AUSAM's sample ids
    return torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                                       num_workers=args.workers, pin_memory=device.type == "cuda",
                                       persistent_workers=args.workers > 0)


def _normalise(x: torch.Tensor, device) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return x.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)


def batches(loader, device):
    """Batches from ``loader``, or, for ``--fixed-batch`` (``loader`` a ``(x, y, idx)`` tuple
    already on the device), that one batch forever."""
    if isinstance(loader, tuple):
        while True:
            yield loader
    while True:
        for x, y, idx in loader:
            yield _normalise(x, device), y.to(device, non_blocking=True), idx


def make_fixed_batch(args, device):
    """``--fixed-batch``: one batch of the synthetic set (its first ``--batch`` samples, augmented
    once), normalised and put on the device once; its sample ids ``0 .. batch-1``."""
    ds = SyntheticCIFAR(args.dataset_size)
    torch.manual_seed(0)                                   # the augmentation draws
    items = [ds[i] for i in range(args.batch)]
    x = torch.stack([img for img, _ in items])
    y = torch.stack([label for _, label in items])
    return _normalise(x, device), y.to(device), torch.arange(args.batch)


# -- one training step per method -------------------------------------------------------------------
def _bn(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class TorchSAM:
    """SAM from torch ops: foreach perturbation/restore around a torch SGD (BatchNorm running
    statistics frozen in the perturbed pass, as vsam_ext does)."""

    def __init__(self, model, base: torch.optim.Optimizer) -> None:
        self.model, self.base = model, base
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.data = [p.detach() for p in self.params]
        self.backups = [torch.empty_like(p) for p in self.data]
        self.bns = _bn(model)

    def step(self, x, y) -> None:
        F.cross_entropy(self.model(x), y).backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_copy_(self.backups, self.data)
            torch._foreach_add_(self.data, torch._foreach_mul(grads, RHO / (norm + 1e-12)))
        self.base.zero_grad(set_to_none=True)
        for m in self.bns:
            m.track_running_stats = False
        F.cross_entropy(self.model(x), y).backward()
        for m in self.bns:
            m.track_running_stats = True
        with torch.no_grad():
            torch._foreach_copy_(self.data, self.backups)
        self.base.step()
        self.base.zero_grad(set_to_none=True)


class AuthorsSAM:
    """davda54/sam: per-parameter loops with dict state, base SGD(foreach=False)."""

    def __init__(self, model, base: torch.optim.Optimizer) -> None:
        self.model, self.base = model, base
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state: Dict[torch.Tensor, dict] = {p: {} for p in self.params}
        self.bns = _bn(model)

    def step(self, x, y) -> None:
        F.cross_entropy(self.model(x), y).backward()
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
            scale = RHO / (grad_norm + 1e-12)
            for p in self.params:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        self.base.zero_grad(set_to_none=True)
        for m in self.bns:                              # davda54's disable_running_stats
            m.backup_momentum = m.momentum
            m.momentum = 0
        F.cross_entropy(self.model(x), y).backward()
        for m in self.bns:
            m.momentum = m.backup_momentum
        with torch.no_grad():
            for p in self.params:
                if "old_p" in self.state[p]:
                    p.data = self.state[p]["old_p"]
        self.base.step()
        self.base.zero_grad(set_to_none=True)


def build_method(method: str, model, sgd_flags: dict, warmup: int, total_steps: int, num_samples: int):
    """(step(x, y, idx), optimizer or None) for ``method``."""
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)
    if method in ("sgd-foreach", "sgd-fused"):
        opt = torch.optim.SGD(model.parameters(), **kw, **({"foreach": True} if method == "sgd-foreach"
                                                           else {"fused": True}))

        def step(x, y, idx):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step, None
    if method == "sam-torch":
        stepper = TorchSAM(model, torch.optim.SGD(model.parameters(), **kw, **sgd_flags))
        return (lambda x, y, idx: stepper.step(x, y)), None
    if method == "sam-authors":
        stepper = AuthorsSAM(model, torch.optim.SGD(model.parameters(), **kw, foreach=False))
        return (lambda x, y, idx: stepper.step(x, y)), None
    params = model.parameters()
    if method in GRAPHED:
        return _graphed(method, model, kw, warmup)
    if method in SUBSET:
        if method == "esam":
            opt = ESAM(params, torch.optim.SGD, rho=RHO, model=model, **kw)
        else:
            opt = AUSAM(params, torch.optim.SGD, num_samples=num_samples, rho=RHO, model=model, **kw)

        def step(x, y, idx):
            def closure(indices=None):
                xb, yb = (x, y) if indices is None else (x[indices], y[indices])
                return F.cross_entropy(model(xb), yb, reduction="none")
            opt.step(closure, idx) if method == "ausam" else opt.step(closure)
        return step, opt
    if method == "asam":
        opt = SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, model=model, **kw)
    elif method == "looksam":
        opt = LookSAM(params, torch.optim.SGD, k=5, rho=RHO, model=model, **kw)
    elif method == "aesam":
        opt = AESAM(params, torch.optim.SGD, total_steps=total_steps, rho=RHO, model=model, **kw)
    elif method == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, **kw)
    elif method == "sam5":
        opt = PeriodicSAM(model.parameters(), torch.optim.SGD, period=5, rho=RHO, model=model, **kw)
    elif method == "vsam":
        opt = VSAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, warmup_steps=warmup, **kw)
    else:
        raise ValueError(method)

    def step(x, y, idx):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return step, opt


def _graphed(method: str, model, kw: dict, warmup: int):
    """``sam``/``vsam`` with ``GraphedStep``: the batch is copied into static tensors each step."""
    if method == "sam-graphed":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, **kw)
    else:
        opt = VSAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, warmup_steps=warmup, **kw)
    static = {}

    def closure():
        loss = F.cross_entropy(model(static["x"]), static["y"])
        loss.backward()
        return loss
    graphed = GraphedStep(opt, closure)

    def step(x, y, idx):
        if not static:
            static["x"], static["y"] = x.clone(), y.clone()
        else:
            static["x"].copy_(x)
            static["y"].copy_(y)
        graphed()
    return step, opt


def run(method: str, model_name: str, build_model, args, device, loader, sgd_flags) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10).to(device).train()
    step, opt = build_method(method, model, sgd_flags, args.warmup, args.warmup + args.steps, args.dataset_size)
    data = batches(loader, device)
    for _ in range(args.warmup):
        step(*next(data))
    sam_before = opt.stats["sam_steps"] if opt is not None else 0
    C.sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(*next(data))
    C.sync(device)
    wall = time.perf_counter() - t0
    if opt is not None:
        n_sam = opt.stats["sam_steps"] - sam_before
        backend = opt.backend
    else:
        n_sam = args.steps if method.startswith("sam") else 0
        backend = "torch"
    del model, step, opt, data
    C.free_memory(device)
    return {"wall_s": wall, "n_sam": n_sam, "backend": backend}


def main(argv=None) -> int:
    ap = C.base_parser(__doc__)
    ap.add_argument("--models", default=None, help="comma-separated (default resnet18,wrn28_10; --quick: resnet18)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick: 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 300; --quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before (default 20; --quick: 1)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved; the median AIS is kept")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on cuda, 0 on cpu)")
    ap.add_argument("--dataset-size", type=int, default=None, help="synthetic images (default 50000; --quick: 512)")
    ap.add_argument("--fixed-batch", action="store_true",
                    help="no DataLoader: one batch made once on the device and reused every step, so the "
                         "optimizer, not the loader, sets the time (outputs bench_train_fixed_<device>.*; "
                         "--workers is ignored)")
    args = ap.parse_args(argv)
    device = C.setup(args)
    q = args.quick
    args.batch = args.batch or (8 if q else 128)
    args.steps = args.steps or (3 if q else 300)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 20)
    args.workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    if args.fixed_batch:
        args.workers = 0
    args.dataset_size = args.dataset_size or (512 if q else 50000)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = C.env_info(device)
    data_note = ("one fixed batch on the device, no DataLoader" if args.fixed_batch
                 else f"{args.workers} DataLoader workers")
    env["training"] = (f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, "
                       f"{args.repeats} run(s) per method, {data_note}, fp32, "
                       f"cudnn.benchmark={torch.backends.cudnn.benchmark}")

    build_model, note = load_model_builder()
    models = args.models.split(",") if args.models else (["resnet18"] if q else ["resnet18", "wrn28_10"])
    if note:
        print(f"# NOTE: {note}", file=sys.stderr)
        env["models"] = note
        models = [m for m in models if m == "resnet18"]
    graphs_ok = device.type == "cuda" and args.fixed_batch
    methods = args.methods.split(",") if args.methods else [
        m for m in METHODS if not (q and m == "sam-authors") and (graphs_ok or m not in GRAPHED)]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; known {METHODS}")
    if not graphs_ok and any(m in GRAPHED for m in methods):
        ap.error(f"--methods: {GRAPHED} need --device cuda and --fixed-batch (CUDA graphs, static batch)")
    order = sorted(methods, key=METHODS.index)       # SGDs first: sam-torch uses the faster one

    loader = make_fixed_batch(args, device) if args.fixed_batch else make_loader(args, device)
    rows: List[dict] = []
    for model_name in models:
        n_params = sum(p.numel() for p in build_model(model_name, num_classes=10).parameters())
        results: Dict[str, List[dict]] = {m: [] for m in order}
        sgd_flags = {"foreach": True}
        for r in range(args.repeats):
            for method in order:
                if method == "sam-torch":
                    sgd_flags = _fastest_sgd(results)
                res = run(method, model_name, build_model, args, device, loader, sgd_flags)
                results[method].append(res)
                print(f"# {model_name} {method:12s} run {r + 1}: {res['wall_s']:.3f} s, "
                      f"{args.batch * args.steps / res['wall_s']:.1f} img/s, {res['n_sam']} SAM steps", file=sys.stderr)
        rows += _rows(model_name, n_params, results, args, device)

    name = "bench_train_fixed" if args.fixed_batch else "bench_train"
    base = f"{name}_{device.type}"
    columns = ["device", "model", "params", "method", "backend", "batch", "steps", "n_sam", "ms_per_step", "ais",
               "ideal_ais", "ais_over_ideal", "overhead_pct", "x_vs_sam", "wall_s_runs"]
    C.write_csv(os.path.join(args.out, base + ".csv"), rows, columns)
    body = _report(rows, models, device, args.fixed_batch)
    print(C.env_block(env))
    print()
    print(body)
    C.write_report(args, name, device, env, body)
    if not args.no_plot:
        C.save_plot(_plot, rows, os.path.join(args.out, base + ".png"), env)
    print(f"\nwrote {os.path.join(args.out, base)}.*", file=sys.stderr)
    return 0


def _median_time(runs: List[dict]) -> float:
    return statistics.median(r["wall_s"] for r in runs)


def _fastest_sgd(results) -> dict:
    times = {m: _median_time(results[m]) for m in ("sgd-foreach", "sgd-fused") if results.get(m)}
    if not times:
        return {"foreach": True}
    return {"foreach": True} if min(times, key=times.get) == "sgd-foreach" else {"fused": True}


def _rows(model_name, n_params, results, args, device) -> List[dict]:
    steps, batch = args.steps, args.batch
    t = {m: _median_time(r) / steps for m, r in results.items() if r}
    sgd_times = [t[m] for m in ("sgd-foreach", "sgd-fused") if m in t]
    t_sgd = min(sgd_times) if sgd_times else None
    t_sam = t.get("sam-torch")
    rows = []
    for method, runs in results.items():
        if not runs:
            continue
        n_sam = int(statistics.median(r["n_sam"] for r in runs))
        ideal = None
        if method not in SUBSET and t_sgd is not None and (n_sam == 0 or t_sam is not None):
            ideal_time = (steps - n_sam) * t_sgd + n_sam * (t_sam or 0.0)
            ideal = batch * steps / ideal_time
        ais = batch / t[method]
        rows.append({"device": device.type, "model": model_name, "params": n_params, "method": method,
                     "backend": runs[0]["backend"], "batch": batch, "steps": steps, "n_sam": n_sam,
                     "ms_per_step": 1e3 * t[method], "ais": ais, "ideal_ais": ideal,
                     "ais_over_ideal": ais / ideal if ideal else None,
                     "overhead_pct": 100 * (ideal / ais - 1) if ideal else None,
                     "x_vs_sam": (t["sam"] / t[method]) if "sam" in t else None,
                     "wall_s_runs": " ".join(f"{r['wall_s']:.3f}" for r in runs)})
    return rows


def _report(rows, models, device, fixed_batch: bool = False) -> str:
    data = ("one fixed batch on the device: no data loading" if fixed_batch else "data loading included")
    out = [f"AIS = images per second over the timed run ({data}). Ideal = "
           "`(n - n_sam) * t_sgd + n_sam * t_sam` with the fastest torch SGD and `sam-torch` of the same run; "
           "overhead = ideal AIS / AIS - 1. `x vs sam` = speed relative to vsam_ext's SAM.", ""]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        table = [dict(r, n_sam=f"{r['n_sam']}/{r['steps']}",
                      overhead_pct=None if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%",
                      x_vs_sam=None if r["x_vs_sam"] is None else f"{r['x_vs_sam']:.2f}x") for r in mine]
        out.append(f"### {model} ({C.fmt_count(mine[0]['params'])} parameters, batch {mine[0]['batch']})\n")
        out.append(C.markdown_table(table, ["method", "backend", "n_sam", "ms_per_step", "ais", "ideal_ais",
                                            "overhead_pct", "x_vs_sam"],
                                    ["method", "backend", "SAM steps", "ms/step", "AIS", "ideal AIS",
                                     "overhead vs ideal", "x vs sam"]))
        out.append("")
    table = []
    for r in rows:
        if r["method"] == "vsam" and r["overhead_pct"] is not None:
            table.append({"model": r["model"], "overhead": f"{r['overhead_pct']:+.1f}%",
                          "met": ("yes" if r["overhead_pct"] <= 3.0 else "no") if device.type == "cuda" else "-"})
    out.append("### Target: vSAM end-to-end within 3% of its ideal"
               + ("" if device.type == "cuda" else " (a GPU target; information only on CPU)") + "\n")
    out.append(C.markdown_table(table, ["model", "overhead", "met"]) if table else "no vsam row with an ideal")
    return "\n".join(out)


def _plot(rows, path, env) -> None:
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, method in enumerate([m for m in METHODS if any(r["method"] == m for r in rows)]):
        pts = sorted((r["params"], r["ais"], r["ideal_ais"]) for r in rows if r["method"] == method)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                        ls="-" if method in OURS else "--")
        if method in OURS:
            ideal = [(p[0], p[2]) for p in pts if p[2]]
            if ideal:
                ax.plot([p[0] for p in ideal], [p[1] for p in ideal], marker="x", ls=":", color=line.get_color(),
                        label=f"{method} ideal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (model)")
    ax.set_ylabel("AIS (images / s)")
    ax.legend(fontsize=7)
    ax.set_title(f"end-to-end training throughput — {env['device']}\ntorch {env['torch']}, {env['date']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
