"""torch.compile end to end: ms per training step with the model eager and with the model
compiled (``torch.compile(model)``), for torch.optim.SGD and for vsam_ext's SAM and VSAM.

What is compiled is what the README recommends ("torch.compile, step hooks, schedulers"): the
model, i.e. its forward and (through AOT autograd) its backward. The optimizer step runs eagerly
either way: ``step``/``first_step``/``second_step`` are ``torch.compiler.disable`` (the
controller and the PSF bookkeeping are host code), and their device work is already a few fused
op calls per buffer. So the compiled/eager ratio is the model's gain, seen through the whole step.

Model: ``vsam_ext.train.models.SmallCNN`` (two conv + BN blocks, 0.21 M parameters) on one fixed
synthetic batch of Fashion-MNIST shape (1x28x28, 10 classes), no data loading; SGD lr 0.05,
momentum 0.9, weight decay 5e-4; SAM and VSAM (``model=``: BatchNorm statistics frozen in the
second pass) on that SGD, VSAM's warm-up inside the untimed steps so the timed run samples.

Every (method, mode) is built and warmed up first (the first compiled steps compile: their time
is reported apart, as ``compile s``); then ``--repeats`` rounds time ``--steps`` steps of each,
interleaved, and the median round is kept (a slow spell of a shared machine hits one round).

    python benchmarks/bench_compile.py --threads 2 --steps 300 --repeats 3
    python benchmarks/bench_compile.py --quick --backend aot_eager      # smoke run (CI)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vsam_ext import SAM, VSAM  # noqa: E402
from vsam_ext.train.models import SmallCNN  # noqa: E402

METHODS = ["sgd", "sam", "vsam"]
MODES = ["eager", "compiled"]
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


class Run:
    """One (method, mode): its own model (same seed for all), optimizer and step function."""

    def __init__(self, method: str, mode: str, args, x, y) -> None:
        torch.manual_seed(0)
        self.method, self.mode = method, mode
        model = SmallCNN()
        run_model = torch.compile(model, backend=args.backend) if mode == "compiled" else model
        if method == "sgd":
            opt = torch.optim.SGD(model.parameters(), **SGD_KW)
        elif method == "sam":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, **SGD_KW)
        else:
            opt = VSAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, warmup_steps=args.warmup,
                       **SGD_KW)

        def closure():
            loss = F.cross_entropy(run_model(x), y)
            loss.backward()
            return loss

        def step():
            if method == "sgd":
                opt.zero_grad()
                loss = closure()
                opt.step()
                return loss
            return opt.step(closure)

        self.step, self.opt = step, opt
        self.rounds = []
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            self.loss = step().detach()
        self.warmup_s = time.perf_counter() - t0

    def time(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.loss = self.step().detach()
        self.rounds.append((time.perf_counter() - t0) * 1e3 / steps)

    @property
    def ms(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> str:
        """The rounds' range, when there are several: how noisy the machine was."""
        return f"({min(self.rounds):.1f}-{max(self.rounds):.1f})" if len(self.rounds) > 1 else ""


def report(runs, args, env) -> str:
    by = {(r.method, r.mode): r for r in runs}
    lines = [f"## torch.compile (CPU): SmallCNN, batch {args.batch}, {args.steps} steps x {args.repeats} rounds",
             "", f"device: {env['device']}; torch {env['torch']}; vsam_ext {env['vsam_ext']}; backend "
             f"{args.backend!r}; {env['date']}", f"command: `{env['command']}`", "",
             "| method | eager ms/step (rounds) | compiled ms/step (rounds) | compiled/eager | warm-up s eager / compiled | "
             "final loss eager / compiled |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for m in METHODS:
        e, c = by[(m, "eager")], by[(m, "compiled")]
        lines.append(f"| {m} | {e.ms:.2f} {e.spread} | {c.ms:.2f} {c.spread} | {c.ms / e.ms:.3f} | "
                     f"{e.warmup_s:.1f} / {c.warmup_s:.1f} | "
                     f"{e.loss.item():.4f} / {c.loss.item():.4f} |")
    sam = by[("vsam", "eager")].opt.stats
    lines += ["", f"VSAM over the whole run (eager): {sam.get('sam_steps')} SAM steps of {sam.get('steps')}. The "
              f"compiled warm-up includes compiling: the compiled models share SmallCNN.forward's compiled "
              f"code, so the first one built (sgd) pays most of it, and sam the second variant (BatchNorm "
              f"statistics frozen in the second pass)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 300; --quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first, compiling (default 30; --quick: 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds, median kept (default 3; --quick: 1)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64; --quick: 8)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 300)
    args.warmup = args.warmup or (2 if args.quick else 30)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.batch = args.batch or (8 if args.quick else 64)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    torch._dynamo.config.cache_size_limit = 64      # 3 models x 2 BatchNorm states: never fall back to eager
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    runs = [Run(m, mode, args, x, y) for m in METHODS for mode in MODES]
    for r in range(args.repeats):
        order = runs[r % len(runs):] + runs[:r % len(runs)]     # rotated: no run always first
        for run in order:
            run.time(args.steps)
    print(report(runs, args, C.env_info(torch.device("cpu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
