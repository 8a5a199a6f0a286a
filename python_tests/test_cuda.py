"""Checks that need a GPU (skipped without one): no host-device sync on the hot path, the
pinned statistics queue, CUDA tensors through the whole optimizer, the cuda backend's list ops
(multi-tensor apply) against the reference, and a model on CUDA and CPU devices at once."""
import math

import pytest
import torch

from vsam_ext import AESAM, AUSAM, ESAM, SAM, VSAM, LookSAM, PeriodicSAM, available_backends
from vsam_ext.ops import backend_module, lists as L, reference as R
from test_ops import DTYPES, assert_same, assert_sums, _rand

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = [b for b in available_backends() if b in ("cuda", "triton", "reference")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10)).cuda()


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("param_storage", ["flat", "in_place"])     # in place: the list ops
def test_no_sync_in_200_vsam_steps(backend, base, param_storage):
    model = _model()
    kw = dict(lr=0.01, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    opt = VSAM(model.parameters(), base, backend=backend, window=10, slices=2, warmup_steps=20, model=model,
               param_storage=param_storage, **kw)
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


# -- the list ops' CUDA kernels (multi-tensor apply) --------------------------------------------
# Every *_list op of the cuda backend against the reference op per tensor on CPU copies
# (vsam_ext.ops.lists.per_tensor(reference)): element-wise results bit-identical in all four
# dtypes, sums to rounding; a segment op's sums bit-identical to the flat cuda op on each tensor
# (a tensor is cut into the same chunks by both). The layouts cover empty tensors, sizes around
# and above one chunk (2048 doubles, 4096 floats, 8192 halves), more tensors than one launch's
# kernel argument holds (78 spans at most), and views at odd offsets of one buffer (unaligned:
# the scalar path).
needs_cuda_ext = pytest.mark.skipif("cuda" not in available_backends(), reason="the CUDA extension is not built")
RL = L.per_tensor(R)

_ODD = [(20_001,), (0,), (1,), (12, 5), (7,), (4097,), (2, 3, 3, 3), (8193,), (0, 4), (2049,), (2048,)]
_MANY = [((i * 37) % 300 + (9_000 if i % 50 == 7 else 0),) for i in range(200)] + [(0,)] * 3
LAYOUTS = {"odd": (_ODD, False), "many": (_MANY, False), "views": (_ODD, True)}
STAT_FIRSTS = [0, 3, 10_000]
LIST_SGD_CONFIGS = [
    dict(weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False, maximize=True),
    dict(weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
]
LIST_ADAMW_CONFIGS = [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
                      dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, maximize=True)]
LIST_MODES = ["plain", "reuse", "restore", "restore_psf"]


def _cuda_ops():
    return backend_module("cuda")


def _lists(layout, dtype, seed, positive=False):
    """(CUDA tensors, CPU copies) of the layout's shapes, the same numbers. With views, the CUDA
    tensors are consecutive slices of one buffer (odd offsets: not 16-byte aligned)."""
    shapes, views = LAYOUTS[layout]
    numels = [math.prod(s) for s in shapes]
    starts = [sum(numels[:i]) for i in range(len(numels))]
    flat = _rand(sum(numels), dtype, "cpu", seed, positive)
    cpu = [flat[a:a + n].clone().view(s) for a, n, s in zip(starts, numels, shapes)]
    if views:
        dev = flat.to("cuda")
        return [dev[a:a + n].view(s) for a, n, s in zip(starts, numels, shapes)], cpu
    return [t.to("cuda") for t in cpu], cpu


def _same_lists(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.is_cuda and g.shape == w.shape
        assert_same(g, w)


def _same_stats(got, want):
    if want is None:
        assert got is None
    else:
        assert got is not None and got.is_cuda
        assert_sums(got, want)


def _maths_scalars(values, dtype):
    """(CUDA, CPU) tensors of per-tensor coefficients in the maths dtype of ``dtype``."""
    t = torch.tensor(values, dtype=R.maths_dtype(dtype))
    return t.to("cuda"), t


@needs_cuda_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_list_ops_match_the_reference_and_the_flat_op(layout, dtype):
    E = _cuda_ops()
    x, xr = _lists(layout, dtype, 1)
    w, wr = _lists(layout, dtype, 2)
    for weight, weight_r in ((None, None), (w, wr)):
        got = E.segment_sumsq_list(x, weight, 0.01)
        assert_sums(got, RL.segment_sumsq_list(xr, weight_r, 0.01))
        for i, t in enumerate(x):
            flat = E.segment_sumsq(t.view(-1), [0, t.numel()], None if weight is None else weight[i].view(-1), 0.01)
            assert torch.equal(flat[0], got[i]), i
    got = E.segment_gram_list(x, w)
    assert_sums(got, RL.segment_gram_list(xr, wr))
    for i, (a, b) in enumerate(zip(x, w)):
        assert torch.equal(E.segment_gram(a.view(-1), b.view(-1), [0, a.numel()])[0], got[i]), i
    n = len(x)
    alpha, alpha_r = _maths_scalars([0.5 + 0.01 * i for i in range(n)], dtype)
    beta, beta_r = _maths_scalars([-1.25 + 0.003 * i for i in range(n)], dtype)
    y, yr = _lists(layout, dtype, 3)
    y_flat = [t.clone() for t in y]
    got = E.segment_axpby_list(y, x, alpha, beta)
    assert_sums(got, RL.segment_axpby_list(yr, xr, alpha_r, beta_r))
    _same_lists(y, yr)
    for i, (a, b) in enumerate(zip(y_flat, x)):
        sums = E.segment_axpby(a.view(-1), b.view(-1), alpha[i:i + 1], beta[i:i + 1], [0, a.numel()])
        assert torch.equal(sums[0], got[i]) and torch.equal(a, y[i]), i


@needs_cuda_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive,keep", [(False, False), (False, True), (True, False), (True, True)])
def test_perturb_list_matches_the_reference(layout, dtype, adaptive, keep):
    E = _cuda_ops()
    p, pr = _lists(layout, dtype, 1)
    g, gr = _lists(layout, dtype, 2)
    b, br = _lists(layout, dtype, 3)
    k, kr = _lists(layout, dtype, 4) if keep else (None, None)
    scale, scale_r = (t.reshape(()) for t in _maths_scalars([0.037], dtype))
    E.perturb_list(p, g, scale, b, adaptive, k, 0.01)
    RL.perturb_list(pr, gr, scale_r, br, adaptive, kr, 0.01)
    for got, want in ((p, pr), (b, br)) + (((k, kr),) if keep else ()):
        _same_lists(got, want)


@needs_cuda_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat_first", STAT_FIRSTS)
def test_restore_and_reuse_lists_match_the_reference(layout, dtype, stat_first):
    E = _cuda_ops()
    for with_psf in (False, True):
        p, pr = _lists(layout, dtype, 1)
        b, br = _lists(layout, dtype, 2)
        gs, gsr = _lists(layout, dtype, 3)
        f, fr = _lists(layout, dtype, 4) if with_psf else (None, None)
        stats = E.restore_psf_stats_list(p, b, gs, f, stat_first)
        _same_stats(stats, RL.restore_psf_stats_list(pr, br, gsr, fr, stat_first))
        _same_lists(p, pr)
        if with_psf:
            _same_lists(f, fr)
    g, gr = _lists(layout, dtype, 5)
    f, fr = _lists(layout, dtype, 6)
    E.reuse_list(g, f, 0.3)
    RL.reuse_list(gr, fr, 0.3)
    _same_lists(g, gr)


def _step_lists(layout, dtype, mode, extra):
    """CUDA and CPU (param, grad, psf, backup, *extra) for a fused step in ``mode``."""
    sides = {name: _lists(layout, dtype, seed, positive=(name == "exp_avg_sq"))
             for seed, name in enumerate(("param", "grad", "psf", "backup") + extra, 1)}
    if mode in ("plain", "restore"):
        sides["psf"] = (None, None)
    if mode in ("plain", "reuse"):
        sides["backup"] = (None, None)
    return {k: v[0] for k, v in sides.items()}, {k: v[1] for k, v in sides.items()}


@needs_cuda_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", LIST_MODES)
@pytest.mark.parametrize("cfg", range(len(LIST_SGD_CONFIGS)))
def test_sgd_step_list_matches_the_reference(layout, dtype, mode, cfg):
    E = _cuda_ops()
    c = LIST_SGD_CONFIGS[cfg]
    d, r = _step_lists(layout, dtype, mode, ("momentum_buffer",))
    if c["momentum"] == 0.0:
        d["momentum_buffer"] = r["momentum_buffer"] = None
    for step, stat_first in enumerate((3, 0)):        # consecutive steps: the state carries over
        args = (0.25, stat_first, 0.1, c["weight_decay"], c["momentum"], c["dampening"], c["nesterov"],
                c["maximize"], step == 0)
        got = E.sgd_step_list(d["param"], d["grad"], d["momentum_buffer"], d["psf"], d["backup"], *args)
        want = RL.sgd_step_list(r["param"], r["grad"], r["momentum_buffer"], r["psf"], r["backup"], *args)
        _same_stats(got, want)
        for name in ("param", "grad", "momentum_buffer", "psf", "backup"):
            if d[name] is not None:
                _same_lists(d[name], r[name])


@needs_cuda_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", LIST_MODES)
@pytest.mark.parametrize("cfg", range(len(LIST_ADAMW_CONFIGS)))
def test_adamw_step_list_matches_the_reference(layout, dtype, mode, cfg):
    E = _cuda_ops()
    c = LIST_ADAMW_CONFIGS[cfg]
    d, r = _step_lists(layout, dtype, mode, ("exp_avg", "exp_avg_sq"))
    for step, stat_first in ((1, 5), (2, len(d["param"]))):
        args = (0.25, stat_first, 1e-3, c["beta1"], c["beta2"], c["eps"], c["weight_decay"], step, c["maximize"])
        got = E.adamw_step_list(d["param"], d["grad"], d["exp_avg"], d["exp_avg_sq"], d["psf"], d["backup"], *args)
        want = RL.adamw_step_list(r["param"], r["grad"], r["exp_avg"], r["exp_avg_sq"], r["psf"], r["backup"], *args)
        _same_stats(got, want)
        for name in ("param", "grad", "exp_avg", "exp_avg_sq", "psf", "backup"):
            if d[name] is not None:
                _same_lists(d[name], r[name])


@needs_cuda_ext
def test_list_ops_check_every_tensor_before_writing():
    E = _cuda_ops()
    p, _ = _lists("odd", torch.float32, 1)
    g, _ = _lists("odd", torch.float32, 2)
    b, _ = _lists("odd", torch.float32, 3)
    scale = torch.tensor(0.5, device="cuda")
    before = [t.clone() for t in p]
    for bad, match in (([*g[:-1], g[-1].cpu()], r"grad\[10\] must be a CUDA tensor"),
                       ([*g[:-1], g[-1].double()], r"grad\[10\] has dtype"),
                       ([*g[:-1], torch.zeros(5, device="cuda")], r"grad\[10\] has 5 elements"),
                       (g[:-1], r"grad has 10 tensors"),
                       ([*g[:-1], torch.zeros(64, device="cuda")[::2]], r"grad\[10\] must be contiguous")):
        with pytest.raises(RuntimeError, match=match):
            E.perturb_list(p, bad, scale, b, False, None, 0.0)
        for t, u in zip(p, before):
            assert torch.equal(t, u)
    with pytest.raises(RuntimeError, match="scale"):
        E.perturb_list(p, g, scale.double(), b, False, None, 0.0)
    alpha = torch.ones(len(p), device="cuda")
    with pytest.raises(RuntimeError, match="alpha"):
        E.segment_axpby_list(p, g, alpha[:-1], alpha)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        E.sgd_step_list(p, g, None, None, None, 0.0, 0, 0.1, 0.0, 0.9, 0.0, False, False, True)
    assert E.segment_axpby_list([], [], alpha[:0], alpha[:0]).numel() == 0
    E.perturb_list([], [], scale, [], False, None, 0.0)


@needs_cuda_ext
def test_list_ops_never_synchronise():
    E = _cuda_ops()
    lists = {name: _lists("many", torch.float32, seed)[0] for seed, name in enumerate("pgbfmv", 1)}
    p, g, b, f, m, v = (lists[k] for k in "pgbfmv")
    scale = torch.tensor(0.5, device="cuda")
    alpha = torch.ones(len(p), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        E.segment_sumsq_list(g, p, 0.01)
        E.segment_gram_list(g, f)
        E.segment_axpby_list(f, g, alpha, alpha)
        E.perturb_list(p, g, scale, b, True, f, 0.01)
        E.restore_psf_stats_list(p, b, g, f, 3)
        E.reuse_list(g, f, 0.5)
        E.sgd_step_list(p, g, m, f, b, 0.0, 3, 0.1, 1e-4, 0.9, 0.0, False, False, True)
        E.adamw_step_list(p, g, m, [t.abs() for t in v], f, None, 0.5, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# -- a model on several devices ---------------------------------------------------------------
class _AcrossDevices(torch.nn.Module):
    """Linear layers on the given devices in turn; activations move between them."""

    def __init__(self, devices):
        super().__init__()
        torch.manual_seed(0)
        widths = [8] + [16] * (len(devices) - 1) + [3]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(widths[i], widths[i + 1]).double().to(d)
                                          for i, d in enumerate(devices))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x.to(layer.weight.device))
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def _devices():
    return ["cuda:0", "cpu"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])


@pytest.mark.skipif(not {"cuda", "cpu"} <= set(available_backends()), reason="the C++/CUDA extension is not built")
@pytest.mark.parametrize("param_storage", ["flat", "in_place"])
@pytest.mark.parametrize("cls", ["SAM", "VSAM"])
def test_model_across_cuda_and_cpu_runs_each_devices_backend(cls, param_storage):
    """Parameters on cuda:0 and the CPU (and cuda:1 when there is one): the optimizer runs the
    cuda backend on the CUDA parameters and the cpu backend on the CPU ones (flat buffers, or the
    list ops in place), and matches the reference backend over 30 steps."""
    def go(backend):
        model = _AcrossDevices(_devices())
        kw = dict(window=6, slices=1, warmup_steps=5, stat_tensors=2) if cls == "VSAM" else dict(rho=0.05)
        opt = {"SAM": SAM, "VSAM": VSAM}[cls](model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9,
                                             backend=backend, param_storage=param_storage, **kw)
        decisions = []
        for t in range(30):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(16, 8, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (16,), generator=g)

            def closure():
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out, y.to(out.device))
                loss.backward()
                return loss
            opt.step(closure)
            decisions.append(opt.stats["last_step_sam"])
        return opt, decisions, [p.detach().cpu() for p in model.parameters()], [p.device for p in model.parameters()]

    opt, dec, ps, devs = go(None)
    assert opt.backend == "cuda+cpu"
    assert {d.type for d in devs} == {"cuda", "cpu"}
    ref, dec_ref, ps_ref, _ = go("reference")
    assert ref.backend == "reference"
    assert dec == dec_ref
    for a, b in zip(ps, ps_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
