"""The spawned side of test_fsdp.py: FSDP2 (``fully_shard``) on the CPU with gloo.

``run(rank, world, port, out_dir)`` runs every case of ``CASES`` in one process group and writes
``rank<r>.pt`` with what test_fsdp.py checks: per step ``opt.stats`` (the decision and the
controller's numbers), the gathered parameters, the local shard sizes, the DDP comparison of
ESAM and AUSAM, the DCP resume, the errors of the refused parameter kinds, and the
single-process references (``oracle``, shared out over the ranks: they need no collective) and
each case's CPU seconds.

The model: Linear(6, 11), BatchNorm1d(11), Tanh, Linear(11, 7), Tanh, Linear(7, 3); every
Linear is ``fully_shard``-ed, then the root (which holds the BatchNorm's two parameters). The
odd sizes give uneven shards (11 rows over 4 ranks: 3, 3, 3, 2), and over 4 ranks the last
Linear's weight (3 rows) and bias (3 elements) are empty on rank 3.
"""
import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import vsam_ext as vx

STEPS = 50           # steps of every case
RESUME_AT = 25       # the DCP cases save here and a fresh model + optimizer continues to STEPS
BATCH = 24           # the global batch: rank r trains on rows [r * BATCH // R, (r + 1) * BATCH // R)
N_SAMPLES = 96       # AUSAM's data set: 4 batches per epoch
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
ADAMW = dict(lr=3e-3, weight_decay=1e-2)

# name -> (builder(params, **kw), dtype). Built after fully_shard, on model.parameters().
CASES = {
    "sam": (lambda ps, **kw: vx.SAM(ps, torch.optim.SGD, **kw, **SGD), torch.float64),
    "asam": (lambda ps, **kw: vx.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw, **SGD), torch.float64),
    "sam3": (lambda ps, **kw: vx.PeriodicSAM(ps, torch.optim.SGD, period=3, **kw, **SGD), torch.float64),
    # warm-up 10, then windows of 10: it samples (some steps SAM, some cheap) and reuses the PSF.
    "vsam": (lambda ps, **kw: vx.VSAM(ps, torch.optim.SGD, window=10, slices=2, warmup_steps=10, seed=3,
                                      **kw, **SGD), torch.float64),
    "looksam": (lambda ps, **kw: vx.LookSAM(ps, torch.optim.SGD, k=3, **kw, **SGD), torch.float64),
    "aesam": (lambda ps, **kw: vx.AESAM(ps, torch.optim.SGD, total_steps=STEPS, **kw, **SGD), torch.float64),
    # SWP (beta < 1: some tensors get no first-pass gradient) and SDS (gamma < 1).
    "esam": (lambda ps, **kw: vx.ESAM(ps, torch.optim.SGD, beta=0.6, gamma=0.5, **kw, **SGD), torch.float64),
    "ausam": (lambda ps, **kw: vx.AUSAM(ps, torch.optim.SGD, num_samples=N_SAMPLES, ramp_epochs=2, **kw, **SGD),
              torch.float64),
    "vsam-adamw": (lambda ps, **kw: vx.VSAM(ps, torch.optim.AdamW, window=10, slices=2, warmup_steps=10, seed=3,
                                            **kw, **ADAMW), torch.float64),
    "vsam-f32": (lambda ps, **kw: vx.VSAM(ps, torch.optim.SGD, window=10, slices=2, warmup_steps=10, seed=3,
                                          **kw, **SGD), torch.float32),
}
# Sample selection happens per rank, on the rank's own part of the batch: compared with DDP.
PER_SAMPLE = {"esam", "ausam"}
# Saved at RESUME_AT with torch.distributed.checkpoint, resumed in a fresh model + optimizer.
DCP_CASES = ("vsam", "looksam", "vsam-adamw")


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 11), nn.BatchNorm1d(11), nn.Tanh(), nn.Linear(11, 7), nn.Tanh(),
                         nn.Linear(7, 3)).to(dtype)


