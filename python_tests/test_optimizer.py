"""The two-pass driver: flat buffers, param groups, odd parameters, checkpoints, errors."""
import math
import io

import pytest
import torch

from vsam_ext import SAM, VSAM, PeriodicSAM, available_backends
from helpers import batch, closure_for, make_mlp, params_of, run

SMALL = dict(window=5, slices=1, warmup_steps=4, stat_tensors=2)


def test_parameters_live_in_the_flat_buffer_with_storages_of_their_own_and_grads_are_views():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, **SMALL)
    (buf,) = opt.flat.buffers
    assert buf.numel == sum(p.numel() for p in model.parameters())
    item = buf.param.element_size()
    for p, start in zip(model.parameters(), buf.offsets):
        assert p.data_ptr() == buf.param.data_ptr() + start * item               # in the flat buffer
        assert p.untyped_storage().nbytes() == p.numel() * item                   # its own storage
        assert p.grad.untyped_storage().data_ptr() == buf.grad.untyped_storage().data_ptr()
    run(model, opt, 3)
    grad = model[0].weight.grad
    assert grad.abs().sum() > 0
    opt.zero_grad()
    assert model[0].weight.grad is grad and grad.abs().sum() == 0


def test_construction_keeps_values_and_existing_grads():
    model = make_mlp()
    before = params_of(model)
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.equal(p, b) and torch.equal(p.grad, g)


def test_backend_is_reported():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend in available_backends()
    assert opt.stats["backend"] == opt.backend


def test_step_returns_first_loss_and_calls_closure_twice_on_sam_steps():
    model = make_mlp()
    opt = PeriodicSAM(model.parameters(), torch.optim.SGD, period=2, lr=0.1)
    for t in range(4):
        calls = []
        x, y = batch(t)
        first = torch.nn.functional.cross_entropy(model(x), y).item()
        loss = opt.step(closure_for(model, opt, t, counter=calls))
        assert len(calls) == (2 if t % 2 == 0 else 1)
        assert loss.item() == pytest.approx(first, rel=1e-6)


def test_param_groups_with_different_lr_and_weight_decay_match_base_with_rho_zero():
    def groups(model):
        return [{"params": model[0].parameters(), "lr": 0.2, "weight_decay": 1e-2},
                {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.05}]
    a, b = make_mlp(), make_mlp()
    opt_a = SAM(groups(a), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, fused_base=False)
    opt_b = torch.optim.SGD(groups(b), lr=0.1, momentum=0.9)
    for t in range(5):
        opt_a.step(closure_for(a, opt_a, t))
        opt_b.zero_grad()
        closure_for(b, opt_b, t)()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert [g["lr"] for g in opt_a.param_groups] == [0.2, 0.05]
    assert len(opt_a.flat.buffers) == 2          # one buffer per group


def test_lr_scheduler_drives_the_shared_param_groups():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=1.0, **SMALL)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_base_instance_equals_base_class():
    a, b = make_mlp(), make_mlp()
    opt_a = VSAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **SMALL)
    opt_b = VSAM(b.parameters(), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), **SMALL)
    assert run(a, opt_a, 30) == run(b, opt_b, 30)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_frozen_parameters_are_left_untouched():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1, **SMALL)
    run(model, opt, 12)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight.grad is None


def test_parameter_without_gradient_is_not_stepped():
    model = make_mlp()
    unused = torch.nn.Parameter(torch.ones(4))
    opt = VSAM(list(model.parameters()) + [unused], torch.optim.SGD, lr=0.1, momentum=0.9,
               weight_decay=0.5, **SMALL)
    run(model, opt, 15)      # the loss never touches `unused`
    assert torch.equal(unused.detach(), torch.ones(4))
    assert "momentum_buffer" not in opt.base_optimizer.state.get(unused, {})


def test_gradients_set_to_none_by_the_user_are_pulled_back_in():
    a, b = make_mlp(), make_mlp()
    opt_a = VSAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **SMALL)
    opt_b = VSAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **SMALL)
    for t in range(20):
        opt_a.step(closure_for(a, opt_a, t))
        b.zero_grad(set_to_none=True)        # what many training loops do
        closure_for(b, opt_b, t)()
        if opt_b.first_step():
            closure_for(b, opt_b, t)()
        opt_b.second_step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert q.grad.untyped_storage().data_ptr() == opt_b.flat.buffers[0].grad.untyped_storage().data_ptr()


def test_moved_parameters_raise_a_clear_error():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model.double()
    with pytest.raises(RuntimeError, match="flat buffer"):
        opt.step(closure_for(model, opt, 0, dtype=torch.float64))


def test_failed_second_pass_restores_the_weights():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = params_of(model)
    x, y = batch(0)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    run(model, opt, 2)          # the optimizer is usable again


