"""``python -m vsam_ext.train``: train real models on the offline datasets with SGD, SAM, SAM-5,
vSAM, vSAM-A and the rest of the family (SAF and MESA included), several seeds, and write a
table, a JSON file of every epoch and PNG plots.

Settings are resolved in this order, later ones winning: the built-in defaults, the dataset's
defaults (model, epochs, augmentation), the preset (``--quick`` or ``--smoke``), the options
given on the command line. Run ``python -m vsam_ext.train --help`` for every option.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
import warnings
from typing import List, Optional

__all__ = ["main", "build_parser", "resolve"]

DEFAULT_OPTIMIZERS = "sgd,sam,sam5,vsam,vsam-a"

# Built-in defaults: the authors' recipe (SGD momentum 0.9, cosine LR, label smoothing 0.1,
# batch 128, rho 0.05; lr 0.1 and weight decay 5e-4 as in ESAM's code, whose set-up vSAM follows).
BASE = dict(dataset="fmnist", model=None, optimizers=DEFAULT_OPTIMIZERS, seeds="0", epochs=None,
            batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, label_smoothing=0.1, rho=0.05,
            warmup_steps=None, window=None, warmup_frac=0.1, train_size=None, test_size=None, val_size=0,
            data_seed=0, crop_pad=None, flip=None, cutout=None)

DATASET_DEFAULTS = {
    # Fashion-MNIST: small CNN; random crop (pad 2) + flip; no cutout (the paper's cutout is for CIFAR)
    "fmnist": dict(model="cnn", epochs=30, crop_pad=2, flip=True, cutout=0),
    # CIFAR-10: the paper's augmentation: random crop (pad 4) + flip + cutout 16
    "cifar10": dict(model="resnet18", epochs=200, crop_pad=4, flip=True, cutout=16),
    "cifar10-exact": dict(model="resnet18", epochs=200, crop_pad=4, flip=True, cutout=16),
}

PRESETS = {
    # about 5 minutes for sgd,sam,sam5,vsam,vsam-a with one seed on 2 CPU cores (quiet machine)
    "quick": dict(dataset="fmnist", model="cnn", train_size=8000, test_size=2000, epochs=8),
    # seconds: the CI/test configuration (tiny subset, two optimizers)
    "smoke": dict(dataset="fmnist", model="cnn", optimizers="sgd,vsam", train_size=384, test_size=300,
                  epochs=2, batch_size=32),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vsam_ext.train",
        description="Train real models on the offline datasets with SGD, SAM, SAM-5, vSAM, vSAM-A and the rest of "
                    "the family (ASAM, LookSAM, AE-SAM, ESAM, AUSAM, SAF, MESA), and "
                    "write a table, a JSON file of every epoch, and PNG plots. Settings: built-in defaults < "
                    "the dataset's defaults < the preset (--quick/--smoke) < the options given.")
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true",
                   help="preset: Fashion-MNIST 8k-image subset (test: 2k), small CNN, 8 epochs, the five "
                        "optimizers, seed 0 (about 4-5 minutes on one CPU core)")
    g.add_argument("--smoke", action="store_true", help="preset: a few seconds (tests/CI): tiny subset, sgd,vsam")
    g.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), default=None, help="default: fmnist")
    g.add_argument("--model", default=None,
                   help="cnn | resnet18 | wrn16_4 | wrn28_10 | wrn<depth>_<widen>; default: cnn for fmnist, "
                        "resnet18 for CIFAR-10")
    g.add_argument("--optimizers", default=None, help=f"comma-separated, of sgd,sam,sam5,vsam,vsam-a,asam,looksam,"
                                                      f"aesam,esam,ausam,saf,mesa (default {DEFAULT_OPTIMIZERS})")
    g.add_argument("--seeds", default=None, help="comma-separated seeds (default 0); each seed gives every "
                                                 "optimizer the same initial weights, batches and augmentations")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=None, help="default: 30 (fmnist), 200 (CIFAR-10)")
    g.add_argument("--batch-size", type=int, default=None, help="default 128")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine decay per step (default 0.1)")
    g.add_argument("--momentum", type=float, default=None, help="default 0.9")
    g.add_argument("--weight-decay", type=float, default=None, help="default 5e-4")
    g.add_argument("--label-smoothing", type=float, default=None, help="default 0.1")
    g.add_argument("--rho", type=float, default=None, help="SAM radius (default 0.05)")
    g.add_argument("--period", type=int, default=5, help="period k of sam5 (SAM-k; default 5)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="vSAM warm-up steps (default: --warmup-frac of the run's steps)")
    g.add_argument("--warmup-frac", type=float, default=None, help="vSAM warm-up as a fraction of the steps "
                                                                   "(default 0.1)")
    g.add_argument("--window", type=int, default=None,
                   help="vSAM window K (default: steps after warm-up / 10, clamped to [10, 50])")
    g.add_argument("--lambdas", default=None, help="vSAM gains 'ratio,variance' (library default 0.13,0.13)")
    g.add_argument("--max-rate", type=float, default=None, help="vSAM highest SAM fraction of a window "
                                                                "(library default 0.8)")
    g.add_argument("--reuse-decay", type=float, default=None, help="vSAM PSF reuse decay (library default 0.7; "
                                                                   "vsam-a always uses 0)")
    g.add_argument("--max-reuse", type=int, default=None, help="vSAM cheap steps that reuse a PSF "
                                                               "(library default 6)")
    g.add_argument("--stat-tensors", type=int, default=None, help="vSAM statistics over the last L tensors "
                                                                  "(library default 10)")
    g = p.add_argument_group("the rest of the family (authors' defaults)")
    g.add_argument("--asam-rho", type=float, default=0.5, help="asam: radius of ASAM, official flavour (default 0.5)")
    g.add_argument("--looksam-k", type=int, default=5, help="looksam: refresh period k (default 5)")
    g.add_argument("--looksam-alpha", type=float, default=0.7, help="looksam: alpha (default 0.7)")
    g.add_argument("--esam-beta", type=float, default=0.5, help="esam: SWP keep probability beta (default 0.5)")
    g.add_argument("--esam-gamma", type=float, default=0.5, help="esam: SDS sample fraction gamma (default 0.5)")
    g.add_argument("--ausam-alpha", type=float, default=0.5, help="ausam: sample fraction alpha (default 0.5)")
    g.add_argument("--ausam-ramp-epochs", type=int, default=None,
                   help="ausam: epochs over which f_max ramps up (default: the authors' 30 of 200 epochs, "
                        "scaled to --epochs)")
    g.add_argument("--saf-lam", type=float, default=0.3, help="saf: weight lambda of the KL term (default 0.3)")
    g.add_argument("--saf-epochs-ago", type=int, default=3,
                   help="saf: age of the reference logits in epochs, E~ (default 3)")
    g.add_argument("--mesa-lam", type=float, default=0.8, help="mesa: weight lambda of the KL term (default 0.8)")
    g.add_argument("--kl-temperature", type=float, default=5.0, help="saf, mesa: temperature (default 5)")
    g.add_argument("--kl-start-epoch", type=int, default=None,
                   help="saf, mesa: the KL term is on after this epoch (0-based) to the end (default: the "
                        "authors' 5 of 200 epochs, scaled to --epochs)")
    g.add_argument("--mesa-decay", type=float, default=None,
                   help="mesa: EMA decay (default: the authors' 0.9998, whose memory of 5000 steps is 1/15.6 of "
                        "their 78 000, scaled to the run's steps: 1 - 15.6 / steps)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="folder of the offline datasets (fashion_mnist/, cifar10/). Default: $VSAM_EXT_DATA if set, "
                        "else ../shared/data beside the project root (found from the package's location, "
                        "whatever the current directory)")
    g.add_argument("--train-size", type=int, default=None, help="class-balanced training subset (default: all)")
    g.add_argument("--test-size", type=int, default=None, help="class-balanced test subset (default: all)")
    g.add_argument("--val-size", type=int, default=None,
                   help="validation images held out of the training set (class-balanced, disjoint from the "
                        "training subset): tune on these, not on the test set (default 0)")
    g.add_argument("--data-seed", type=int, default=None, help="seed of the subsets (default 0)")
    g.add_argument("--crop-pad", type=int, default=None, help="random-crop padding (default 2 fmnist, 4 CIFAR)")
    g.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no horizontal flip")
    g.add_argument("--cutout", type=int, default=None, help="cutout square side (default 0 fmnist, 16 CIFAR)")
    g.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    g = p.add_argument_group("machine and output")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU; 0: every core this process may use. Default 1: on a "
                        "shared 2-core machine two threads ran the small CNN ~3x slower than one (OpenMP "
                        "barriers wait on descheduled threads); give --threads 2 on a quiet machine")
    g.add_argument("--backend", default=None, help="vsam_ext backend (default: auto)")
    g.add_argument("--out-dir", default=None, help="output folder (default runs/<timestamp>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--merge", default=None, metavar="DIR,DIR,...",
                   help="train nothing: join the results of earlier invocations with the same settings "
                        "(e.g. one per optimizer or seed) into one table, JSON and plots in --out-dir")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """The effective settings: defaults < dataset defaults < preset < command line."""
    if args.quick and args.smoke:
        raise SystemExit("--quick and --smoke are two presets: give one")
    preset = PRESETS["quick"] if args.quick else PRESETS["smoke"] if args.smoke else {}
    given = {k: v for k, v in vars(args).items() if v is not None}
    dataset = given.get("dataset") or preset.get("dataset") or BASE["dataset"]
    cfg = dict(BASE)
    cfg.update(DATASET_DEFAULTS[dataset])
    cfg.update(preset)
    for key in BASE:
        if key in given:
            cfg[key] = given[key]
    cfg["dataset"] = dataset
    if args.no_augment:
        cfg.update(crop_pad=0, flip=False, cutout=0)
    cfg["preset"] = "quick" if args.quick else "smoke" if args.smoke else None
    return cfg


def _parse_list(text: str, kind, what: str) -> list:
    try:
        items = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not items:
        raise SystemExit(f"--{what}: empty")
    return items


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                      # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _check_device(text: Optional[str], torch):
    """The training device, or a one-line ``SystemExit`` when it cannot be used here."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"--device {text}: not a device ({' '.join(str(exc).split())})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "is built without CUDA" if not torch.version.cuda else "sees no CUDA device"
            raise SystemExit(f"--device {text}: CUDA is not available: torch {torch.__version__} {why}; "
                             f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        mod = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(mod, "is_available", None)
        if available is not None and not available():
            raise SystemExit(f"--device {text}: {device.type} is not available with this torch "
                             f"({torch.__version__})")
    return device


def _check_data_dir(given: Optional[str], dataset: str) -> str:
    """The data folder (``--data-dir``, ``$VSAM_EXT_DATA`` or the project's ``../shared/data``),
    or a one-line ``SystemExit`` naming where it looked and what is missing."""
    from .data import DATA_ENV, missing_files, resolve_data_dir

    path, source = resolve_data_dir(given)
    what = "--data-dir" if source == "--data-dir" else DATA_ENV if source == DATA_ENV else \
        "the default data folder (../shared/data beside the project root)"
    hint = f"give --data-dir DIR or set {DATA_ENV} to the folder that holds fashion_mnist/ and cifar10/"
    if not os.path.isdir(path):
        raise SystemExit(f"{what}: {path} is not a folder; {hint}")
    missing = missing_files(dataset, path)
    if missing:
        raise SystemExit(f"{what}: {path} lacks the {dataset} files {', '.join(missing)}; {hint}")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge(_parse_list(args.merge, str, "merge"),
                     args.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + "-merged"))
    cfg = resolve(args)

    import torch

    from .. import __version__, available_backends
    from . import report
    from .data import Augment, load_dataset, steps_per_epoch
    from .loop import KL_LOSSES, OPTIMIZERS, VSAM_LIKE, TrainConfig, kl_schedule, train_run, vsam_schedule
    from .models import build_model, input_shape

    optimizers = _parse_list(cfg["optimizers"], str, "optimizers")
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"--optimizers: unknown {unknown}; known: {','.join(OPTIMIZERS)}")
    if len(set(optimizers)) != len(optimizers):
        raise SystemExit("--optimizers: an optimizer is named twice")
    seeds = _parse_list(cfg["seeds"], int, "seeds")
    if len(set(seeds)) != len(seeds):
        raise SystemExit("--seeds: a seed is named twice")
    for key in ("epochs", "batch_size"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1")
    try:
        shape = input_shape(cfg["model"])
    except ValueError as exc:
        raise SystemExit(f"--model: {exc}") from None
    try:
        with torch.device("meta"):               # the model's own rules (WideResNet depth/widen), no memory
            build_model(cfg["model"])
    except ValueError as exc:
        raise SystemExit(f"--model: {exc}") from None
    for key in ("train_size", "test_size"):
        if cfg[key] is not None and cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1 (or left out: all of it), got {cfg[key]}")
    if cfg["val_size"] is not None and cfg["val_size"] < 0:
        raise SystemExit(f"--val-size must be >= 0, got {cfg['val_size']}")
    want_c = 1 if cfg["dataset"] == "fmnist" else 3
    if shape[0] != want_c:
        raise SystemExit(f"--model {cfg['model']} takes {shape[0]}-channel images, {cfg['dataset']} has {want_c}")

    device = _check_device(args.device, torch)
    data_dir = _check_data_dir(args.data_dir, cfg["dataset"])
    threads = None
    if device.type == "cpu":
        threads = 1 if args.threads is None else (args.threads or _default_threads())
        if threads < 1:
            raise SystemExit("--threads must be >= 0")
        torch.set_num_threads(threads)
    else:
        torch.backends.cudnn.benchmark = True

    out_dir = args.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    log = print

    augment = Augment(crop_pad=cfg["crop_pad"], flip=bool(cfg["flip"]), cutout=cfg["cutout"])
    t_load = time.perf_counter()
    try:
        data = load_dataset(cfg["dataset"], data_dir, train_size=cfg["train_size"], test_size=cfg["test_size"],
                            val_size=cfg["val_size"], data_seed=cfg["data_seed"], augment=augment, device=device)
    except (OSError, ValueError) as exc:           # unreadable files, subsets larger than the data
        raise SystemExit(f"{cfg['dataset']} from {data_dir}: {' '.join(str(exc).split())}") from None
    t_load = time.perf_counter() - t_load
    spe = steps_per_epoch(len(data.y_train), cfg["batch_size"])
    total = spe * cfg["epochs"]
    if total < 1:
        raise SystemExit(f"no training step: {len(data.y_train)} training images make no batch of "
                         f"{cfg['batch_size']}")
    warmup, window, n_windows = vsam_schedule(total, cfg["warmup_steps"], cfg["window"], cfg["warmup_frac"])
    if window < 2 or window * 0.8 < 1:
        raise SystemExit(f"--window must be >= 2, got {window}")

    vsam_options = {}
    if args.lambdas is not None:
        vsam_options["lambdas"] = tuple(_parse_list(args.lambdas, float, "lambdas"))
    for key in ("max_rate", "reuse_decay", "max_reuse", "stat_tensors"):
        if getattr(args, key) is not None:
            vsam_options[key] = getattr(args, key)
    tc = TrainConfig(model=cfg["model"], epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                     momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                     label_smoothing=cfg["label_smoothing"], rho=cfg["rho"], warmup_steps=warmup, window=window,
                     period=args.period, vsam_options=vsam_options, device=str(device), backend=args.backend,
                     progress=not args.no_progress, asam_rho=args.asam_rho, looksam_k=args.looksam_k,
                     looksam_alpha=args.looksam_alpha, esam_beta=args.esam_beta, esam_gamma=args.esam_gamma,
                     ausam_alpha=args.ausam_alpha, ausam_ramp_epochs=args.ausam_ramp_epochs,
                     saf_lam=args.saf_lam, saf_epochs_ago=args.saf_epochs_ago, mesa_lam=args.mesa_lam,
                     kl_temperature=args.kl_temperature, kl_start_epoch=args.kl_start_epoch,
                     mesa_decay=args.mesa_decay)
    from .loop import make_kl_loss, make_optimizer
    for name in optimizers:                      # bad options fail now, not after hours
        try:
            make_optimizer(name, torch.nn.Linear(2, 2), tc, 0)
            with warnings.catch_warnings():      # an empty KL window warns once, in the run itself
                warnings.simplefilter("ignore")
                make_kl_loss(name, torch.nn.Linear(2, 2), dataclasses.replace(tc, device="cpu"), total, 1, 2)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"{name} options: {exc}") from None
    kl_start, mesa_decay = kl_schedule(cfg["epochs"], total, args.kl_start_epoch, args.mesa_decay)
    command = "python -m vsam_ext.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                              else sys.argv[1:]))
    env = {"torch": torch.__version__, "vsam_ext": __version__, "python": platform.python_version(),
           "data_dir": data_dir,
           "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                  else platform.processor() or platform.machine()),
           "threads": threads, "cpu_count": os.cpu_count(), "backends": available_backends()}

    os.makedirs(out_dir, exist_ok=True)          # every check has passed: only now anything on disk
    log(f"vsam_ext.train -> {out_dir}")
    log(f"  data     {data.describe()} (from {data_dir}, loaded in {t_load:.1f} s)")
    log(f"  model    {cfg['model']} ({sum(p.numel() for p in _count_model(cfg['model'], data.num_classes)):,} "
        f"parameters); device {device}" + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""))
    log(f"  recipe   {cfg['epochs']} epochs x {spe} steps = {total} steps, batch {cfg['batch_size']}, "
        f"SGD lr {cfg['lr']} momentum {cfg['momentum']} wd {cfg['weight_decay']}, cosine per step, "
        f"label smoothing {cfg['label_smoothing']}, rho {cfg['rho']}")
    if any(o in VSAM_LIKE for o in optimizers):
        log(f"  vSAM     warm-up {warmup} steps ({100.0 * warmup / max(1, total):.1f}% of {total}), "
            f"window K = {window} ({n_windows:.1f} windows after warm-up)"
            + (f"; {vsam_options}" if vsam_options else ""))
    if any(o in KL_LOSSES for o in optimizers):
        log(f"  SAF/MESA KL term on for epochs {kl_start + 2}..{cfg['epochs']} (1-based; after 0-based epoch "
            f"{kl_start}), T {args.kl_temperature}"
            + (f"; saf lambda {args.saf_lam}, E~ {args.saf_epochs_ago}" if "saf" in optimizers else "")
            + (f"; mesa lambda {args.mesa_lam}, EMA decay {mesa_decay:.6g}" if "mesa" in optimizers else ""))
    log(f"  runs     {','.join(optimizers)} x seeds {','.join(map(str, seeds))}")

    payload = {"command": command, "settings": cfg, "train_config": tc.to_dict(),
               "vsam": {"warmup_steps": warmup, "window": window, "windows_after_warmup": n_windows,
                        "total_steps": total, "steps_per_epoch": spe},
               "kl": {"kl_start_epoch": kl_start, "mesa_decay": mesa_decay, "epochs_numbered_from": 0},
               "data": {"dataset": data.name, "train": len(data.y_train), "test": len(data.y_test),
                        "val": 0 if data.y_val is None else len(data.y_val),
                        "augmentation": data.augment.describe()},
               "environment": env, "runs": [], "complete": False}
    json_path = os.path.join(out_dir, "results.json")
    t_all = time.perf_counter()
    for seed in seeds:                   # seeds outside: machine noise hits every optimizer alike
        for name in optimizers:
            run = train_run(name, seed, data, tc, log=log)
            f = run["final"]
            log(f"  {name} seed {seed}: test acc {f['test_acc']:.2f}%  SAM steps {f['sam_steps']}/{f['steps']}  "
                f"train {f['train_time']:.1f} s  AIS {f['ais']:.0f} img/s")
            payload["runs"].append(run)
            report.write_json(json_path, payload)        # after every run: a partial file survives
    payload["total_time"] = time.perf_counter() - t_all
    write_reports(payload, out_dir, log)
    return 0


