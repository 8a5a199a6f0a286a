"""The efficient-SAM family (ASAM flavours, LookSAM, AE-SAM, ESAM, AUSAM): API, closure
contract, checkpoints, two-call forms, backends, bad arguments. Equality with the independent
eager oracle is in test_family_vs_naive.py. A backend runs on the device it serves
(helpers.device_for); the reference on CPU tensors."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx
from helpers import FUSED_PARAMS, batch, closure_for, device_for, device_of, make_mlp

DTYPE = torch.float64
N_SAMPLES = 48


def per_sample_closure(model, step, log=None):
    """The ESAM/AUSAM contract: closure(indices) -> per-sample losses, no backward."""
    x, y = batch(step, DTYPE, device=device_of(model))

    def closure(indices=None):
        if log is not None:
            log.append((None if indices is None else indices.tolist(), torch.is_grad_enabled()))
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    return closure


def ids_for(step, n=24):
    """A seeded permutation per epoch of N_SAMPLES; batches of n."""
    per_epoch = N_SAMPLES // n
    perm = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(step // per_epoch))
    return perm.view(per_epoch, n)[step % per_epoch]


BUILDERS = {
    "asam": lambda ps, **kw: vx.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.05, momentum=0.9, **kw),
    "looksam": lambda ps, **kw: vx.LookSAM(ps, torch.optim.SGD, k=3, lr=0.05, momentum=0.9, **kw),
    "aesam": lambda ps, **kw: vx.AESAM(ps, torch.optim.SGD, total_steps=40, lr=0.05, momentum=0.9, **kw),
    "esam": lambda ps, **kw: vx.ESAM(ps, torch.optim.SGD, beta=0.6, gamma=0.5, lr=0.05, momentum=0.9, **kw),
    "ausam": lambda ps, **kw: vx.AUSAM(ps, torch.optim.AdamW, num_samples=N_SAMPLES, ramp_epochs=3, lr=3e-3, **kw),
}
PER_SAMPLE = {"esam", "ausam"}


def take_step(name, model, opt, t, log=None):
    if name in PER_SAMPLE:
        closure = per_sample_closure(model, t, log)
        return opt.step(closure, ids_for(t)) if name == "ausam" else opt.step(closure)
    return opt.step(closure_for(model, opt, t, DTYPE))


def run_steps(name, model, opt, start, steps):
    decisions = []
    for t in range(start, start + steps):
        take_step(name, model, opt, t)
        decisions.append(opt.stats["last_step_sam"])
    return decisions


def build(name, backend="reference", seed=0, bn=False):
    model = make_mlp(seed=seed, dtype=DTYPE, bn=bn).to(device_for(backend))
    return model, BUILDERS[name](model.parameters(), backend=backend, model=model)


# -- ASAM flavours --------------------------------------------------------------------------
def test_asam_official_is_the_default_flavour():
    model = make_mlp(dtype=DTYPE)
    opt = vx.SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    assert opt.param_groups[0]["eta"] == 0.01
    scaled = {p.dim() for b in opt.flat.buffers if b.scaled for p in b.params}
    plain = {p.dim() for b in opt.flat.buffers if not b.scaled for p in b.params}
    assert scaled == {2} and plain == {1}          # weights scaled; biases not


def test_asam_flavours_and_overrides_give_different_steps():
    def final(**kw):
        model = make_mlp(dtype=DTYPE)
        opt = vx.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, backend="reference", **kw)
        run_steps("asam", model, opt, 0, 5)
        return torch.cat([p.detach().flatten() for p in model.parameters()])
    official, davda = final(adaptive=True), final(adaptive="davda54")
    assert not torch.allclose(official, davda)
    torch.testing.assert_close(final(adaptive="official"), official, rtol=0, atol=0)
    torch.testing.assert_close(final(adaptive=True, eta=0.0, adaptive_params="all"), davda, rtol=1e-12, atol=0)
    torch.testing.assert_close(final(adaptive="davda54", adaptive_params=lambda p: True), davda, rtol=1e-12, atol=0)
    assert not torch.allclose(final(adaptive=True, eta=0.1), official)


def test_asam_filter_callable_and_group_change_is_refused():
    model = make_mlp(dtype=DTYPE)
    last = model[-1].weight
    opt = vx.SAM(model.parameters(), torch.optim.SGD, adaptive=True, adaptive_params=lambda p: p is last, lr=0.1)
    assert [p is last for b in opt.flat.buffers if b.scaled for p in b.params] == [True]
    opt.param_groups[0]["adaptive"] = False
    with pytest.raises(ValueError, match="adaptive of param group 0 changed"):
        opt.step(closure_for(model, opt, 0, DTYPE))


@pytest.mark.parametrize("kw,match", [
    (dict(adaptive="yes"), "adaptive must be one of False, True, 'official', 'davda54'"),
    (dict(adaptive=1), "adaptive must be"),
    (dict(adaptive=True, eta=-0.1), r"eta must be in \[0.0, inf\), got -0.1"),
    (dict(adaptive=True, eta=float("nan")), "eta must be"),
    (dict(adaptive=True, adaptive_params="biases"), "adaptive_params must be"),
])
def test_asam_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        vx.SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


# -- bad hyper-parameters ---------------------------------------------------------------
@pytest.mark.parametrize("cls,kw,err,match", [
    (vx.LookSAM, dict(k=0), ValueError, "k must be >= 1"),
    (vx.LookSAM, dict(k=2.5), TypeError, "k must be an int"),
    (vx.LookSAM, dict(alpha=-1.0), ValueError, "alpha must be in"),
    (vx.AESAM, dict(total_steps=0), ValueError, "total_steps must be >= 1"),
    (vx.AESAM, dict(total_steps=10, delta=1.0), ValueError, r"delta must be in \[0.0, 1.0\)"),
    (vx.AESAM, dict(total_steps=10, lambdas=(1.0,)), ValueError, "lambdas must be a pair"),
    (vx.AESAM, dict(total_steps=10, lambdas=(1.0, float("inf"))), ValueError, r"lambdas\[1\]"),
    (vx.ESAM, dict(beta=0.0), ValueError, r"beta must be in \(0.0, 1.0\]"),
    (vx.ESAM, dict(gamma=1.5), ValueError, r"gamma must be in \(0.0, 1.0\]"),
    (vx.ESAM, dict(seed=-1), ValueError, "seed must be >= 0"),
    (vx.AUSAM, dict(num_samples=0), ValueError, "num_samples must be >= 1"),
    (vx.AUSAM, dict(num_samples=10, alpha=0.0), ValueError, r"alpha must be in \(0.0, 1.0\]"),
    (vx.AUSAM, dict(num_samples=10, f_min=0.6, f_max=0.5), ValueError, r"f_max must be in \[0.6, 1.0\]"),
    (vx.AUSAM, dict(num_samples=10, ramp_epochs=-1), ValueError, "ramp_epochs must be >= 0"),
    (vx.AUSAM, dict(num_samples=10, rho=-0.1), ValueError, r"rho must be in \[0.0, inf\)"),
])
def test_family_bad_hyper_parameters(cls, kw, err, match):
    with pytest.raises(err, match=match):
        cls(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


# -- schedules and fractions --------------------------------------------------------------
def test_looksam_refreshes_every_k_steps_with_momentum():
    model, opt = build("looksam")
    assert run_steps("looksam", model, opt, 0, 12) == [t % 3 == 0 for t in range(12)]


def test_aesam_reads_its_rule_and_moves_its_threshold():
    model, opt = build("aesam")
    decisions = run_steps("aesam", model, opt, 0, 40)
    st = opt.stats
    assert 0 < sum(decisions) < 40 and st["sam_steps"] == sum(decisions)
    assert st["mu"] > 0 and st["sigma"] > 0
    assert opt.controller.threshold_coeff() == -1.0        # t = T: lambda1


def test_aesam_skips_nonfinite_norms():
    model, opt = build("aesam")
    run_steps("aesam", model, opt, 0, 3)
    mu = opt.stats["mu"]
    bad = closure_for(model, opt, 3, DTYPE)

    def closure():
        loss = bad()
        model[0].weight.grad.fill_(float("nan"))
        return loss
    opt.step(closure)
    assert opt.stats["last_step_sam"] is False and opt.stats["nonfinite_skipped"] == 1 and opt.stats["mu"] == mu


def test_esam_selects_the_sharpest_samples_and_skips_dropped_gradients():
    model, opt = build("esam")
    log = []
    take_step("esam", model, opt, 0, log)
    (first, g1), (sds, g2), (second, g3) = log
    assert first is None and g1 and sds is None and not g2 and g3
    assert len(second) == math.ceil(0.5 * 24) and second == sorted(set(second))
    assert opt.stats["sample_fraction"] == 0.5 and 0 <= opt.stats["weight_fraction"] <= 1
    assert all(p.requires_grad for p in model.parameters())


def test_esam_dropped_tensors_get_no_first_pass_gradient():
    model, opt = build("esam")
    seen = []
    inner = per_sample_closure(model, 0)

    def closure(indices=None):
        if not seen:
            seen.append([p.requires_grad for p in model.parameters()])
        return inner(indices)
    opt.step(closure)
    kept = seen[0]
    expected = (torch.rand(len(kept), generator=torch.Generator().manual_seed(0)) < 0.6).tolist()
    assert kept == expected and not all(kept)
    assert opt.stats["weight_fraction"] == pytest.approx(sum(expected) / len(expected))


def test_ausam_uses_whole_batches_until_every_sample_was_seen():
    model, opt = build("ausam")
    fractions = []
    for t in range(6):                        # two batches per epoch of 48 samples
        take_step("ausam", model, opt, t)
        fractions.append(opt.stats["sample_fraction"])
    assert fractions == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert int(opt.table.count.sum()) == 48 + 4 * 12 and int(opt.table.count.min()) >= 1
    assert opt.stats["epoch"] == 3 and opt.stats["f_max"] == pytest.approx(0.5)


def test_indexed_dataset_yields_indices():
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10) % 3)
    wrapped = vx.IndexedDataset(data)
    assert len(wrapped) == 10 and wrapped[7] == (data[7][0], data[7][1], 7)
    assert vx.IndexedDataset([5, 6])[1] == (6, 1)
    x, y, idx = next(iter(torch.utils.data.DataLoader(wrapped, batch_size=4, shuffle=True)))
    assert torch.equal(x.long(), idx) and torch.equal(y, idx % 3)
    with pytest.raises(TypeError, match="map-style dataset"):
        vx.IndexedDataset(iter([1, 2]))


# -- the closure contract -------------------------------------------------------------------
def _bad_closures(model, x, y):
    def mean_loss(indices=None):
        return F.cross_entropy(model(x), y)

    def ignores_indices(indices=None):
        return F.cross_entropy(model(x), y, reduction="none")

    def detached(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none").detach()

    def runs_backward(indices=None):
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        if torch.is_grad_enabled():
            losses.mean().backward(retain_graph=True)
        return losses

    def returns_float(indices=None):
        return 1.0
    return [(mean_loss, ValueError, r"shape \(\), expected \[B\]"),
            (ignores_indices, ValueError, r"shape \(24,\), expected \[12\]"),
            (detached, RuntimeError, "do not require grad"),
            (runs_backward, RuntimeError, "ran backward itself"),
            (returns_float, TypeError, "returned float")]


@pytest.mark.parametrize("name", ["esam", "ausam"])
@pytest.mark.parametrize("which", range(5))
def test_closure_contract_errors_are_clear_and_leave_weights(name, which):
    model, opt = build(name)
    if name == "ausam":                       # past the first epoch, so a subset is drawn
        run_steps(name, model, opt, 0, 2)
    x, y = batch(99, DTYPE, device=device_of(model))
    closure, err, match = _bad_closures(model, x, y)[which]
    if name == "ausam" and which == 0:
        match = r"shape \(\), expected \[12\]"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(err, match=match):
        opt.step(closure, ids_for(0)) if name == "ausam" else opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert all(p.requires_grad for p in model.parameters())
    take_step(name, model, opt, 3)             # and the optimizer still works


def test_step_arguments_are_required():
    model, opt = build("ausam")
    with pytest.raises(TypeError, match="sample_ids"):
        opt.step(per_sample_closure(model, 0))
    for bad, match in [([1, 2], "1-D integer tensor"), (torch.tensor([0.5]), "non-empty 1-D integer"),
                       (torch.tensor([3, 48]), r"\[0, num_samples=48\)")]:
        with pytest.raises((TypeError, ValueError), match=match):
            opt.step(per_sample_closure(model, 0), bad)
    model, opt = build("esam")
    with pytest.raises(TypeError, match="closure"):
        opt.step()


# -- two-call forms equal step(closure) ----------------------------------------------------------
@pytest.mark.parametrize("name", ["looksam", "aesam", "asam"])
def test_two_call_form_equals_closure(name):
    m1, o1 = build(name)
    m2, o2 = build(name)
    run_steps(name, m1, o1, 0, 12)
    for t in range(12):
        closure = closure_for(m2, o2, t, DTYPE)
        o2.zero_grad()
        closure()
        if o2.first_step(zero_grad=True):
            closure()
        o2.second_step(zero_grad=True)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_esam_two_call_form_equals_closure():
    m1, o1 = build("esam")
    m2, o2 = build("esam")
    run_steps("esam", m1, o1, 0, 8)
    for t in range(8):
        closure = per_sample_closure(m2, t)
        o2.zero_grad()
        loss0 = closure()
        loss0.mean().backward()
        o2.first_step()
        with torch.no_grad():
            idx = o2.select(loss0.detach(), closure())
        closure(idx).mean().backward()
        o2.second_step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_ausam_two_call_form_equals_closure():
    m1, o1 = build("ausam")
    m2, o2 = build("ausam")
    run_steps("ausam", m1, o1, 0, 8)
    for t in range(8):
        closure = per_sample_closure(m2, t)
        pos = o2.begin(ids_for(t))
        o2.zero_grad()
        loss0 = closure(pos)
        loss0.mean().backward()
        o2.first_step()
        loss1 = closure(pos)
        loss1.mean().backward()
        o2.second_step()
        o2.record(loss0, loss1)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


# -- checkpoints, BatchNorm, backends -------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_checkpoint_resume_is_bit_identical(name):
    m_ref, o_ref = build(name, bn=True)
    ref_dec = run_steps(name, m_ref, o_ref, 0, 14)
    m1, o1 = build(name, bn=True)
    dec = run_steps(name, m1, o1, 0, 8)
    f = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, f)
    f.seek(0)
    ck = torch.load(f, weights_only=True)
    m2, o2 = build(name, seed=3, bn=True)
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    dec += run_steps(name, m2, o2, 8, 6)
    assert dec == ref_dec
    for p, q in zip(m2.state_dict().values(), m_ref.state_dict().values()):
        assert torch.equal(p, q)


def test_checkpoint_of_another_family_member_is_refused():
    _, o1 = build("looksam")
    _, o2 = build("aesam")
    with pytest.raises(ValueError, match="checkpoint is of LookSAM, this optimizer is AESAM"):
        o2.load_state_dict(o1.state_dict())


def test_esam_keeps_batchnorm_statistics_of_the_first_pass():
    model, opt = build("esam", bn=True)
    probe = make_mlp(dtype=DTYPE, bn=True)
    x, _ = batch(0, DTYPE)
    probe(x)                                   # one training-mode forward: the first pass
    take_step("esam", model, opt, 0)
    assert torch.equal(model[1].running_mean, probe[1].running_mean)
    assert torch.equal(model[1].running_var, probe[1].running_var)


@pytest.mark.parametrize("backend", FUSED_PARAMS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_backend_matches_reference(backend, name):
    """Every fused backend on the device it serves against the reference on CPU tensors."""
    m_ref, o_ref = build(name)
    m, o = build(name, backend=backend)
    assert o.backend == backend and device_of(m) == device_for(backend)
    assert run_steps(name, m, o, 0, 20) == run_steps(name, m_ref, o_ref, 0, 20)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-9, atol=1e-12)