def shard(model, mesh):
    """Every Linear, then the root. With 2 ranks FSDP2's defaults (the Linear layers reshard
    after forward, so backward all-gathers them again); with 4 ranks nothing reshards after
    forward (the unsharded parameters live from forward to backward: fewer collectives where
    they cost most, and the other FSDP2 state machine is covered too)."""
    from torch.distributed.fsdp import fully_shard
    reshard = None if mesh.size() == 2 else False
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def global_batch(t, dtype):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(BATCH, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (BATCH,), generator=g)
    ids = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(t // 4)).view(4, BATCH)[t % 4]
    return x, y, ids


def chunk(t, dtype, rank, world):
    """This rank's part of step t's batch (x, y, AUSAM's sample ids)."""
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return tuple(v[part] for v in global_batch(t, dtype))


def take_step(name, model, opt, x, y, ids):
    """One step on (x, y): a plain closure, or ESAM/AUSAM's per-sample closure."""
    if name in PER_SAMPLE:
        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")
        return opt.step(closure, ids) if name == "ausam" else opt.step(closure)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return opt.step(closure)


def record(opt):
    """The step's ``opt.stats``: the decision and what the controller computed from the summed
    scalars (vSAM's quota, probability and change rates, AE-SAM's moments, ...)."""
    return dict(opt.stats)


def oracle(name, world, steps=STEPS):
    """One process, the unsharded model (same init), the whole global batch. The loss is the mean
    over the ``world`` chunks of loss(model(chunk)), one forward per chunk: each rank's
    BatchNorm normalizes over its own chunk, so this is the function the ranks minimise
    together (FSDP averages the ranks' gradients). Returns (records, parameters)."""
    build, dtype = CASES[name]
    model = make_model(dtype)
    opt = build(model.parameters(), model=model)
    records = []
    for t in range(steps):
        x, y, _ = global_batch(t, dtype)
        xs, ys = x.chunk(world), y.chunk(world)

        def closure():
            loss = sum(F.cross_entropy(model(a), b) for a, b in zip(xs, ys)) / world
            loss.backward()
            return loss
        opt.step(closure)
        records.append(record(opt))
    return records, [p.detach().clone() for p in model.parameters()]


# -- the workers ---------------------------------------------------------------------------
def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _train(name, model, opt, rank, world, start, stop, save_dir=None):
    dtype = CASES[name][1]
    records = []
    for t in range(start, stop):
        if save_dir is not None and t == RESUME_AT:
            import torch.distributed.checkpoint as dcp
            dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=save_dir)
        take_step(name, model, opt, *chunk(t, dtype, rank, world))
        records.append(record(opt))
    return records


def _case(name, rank, world, mesh, out_dir):
    build, dtype = CASES[name]
    model = shard(make_model(dtype), mesh)
    opt = build(model.parameters(), model=model)                  # built after fully_shard
    save_dir = os.path.join(out_dir, f"dcp-{name}") if name in DCP_CASES else None
    result = {"records": _train(name, model, opt, rank, world, 0, STEPS, save_dir), "params": _full(model),
              "local_numels": [p.to_local().numel() for p in model.parameters()]}
    if name in PER_SAMPLE:
        # ESAM and AUSAM choose their samples per rank from the rank's own chunk (ESAM: the
        # ceil(gamma * B_r) sharpest of the chunk; AUSAM: a draw from the rank's own importance
        # table, which holds only the samples this rank stepped over, and its own epoch count).
        # One process cannot express that through their closure (ESAM would rank the whole
        # batch; AUSAM would draw from one table and count one epoch), so the reference is
        # DistributedDataParallel (BatchNorm per rank too, as FSDP2), which the library
        # already supports and test_ddp.py checks: same world size, same processes, same chunks,
        # same per-rank selection; FSDP2 must take the same decisions and reach the same weights.
        plain = make_model(dtype)
        ddp = torch.nn.parallel.DistributedDataParallel(plain, find_unused_parameters=name == "esam",
                                                        broadcast_buffers=False)   # BN buffers: not compared
        ddp_opt = build(ddp.parameters(), model=ddp)
        result["ddp_records"] = _train(name, ddp, ddp_opt, rank, world, 0, STEPS)
        result["ddp_params"] = [p.detach().clone() for p in plain.parameters()]
    if save_dir is not None:
        import torch.distributed.checkpoint as dcp
        fresh = shard(make_model(dtype, seed=123), mesh)            # other weights: the load must matter
        fresh_opt = build(fresh.parameters(), model=fresh)
        state = {"model": fresh.state_dict(), "optim": fresh_opt.state_dict()}
        dcp.load(state, checkpoint_id=save_dir)
        fresh.load_state_dict(state["model"])
        fresh_opt.load_state_dict(state["optim"])
        result["resumed_records"] = _train(name, fresh, fresh_opt, rank, world, RESUME_AT, STEPS)
        result["resumed_params"] = _full(fresh)
        result["resumed_local"] = [p.to_local().detach().clone() for p in fresh.parameters()]
        result["local"] = [p.to_local().detach().clone() for p in model.parameters()]
    return result


