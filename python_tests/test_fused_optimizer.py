"""Optimizer level: every backend (fused base steps included) against the reference backend.

Each backend runs on the device it serves (helpers.device_for): CUDA tensors for ``cuda``, and
for ``triton`` when there is a GPU; the reference runs on CPU tensors. Results are compared on
the CPU."""
import io

import pytest
import torch

from vsam_ext import AESAM, SAM, VSAM, LookSAM, PeriodicSAM
from helpers import FUSED_PARAMS, TRITON_INTERPRETED, closure_for, device_for, device_of, make_mlp, run

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov_damp": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_dampening": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3)),
    "sgd_plain": (torch.optim.SGD, dict(lr=0.05)),
    "adamw": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2)),
    "adam": (torch.optim.Adam, dict(lr=3e-3)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3)),     # not fused: reuse op + base.step()
}
OPTIMIZERS = {
    "vsam": (VSAM, dict(window=6, slices=1, warmup_steps=5, stat_tensors=2)),
    "vsam_a": (VSAM, dict(window=6, slices=1, warmup_steps=5, reuse_decay=0.0)),
    "sam": (SAM, {}),
    "asam": (SAM, dict(adaptive=True, rho=0.5)),
    "asam-davda54": (SAM, dict(adaptive="davda54", rho=2.0)),
    "sam5": (PeriodicSAM, dict(period=5)),
    "looksam": (LookSAM, dict(k=3, alpha=0.7)),
    "aesam": (AESAM, dict(total_steps=60)),
}
# LookSAM's own ops run before the base step, AE-SAM has no op of its own: one fused SGD, one
# fused AdamW and one generic base suffice for them (CI time: the Triton interpreter is slow).
FEW_BASES = {"looksam": ("sgd", "adamw", "rmsprop"), "aesam": ("sgd",)}
PAIRS = [(o, b) for o in OPTIMIZERS for b in BASES if b in FEW_BASES.get(o, BASES)]


def _build(backend, opt_name, base_name, dtype=torch.float64, seed=0):
    model = make_mlp(seed=seed, dtype=dtype).to(device_for(backend))
    cls, kw = OPTIMIZERS[opt_name]
    base, base_kw = BASES[base_name]
    return model, cls(model.parameters(), base, backend=backend, **kw, **base_kw)


def _assert_close(a, b, rtol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("backend", FUSED_PARAMS)
@pytest.mark.parametrize("opt_name,base_name", PAIRS)
def test_backend_matches_reference_over_60_steps(backend, opt_name, base_name):
    if backend == "triton" and TRITON_INTERPRETED and base_name == "rmsprop":
        pytest.skip("interpreter time")
    ref_model, ref = _build("reference", opt_name, base_name)
    model, opt = _build(backend, opt_name, base_name)
    assert opt.backend == backend and device_of(model) == device_for(backend)
    ref_dec = run(ref_model, ref, 60, dtype=torch.float64)
    dec = run(model, opt, 60, dtype=torch.float64)
    assert dec == ref_dec
    if opt_name.startswith("vsam"):
        assert 0 < sum(dec[5:]) < 55          # both kinds of step after warm-up
    _assert_close(model, ref_model, rtol=1e-9)


@pytest.mark.parametrize("backend", FUSED_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_matches_reference_in_low_precision(backend, dtype):
    ref_model, ref = _build("reference", "vsam", "sgd", dtype=dtype)
    model, opt = _build(backend, "vsam", "sgd", dtype=dtype)
    assert run(model, opt, 40, dtype=dtype) == run(ref_model, ref, 40, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach().float().cpu(), q.detach().float().cpu(), rtol=tol, atol=tol)


def test_fused_state_is_the_base_optimizers_state():
    """The fused step keeps torch's own state tensors (as views), so torch can take over."""
    model, opt = _build("reference", "vsam", "sgd")
    run(model, opt, 12, dtype=torch.float64)
    flat = opt._fused_base.flat_state[id(opt.flat.buffers[0])]["momentum_buffer"]
    for p in model.parameters():
        buf = opt.base_optimizer.state[p]["momentum_buffer"]
        assert buf.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    model_a, adam = _build("reference", "sam", "adamw")
    run(model_a, adam, 3, dtype=torch.float64)
    for p in model_a.parameters():
        st = adam.base_optimizer.state[p]
        assert float(st["step"]) == 3.0 and st["exp_avg"].shape == p.shape


@pytest.mark.parametrize("base_name", ["sgd_dampening", "adamw"])
def test_fused_and_generic_paths_interleave(base_name):
    """A parameter that misses its gradient on some steps sends those steps through base.step();
    the state then goes back into the flat buffers. Same result as never fusing."""
    def go(fused):
        model = make_mlp(dtype=torch.float64)
        extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        base, kw = BASES[base_name]
        opt = VSAM(list(model.parameters()) + [extra], base, backend="reference", fused_base=fused,
                   window=6, slices=1, warmup_steps=3, **kw)
        for t in range(30):
            inner = closure_for(model, opt, t, torch.float64)

            def closure():
                loss = inner()
                if t % 4 == 1:                     # `extra` gets a gradient on some steps only
                    (extra.sum() * 0.1).backward()
                return loss
            opt.step(closure)
        return model, extra

    (m1, e1), (m2, e2) = go(True), go(False)
    _assert_close(m1, m2, rtol=1e-10)
    torch.testing.assert_close(e1, e2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED_PARAMS)
def test_checkpoint_moves_across_backends(backend):
    """Save with one backend, resume with another: the run continues (decisions identical)."""
    ref_model, ref = _build("reference", "vsam", "adamw")
    ref_dec = run(ref_model, ref, 40, dtype=torch.float64)
    model, opt = _build(backend, "vsam", "adamw")
    assert device_of(model) == device_for(backend)
    dec = run(model, opt, 17, dtype=torch.float64)
    f = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, f)
    f.seek(0)
    ck = torch.load(f, map_location="cpu", weights_only=True)
    model2, opt2 = _build("reference", "vsam", "adamw", seed=5)
    model2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    dec += run(model2, opt2, 23, start=17, dtype=torch.float64)
    assert dec == ref_dec
    _assert_close(model2, ref_model, rtol=1e-9)