def test_extra_memory_is_within_budget():
    model = make_mlp()
    n = sum(p.numel() for p in model.parameters())
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **SMALL)
    run(model, opt, 20)
    (buf,) = opt.flat.buffers
    extra = [t for t in (buf.psf, buf.backup) if t is not None]
    assert sum(t.numel() for t in extra) <= 2 * n
    sam_model = make_mlp()
    sam = SAM(sam_model.parameters(), torch.optim.SGD, lr=0.1)
    run(sam_model, sam, 2)
    assert sam.flat.buffers[0].psf is None          # plain SAM keeps only the saved weights


def test_stats_snapshot_has_the_documented_keys():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, **SMALL)
    run(model, opt, 10)
    s = opt.stats
    for key in ("steps", "sam_steps", "last_step_sam", "quota", "probability"):
        assert key in s
    assert s["steps"] == 10 and 4 <= s["sam_steps"] <= 10


@pytest.mark.parametrize("cls,kw", [(VSAM, SMALL), (SAM, {}), (PeriodicSAM, {"period": 3})])
def test_checkpoint_resume_is_bit_identical(cls, kw):
    total, cut = 60, 27
    ref_model = make_mlp(bn=True)
    ref = cls(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3,
              model=ref_model, **kw)
    ref_dec = run(ref_model, ref, total)

    model = make_mlp(bn=True)
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, model=model, **kw)
    dec = run(model, opt, cut)
    f = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
    f.seek(0)
    ckpt = torch.load(f, weights_only=True)

    model2 = make_mlp(seed=99, bn=True)
    opt2 = cls(model2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3,
               model=model2, **kw)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    dec += run(model2, opt2, total - cut, start=cut)
    assert dec == ref_dec
    for p, q in zip(model2.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(p, q)


def test_loading_a_checkpoint_of_another_kind_or_shape_fails_clearly():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, **SMALL)
    sam = SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="VSAM"):
        sam.load_state_dict(opt.state_dict())
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="layout"):
        VSAM(other.parameters(), torch.optim.SGD, lr=0.1, **SMALL).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="vsam_ext"):
        opt.load_state_dict(torch.optim.SGD(make_mlp().parameters(), lr=0.1).state_dict())


def test_two_call_misuse_raises():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    closure_for(model, opt, 0)()
    assert opt.first_step() is True
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="finish the step"):
        opt.state_dict()
    closure_for(model, opt, 0)()
    opt.second_step()


def test_step_without_closure_is_a_clear_error():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("kwargs,name", [
    ({"rho": -0.1}, "rho"), ({"rho": float("nan")}, "rho"), ({"lr": -1.0}, "lr"),
    ({"window": 1}, "window"), ({"window": 2.5}, "window"), ({"slices": 0}, "slices"),
    ({"slices": 60}, "slices"), ({"max_rate": 0.0}, "max_rate"), ({"max_rate": 1.5}, "max_rate"),
    ({"reuse_decay": 1.0}, "reuse_decay"), ({"reuse_decay": -0.1}, "reuse_decay"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"max_reuse": -1}, "max_reuse"),
    ({"stat_tensors": 0}, "stat_tensors"), ({"lambdas": (0.1,)}, "lambdas"),
    ({"adaptive": "yes"}, "adaptive"), ({"backend": "nope"}, "backend"), ({"model": 3}, "model"),
])
def test_bad_hyper_parameters_name_the_argument(kwargs, name):
    model = make_mlp()
    kw = dict(lr=0.1)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=name):
        VSAM(model.parameters(), torch.optim.SGD, **kw)