def _refusal(make_params):
    """Build SAM on ``make_params()``; return (exception type, message, parameters unchanged)."""
    params = make_params()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    before = [(t.data_ptr(), t.detach().clone()) for t in local]
    try:
        vx.SAM(params, torch.optim.SGD, lr=0.1)
        err = (None, "no error")
    except Exception as e:            # noqa: BLE001 - the test checks the kind
        err = (type(e).__name__, str(e))
    after = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    unchanged = all(t.data_ptr() == ptr and torch.equal(t, v) for t, (ptr, v) in zip(after, before))
    return err + (unchanged,)


def _errors(world, mesh):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def dtensor(placements, on_mesh):
        torch.manual_seed(7)
        return nn.Parameter(distribute_tensor(torch.randn(8, 5), on_mesh, placements))

    out = {
        "replicate": _refusal(lambda: [dtensor([Replicate()], mesh)]),
        "mixed": _refusal(lambda: [dtensor([Shard(0)], mesh), nn.Parameter(torch.randn(4))]),
        "mixed-plain-first": _refusal(lambda: [nn.Parameter(torch.randn(4)), dtensor([Shard(0)], mesh)]),
    }
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        out["2d-mesh"] = _refusal(lambda: [dtensor([Replicate(), Shard(0)], mesh2)])
        out["2d-mesh-sharded"] = _refusal(lambda: [dtensor([Shard(0), Shard(1)], mesh2)])
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        for orig in (False, True):
            fsdp1 = FullyShardedDataParallel(make_model(torch.float32), device_id=torch.device("cpu"),
                                             use_orig_params=orig)
            out[f"fsdp1-orig-params-{orig}"] = _refusal(lambda: list(fsdp1.parameters()))
    except Exception as e:            # noqa: BLE001 - FSDP1 could not be built here: reported
        out["fsdp1-unavailable"] = f"{type(e).__name__}: {e}"
    return out


def run(rank, world, port, out_dir, cases=None):
    """The entry point of ``torch.multiprocessing.start_processes``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that fails alone leaves the others in a collective: they give up after a minute.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        results, cpu = {}, {}
        for name in cases or CASES:
            start = time.process_time()
            try:
                results[name] = _case(name, rank, world, mesh, out_dir)
            except Exception:         # noqa: BLE001 - a failing case fails its test, not the others
                results[name] = {"error": traceback.format_exc()}
            cpu[name] = time.process_time() - start
        # The single-process references, shared out over the ranks (they need no collective).
        start = time.process_time()
        names = [n for n in cases or CASES if n not in PER_SAMPLE]
        results["oracle"] = {n: oracle(n, world) for n in names[rank::world]}
        cpu["oracle"] = time.process_time() - start
        results["cpu_seconds"] = cpu
        try:
            results["errors"] = _errors(world, mesh)
        except Exception:             # noqa: BLE001
            results["errors"] = {"error": traceback.format_exc()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
