"""DistributedDataParallel: two gloo processes on the CPU, every family member, 100 steps.

Each rank trains on its half of every batch. Both passes' gradients are all-reduced by DDP, so
the SAM perturbation, the PSF and the controllers' statistics are the same on both ranks: the
decisions must be identical, the parameters identical bit for bit, and equal (to rounding) to
one process training on the concatenated batches. ESAM and AUSAM select samples per rank (the
selection is local by design), so for them the single-process comparison does not apply; the
ranks must still agree.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vsam_ext as vx
from helpers import batch, make_mlp

WORLD, STEPS, BATCH = 2, 100, 24
DTYPE = torch.float64
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
OPTIMIZERS = {
    "sam": lambda ps, **kw: vx.SAM(ps, torch.optim.SGD, **kw, **SGD),
    "asam": lambda ps, **kw: vx.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw, **SGD),
    "sam5": lambda ps, **kw: vx.PeriodicSAM(ps, torch.optim.SGD, period=5, **kw, **SGD),
    "vsam": lambda ps, **kw: vx.VSAM(ps, torch.optim.SGD, window=10, slices=2, warmup_steps=10, seed=3, **kw, **SGD),
    "looksam": lambda ps, **kw: vx.LookSAM(ps, torch.optim.SGD, k=3, **kw, **SGD),
    "aesam": lambda ps, **kw: vx.AESAM(ps, torch.optim.SGD, total_steps=STEPS, **kw, **SGD),
    "esam": lambda ps, **kw: vx.ESAM(ps, torch.optim.SGD, beta=1.0, gamma=0.5, **kw, **SGD),
    "esam-swp": lambda ps, **kw: vx.ESAM(ps, torch.optim.SGD, beta=0.6, gamma=0.5, **kw, **SGD),
    "ausam": lambda ps, **kw: vx.AUSAM(ps, torch.optim.SGD, num_samples=96, ramp_epochs=2, **kw, **SGD),
}
PER_RANK = {f"{name}-per-rank": OPTIMIZERS[name] for name in ("sam", "vsam", "looksam", "aesam")}
LOCAL_SELECTION = {"esam", "esam-swp", "ausam"}
# ESAM's SWP turns requires_grad off for some tensors in the first pass: DDP must be told that
# some parameters may get no gradient in a backward.
FIND_UNUSED = {"esam-swp"}


def sample_ids(t):
    """AUSAM: 96 samples, a seeded permutation per epoch, 4 batches of 24 per epoch."""
    return torch.randperm(96, generator=torch.Generator().manual_seed(t // 4)).view(4, BATCH)[t % 4]


def train(name, model, opt, rank=None):
    """STEPS steps; with ``rank``, this rank's half of each batch. Returns the decisions."""
    decisions = []
    for t in range(STEPS):
        x, y = batch(t, DTYPE, n=BATCH)
        ids = sample_ids(t)
        if rank is not None:
            part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            x, y, ids = x[part], y[part], ids[part]
        if name in LOCAL_SELECTION:
            def closure(indices=None, x=x, y=y):
                xb, yb = (x, y) if indices is None else (x[indices], y[indices])
                return F.cross_entropy(model(xb), yb, reduction="none")
            opt.step(closure, ids) if name == "ausam" else opt.step(closure)
        else:
            def closure(x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        decisions.append(bool(opt.stats["last_step_sam"]))
    return decisions


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, build in {**OPTIMIZERS, **PER_RANK}.items():
            model = make_mlp(dtype=DTYPE)
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=name in FIND_UNUSED)
            extra = {"perturbation": "per_rank"} if name in PER_RANK else {}
            opt = build(ddp.parameters(), model=ddp, **extra)          # built after wrapping
            decisions = train(name, ddp, opt, rank)
            results[name] = {"decisions": decisions, "params": [p.detach().clone() for p in model.parameters()]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(OPTIMIZERS) + list(PER_RANK))
def test_ddp_ranks_agree(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert a["decisions"] == b["decisions"]
    assert 0 < sum(a["decisions"]) <= STEPS
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in LOCAL_SELECTION])
def test_ddp_equals_one_process_on_the_whole_batch(ranks, name):
    model = make_mlp(dtype=DTYPE)
    opt = OPTIMIZERS[name](model.parameters(), model=model)
    decisions = train(name, model, opt)
    assert ranks[0][name]["decisions"] == decisions
    for p, q in zip(ranks[0][name]["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)


def test_fsdp1_flat_parameter_is_refused_clearly():
    """FSDP1's FlatParameter mixes the shards of many tensors: refused by name, pointing at FSDP2
    (supported: python_tests/test_fsdp.py)."""
    class FlatParameter(torch.nn.Parameter):       # stands in for FSDP1's (same class name)
        pass
    p = FlatParameter(torch.zeros(4))
    with pytest.raises(TypeError, match="FSDP1 parameter .* use FSDP2"):
        vx.SAM([p], torch.optim.SGD, lr=0.1)
    assert torch.equal(p, torch.zeros(4)) and p.grad is None


def test_per_rank_perturbation_is_m_sharpness(ranks):
    """SAM with perturbation='per_rank' equals, to rounding, one process that perturbs each
    half-batch along its own gradient and averages the two perturbed gradients (m = 12); and
    it differs from the global perturbation."""
    model = make_mlp(dtype=DTYPE)
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD)
    rho = 0.05
    for t in range(STEPS):
        x, y = batch(t, DTYPE, n=BATCH)
        g_sam = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            part = slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD)
            grads = torch.autograd.grad(F.cross_entropy(model(x[part]), y[part]), params)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            with torch.no_grad():
                saved = [p.clone() for p in params]
                for p, g in zip(params, grads):
                    p.add_(g * (rho / (norm + 1e-12)))
            grads_s = torch.autograd.grad(F.cross_entropy(model(x[part]), y[part]), params)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            for acc, g in zip(g_sam, grads_s):
                acc += g / WORLD
        for p, g in zip(params, g_sam):
            p.grad = g
        base.step()
    for p, q in zip(ranks[0]["sam-per-rank"]["params"], params):   # 1e-6: the SAM norm is fp32 (spec)
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(p, q, rtol=1e-6, atol=0)
               for p, q in zip(ranks[0]["sam-per-rank"]["params"], ranks[0]["sam"]["params"]))


def test_per_rank_perturbation_needs_a_ddp_module():
    model = make_mlp()
    with pytest.raises(ValueError, match="perturbation='per_rank' needs model= the DistributedDataParallel"):
        vx.VSAM(model.parameters(), torch.optim.SGD, lr=0.1, perturbation="per_rank", model=model)
    with pytest.raises(ValueError, match="perturbation must be one of 'global', 'per_rank'"):
        vx.SAM(model.parameters(), torch.optim.SGD, lr=0.1, perturbation="local")
    with pytest.raises(ValueError, match="not built for ESAM"):
        vx.ESAM(model.parameters(), torch.optim.SGD, lr=0.1, perturbation="per_rank")