def write_reports(payload: dict, out_dir: str, log=print) -> dict:
    """From a results payload: the summary (into the payload), results.json, results.md, the
    plots; prints the table. Used at the end of a run and by ``--merge``."""
    from . import report
    from .loop import OPTIMIZERS

    cfg, v, d, env = payload["settings"], payload["vsam"], payload["data"], payload["environment"]
    present = {r["optimizer"] for r in payload["runs"]}
    order = [o for o in _parse_list(cfg["optimizers"], str, "optimizers") if o in present]
    order += [o for o in OPTIMIZERS if o in present and o not in order]
    seeds = sorted({r["seed"] for r in payload["runs"]})
    rows = report.summarize(payload["runs"], order)
    payload["summary"] = rows
    payload["complete"] = True
    report.write_json(os.path.join(out_dir, "results.json"), payload)

    title = (f"{d['dataset']} ({d['train']} train), {cfg['model']}, {cfg['epochs']} epochs, "
             f"seeds {','.join(map(str, seeds))}")
    plots = report.plot_all(payload["runs"], order, out_dir, v["warmup_steps"], v["window"], title)
    table = report.format_table(rows)
    checks = report.target_check(rows)
    threads = env.get("threads")
    commands = payload.get("commands") or [payload["command"]]
    md = [f"# {title}", ""] + [f"`{c}`" for c in commands] + [
          "",
          f"{d['dataset']}: train {d['train']}" + (f", val {d['val']}" if d.get("val") else "") +
          f", test {d['test']}; augmentation: {d['augmentation']}; {v['total_steps']} steps, batch "
          f"{cfg['batch_size']}, lr {cfg['lr']} (cosine), momentum {cfg['momentum']}, wd {cfg['weight_decay']}, "
          f"label smoothing {cfg['label_smoothing']}, rho {cfg['rho']}; vSAM warm-up {v['warmup_steps']}, "
          f"window {v['window']}; device {env['device_name']}" + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else "")
          + f"; torch {env['torch']}.",
          "", "Test accuracy: final epoch, mean ± sample std over seeds. Wall time: of the training steps "
          "including batching and augmentation, evaluation excluded; AIS (average images per second) = "
          "training images / that wall time, mean over seeds; AIS / SAM's = 100 x AIS / SAM's AIS (needs a sam "
          "run); SAM steps: steps with a second (perturbed) pass, 0 for sgd, saf and mesa. "
          "CPU time: the process's CPU seconds over the same span (all threads; on a shared machine with "
          "--threads 1 it is close to the wall time the run would take alone).",
          "", table, ""]
    kl = payload.get("kl")
    if kl and present & {"saf", "mesa"}:
        md[-3:-3] = ["", f"SAF/MESA: KL term after 0-based epoch {kl['kl_start_epoch']} to the end"
                     + (f"; MESA EMA decay {kl['mesa_decay']:.6g}" if "mesa" in present else "")
                     + " (the authors' 5 of 200 epochs and 0.9998 over 78 000 steps, scaled to the run)."]
    if checks:
        md += ["Checks of the vSAM variants against the target (one line each: what is compared, the "
               "threshold, PASS / FAIL / n/a):", ""]
    md += [f"- {c}" for c in checks]
    md += ["", "Plots: " + ", ".join(os.path.basename(p) for p in plots.values() if p), ""]
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write("\n".join(md))
    log("")
    log(table)
    for c in checks:
        log("  " + c)
    total = payload.get("total_time")
    log((f"total {total:.0f} s; " if total else "") + f"wrote {out_dir}/results.md, results.json, "
        + ", ".join(os.path.basename(p) for p in plots.values() if p))
    return payload


