"""Checks that need a GPU (skipped without one): no host-device sync on the hot path, the
pinned statistics queue, and CUDA tensors through the whole optimizer."""
import pytest
import torch

from vsam_ext import AESAM, AUSAM, ESAM, SAM, VSAM, LookSAM, PeriodicSAM, available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = [b for b in available_backends() if b in ("cuda", "triton", "reference")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10)).cuda()


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_no_sync_in_200_vsam_steps(backend, base):
    model = _model()
    kw = dict(lr=0.01, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    opt = VSAM(model.parameters(), base, backend=backend, window=10, slices=2, warmup_steps=20, model=model, **kw)
    x = torch.randn(64, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)                       # lazy allocations happen outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(200):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s = opt.stats
    assert s["steps"] == 201 and 20 < s["sam_steps"] < 201


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_vsam_matches_cpu_reference(backend):
    def go(device, b):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double().to(device)
        opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=b, window=6, slices=1,
                   warmup_steps=5, stat_tensors=2)
        dec = []
        for t in range(80):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(16, 8, generator=g, dtype=torch.float64).to(device)
            y = torch.randint(0, 3, (16,), generator=g).to(device)

            def closure():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            dec.append(opt.stats["last_step_sam"])
        return dec, [p.detach().cpu() for p in model.parameters()]

    dec_ref, p_ref = go("cpu", "reference")
    dec, ps = go("cuda", backend)
    assert dec == dec_ref
    for a, b in zip(ps, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_sam_and_periodic_run_on_cuda():
    for cls, kw in ((SAM, {}), (PeriodicSAM, {"period": 3})):
        model = _model()
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.01, model=model, **kw)
        x = torch.randn(64, 32, device="cuda")
        y = torch.randint(0, 10, (64,), device="cuda")
        for _ in range(5):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
        assert all(torch.isfinite(p).all() for p in model.parameters())


FAMILY = {
    "asam": lambda ps, **kw: SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
    "looksam": lambda ps, **kw: LookSAM(ps, torch.optim.SGD, k=3, **kw),
    "aesam": lambda ps, **kw: AESAM(ps, torch.optim.SGD, total_steps=40, **kw),
    "esam": lambda ps, **kw: ESAM(ps, torch.optim.SGD, **kw),
    "ausam": lambda ps, **kw: AUSAM(ps, torch.optim.SGD, num_samples=64, ramp_epochs=2, **kw),
}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_family_on_cuda_matches_cpu_reference(backend, name):
    """Each family member on CUDA tensors (fp64) against the reference backend on the CPU: same
    decisions, parameters to rounding, over 40 steps (4 epochs of 64 samples for AUSAM)."""
    def go(device, b):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double().to(device)
        opt = FAMILY[name](model.parameters(), lr=0.05, momentum=0.9, backend=b)
        dec = []
        for t in range(40):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(16, 8, generator=g, dtype=torch.float64).to(device)
            y = torch.randint(0, 3, (16,), generator=g).to(device)
            ids = torch.randperm(64, generator=torch.Generator().manual_seed(t // 4)).view(4, 16)[t % 4]
            if name in ("esam", "ausam"):
                def closure(indices=None):
                    xb, yb = (x, y) if indices is None else (x[indices], y[indices])
                    return torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
                opt.step(closure, ids) if name == "ausam" else opt.step(closure)
            else:
                def closure():
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            dec.append(opt.stats["last_step_sam"])
        return dec, [p.detach().cpu() for p in model.parameters()]

    dec_ref, p_ref = go("cpu", "reference")
    dec, ps = go("cuda", backend)
    assert dec == dec_ref
    for a, b in zip(ps, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
def test_fp16_autocast_with_grad_scaler_on_cuda(backend):
    """The README's fp16 pattern on a device: autocast + GradScaler, 50 vSAM steps, an injected
    overflow skipped as a whole."""
    model = _model()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9, backend=backend, window=10,
               slices=2, warmup_steps=5, model=model)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(64, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    for t in range(50):
        def closure():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if t == 30:
                model[0].weight.grad[0, 0] = float("inf")
            return loss
        opt.step(closure, grad_scaler=scaler)
        scaler.update()
    assert opt.stats["skipped_steps"] >= 1 and opt.stats["steps"] == 50 - opt.stats["skipped_steps"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
def test_16bit_weights_restored_bit_for_bit_on_cuda(backend, dtype):
    model = _model().to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, backend=backend, model=model)
    x = torch.randn(64, 32, device="cuda", dtype=dtype)
    y = torch.randint(0, 10, (64,), device="cuda")
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x).float(), y).backward())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