def test_bad_params_and_base_optimizer_are_clear_errors():
    with pytest.raises(ValueError, match="params"):
        VSAM([], torch.optim.SGD, lr=0.1)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="params"):
        SAM(frozen.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(make_mlp().parameters(), "sgd", lr=0.1)
    a, b = make_mlp(), make_mlp()
    with pytest.raises(ValueError, match="params"):
        SAM(a.parameters(), torch.optim.SGD(b.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(a.parameters(), torch.optim.SGD(a.parameters(), lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match="period"):
        PeriodicSAM(a.parameters(), torch.optim.SGD, period=0, lr=0.1)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss
    with pytest.raises(TypeError, match="sparse"):
        opt.step(closure)


def test_parameter_unfrozen_later_is_stepped_by_the_base_with_a_warning():
    model = make_mlp()
    model[0].bias.requires_grad_(False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    run(model, opt, 1)
    model[0].bias.requires_grad_(True)
    before = model[0].bias.detach().clone()
    with pytest.warns(UserWarning, match="frozen"):
        run(model, opt, 2)
    assert not torch.equal(model[0].bias.detach(), before)


@pytest.mark.parametrize("fused", [True, False])
def test_add_param_group_mid_training(fused):
    model = make_mlp()
    head = torch.nn.Linear(3, 3)
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, fused_base=fused, **SMALL)
    run(model, opt, 7)
    opt.add_param_group({"params": head.parameters(), "lr": 0.01})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["rho"] == 0.05
    before = head.weight.detach().clone()
    for t in range(7, 20):
        x, y = batch(t)

        def closure():
            loss = torch.nn.functional.cross_entropy(head(model(x)), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert not torch.equal(head.weight.detach(), before)
    assert "momentum_buffer" in opt.base_optimizer.state[head.weight]
    state = opt.state_dict()
    opt.load_state_dict(state)


def _sam_pair(closure_kind):
    """SAM with the gradients cleared by opt.zero_grad() vs by the way under test."""
    out = []
    for kind in ("opt", closure_kind):
        model = make_mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        for t in range(5):
            x, y = batch(t)

            def closure():
                if kind == "model_zero_grad":
                    model.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward(create_graph=kind == "create_graph")
                return loss
            opt.step(closure)
        out.append(params_of(model))
    return out


@pytest.mark.parametrize("kind", ["model_zero_grad", "create_graph"])
def test_second_pass_gradients_that_replace_grad_are_used(kind):
    want, got = _sam_pair(kind)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[0], make_mlp()[0].weight.detach())


def test_dropped_optimizers_free_their_buffers_and_hooks():
    import gc
    import weakref
    model = make_mlp()
    refs = []
    for _ in range(3):
        opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **SMALL)
        run(model, opt, 6)
        refs.append(weakref.ref(opt.flat.buffers[0].backup))
        del opt
        gc.collect()
    assert all(r() is None for r in refs)
    assert len(model[0].weight._backward_hooks or {}) <= 1


def test_second_backward_after_a_cheap_first_step_is_an_error():
    """davda54's loop runs the second pass unconditionally; on a cheap step that would add a
    second gradient to the first, so it is refused."""
    model = make_mlp()
    opt = PeriodicSAM(model.parameters(), torch.optim.SGD, period=2, lr=0.1)
    closure_for(model, opt, 0)()
    assert opt.first_step() is True
    closure_for(model, opt, 0)()
    opt.second_step()
    opt.zero_grad()
    closure_for(model, opt, 1)()
    assert opt.first_step() is False
    closure_for(model, opt, 1)()
    with pytest.raises(RuntimeError, match="first_step\\(\\) returned False"):
        opt.second_step()
    opt.zero_grad()
    run(model, opt, 2, start=2)          # usable afterwards


def test_failed_second_pass_drops_the_half_formed_psf():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, **SMALL)
    run(model, opt, 2)
    assert opt.has_psf
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return closure_for(model, opt, 2)()
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(closure)
    assert not opt.has_psf


def test_gradients_written_directly_into_grad_are_used():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    before = params_of(model)
    opt.zero_grad()
    for p in model.parameters():
        p.grad.copy_(torch.ones_like(p))
    assert opt.first_step() is True
    for p in model.parameters():
        p.grad.copy_(torch.ones_like(p))
    opt.second_step()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 0.1)


def test_adamw_states_that_diverged_run_unfused_with_a_warning():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    x, y = batch(0)

    def first_layer_frozen():
        h = model[0](x).detach()
        loss = torch.nn.functional.cross_entropy(model[2:](h), y)
        loss.backward()
        return loss
    opt.step(first_layer_frozen)              # the first layer misses this step
    with pytest.warns(UserWarning, match="unfused"):
        run(model, opt, 2)
    assert opt._fused_base.flat_state == {}   # no flat copy beside torch's own state


def test_flush_stats_returns_every_sam_steps_norms_once():
    model = make_mlp()
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, **SMALL)
    decisions = run(model, opt, 23)
    pairs = opt.flush_stats()
    hist = list(opt.controller.H)
    # the controller has seen every SAM step's pair; those since the last window read came now
    assert 0 < len(pairs) <= sum(decisions)
    assert [p for p, _ in pairs] == hist[len(hist) - len(pairs):]
    assert all(p > 0 and g > 0 for p, g in pairs)
    assert opt.flush_stats() == []


def test_nonfinite_gradient_default_propagates_and_keeps_the_controller_clean():
    """Default (no GradScaler): like torch.optim, a NaN gradient reaches the weights it touches;
    the vSAM controller's histories get no NaN (the statistics pair is dropped and counted)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = VSAM(model.parameters(), torch.optim.SGD, lr=0.1, warmup_steps=5, window=4, slices=1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def closure(poison=False):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if poison:
            model[2].weight.grad[0, 0] = float("nan")
        return loss
    for _ in range(3):
        opt.step(closure)
    opt.step(lambda: closure(poison=True))
    opt.flush_stats()
    ctrl = opt.controller
    assert ctrl.stats()["nonfinite_stats"] >= 1
    assert all(math.isfinite(v) for h in (ctrl.H, ctrl.R, ctrl.V) for v in h)
    assert torch.isnan(model[2].weight).any()          # propagated, as torch.optim.SGD would