# settings that may differ between merged result files (they choose which runs were made)
_MERGE_FREE = {"optimizers", "seeds", "preset"}


def merge(sources: List[str], out_dir: str, log=print) -> int:
    """Join the runs of several result folders (or results.json files) made with the same
    settings, e.g. one invocation per optimizer or per seed, into one table and one set of plots.
    Timings are comparable only between runs made on the same kind of machine, one at a time."""
    import json

    payloads = []
    for src in sources:
        path = os.path.join(src, "results.json") if os.path.isdir(src) else src
        try:
            with open(path) as fh:
                payloads.append((path, json.load(fh)))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--merge: cannot read {path}: {' '.join(str(exc).split())}") from None
    base_path, base = payloads[0]
    runs, seen, commands, devices = [], set(), [], set()
    for path, pl in payloads:
        diff = {k for k in set(base["settings"]) | set(pl["settings"])
                if k not in _MERGE_FREE and base["settings"].get(k) != pl["settings"].get(k)}
        if diff or pl["vsam"] != base["vsam"] or pl["data"] != base["data"]:
            keys = sorted(diff) or ["vsam/data"]
            raise SystemExit(f"--merge: {path} was made with other settings than {base_path}: {keys}")
        devices.add(pl["environment"]["device_name"])
        commands.append(pl["command"])
        for r in pl["runs"]:
            key = (r["optimizer"], r["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {key[0]} seed {key[1]} appears twice (second in {path})")
            seen.add(key)
            runs.append(r)
    if len(devices) > 1:
        log(f"warning: the runs come from different machines {sorted(devices)}: timings are not comparable")
    merged = dict(base)
    merged["runs"] = runs
    merged["commands"] = commands
    merged["command"] = "merged: " + " + ".join(sources)
    merged["total_time"] = None
    merged["settings"] = dict(base["settings"], optimizers=",".join(dict.fromkeys(r["optimizer"] for r in runs)))
    os.makedirs(out_dir, exist_ok=True)
    write_reports(merged, out_dir, log)
    return 0


def _count_model(name: str, num_classes: int):
    from .models import build_model
    return build_model(name, num_classes).parameters()
