"""GraphedStep (vsam_ext.graphs): the step replayed from graphs equals opt.step(closure) bit for
bit, and every replay runs exactly the ops its capture ran (python_tests/traced_graph.py on the
CPU; real CUDA graphs when there is a GPU)."""
import pytest
import torch

import vsam_ext
from vsam_ext.graphs import CudaGraph, GraphedStep

from helpers import batch, device_for, make_mlp
from traced_graph import TracedGraph

STEPS = 14


def _optimizer(kind, base, model, backend):
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3) if base is torch.optim.SGD else \
        dict(lr=1e-2, weight_decay=0.05)
    if kind == "sam":
        return vsam_ext.SAM(model.parameters(), base, rho=0.05, model=model, backend=backend, **kw)
    if kind == "periodic":
        return vsam_ext.PeriodicSAM(model.parameters(), base, period=3, model=model, backend=backend, **kw)
    return vsam_ext.VSAM(model.parameters(), base, window=4, slices=2, warmup_steps=3, max_reuse=3, seed=1,
                         model=model, backend=backend, **kw)


def _pair(kind, base, backend, device):
    models = [make_mlp(seed=3, bn=True).to(device) for _ in range(2)]
    opts = [_optimizer(kind, base, m, backend) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.1 * s)) for o in opts]
    return models, opts, scheds


def _state(model, opt):
    out = [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]
    for s in opt.state.values():
        out += [v.clone() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def _assert_same(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.cpu(), y.cpu()), f"{what}: tensor {i} differs"


def _check_equal_runs(kind, base, backend, graph_type, device, between=None):
    (m_eager, m_graph), (o_eager, o_graph), (s_eager, s_graph) = _pair(kind, base, backend, device)
    x, y = batch(0, device=device)                       # static: each batch is copied in

    def closure():
        loss = torch.nn.functional.cross_entropy(m_graph(x), y)
        loss.backward()
        return loss
    graphed = GraphedStep(o_graph, closure, warmup_steps=2, graph_type=graph_type)
    for step in range(STEPS):
        xb, yb = batch(step, device=device)
        x.copy_(xb)
        y.copy_(yb)

        def eager_closure():
            loss = torch.nn.functional.cross_entropy(m_eager(xb), yb)
            loss.backward()
            return loss
        loss_eager = o_eager.step(eager_closure)
        loss_graph = graphed()
        assert torch.equal(loss_eager.detach().cpu(), loss_graph.detach().cpu()), f"step {step}: loss"
        _assert_same(_state(m_eager, o_eager), _state(m_graph, o_graph), f"step {step}")
        assert o_eager.stats == o_graph.stats, f"step {step}: controller"
        s_eager.step()
        s_graph.step()
        if between is not None:
            between(step, o_eager, o_graph)
    return graphed, o_eager


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["sam", "periodic", "vsam"])
def test_graphed_step_is_the_eager_step(kind, base, backend):
    if backend not in vsam_ext.available_backends():
        pytest.skip(f"{backend} not built")
    if backend == "reference" and base is torch.optim.AdamW:
        pytest.skip("the reference's square root on CPU tensors is numpy's, a host computation (on CUDA "
                    "tensors it is torch's), so its AdamW step cannot be traced here")
    graphed, opt = _check_equal_runs(kind, base, backend, TracedGraph, "cpu")
    kinds = set(graphed._graphs)
    assert "front" in kinds and (kind == "vsam" or "sam" in kinds)
    if kind == "periodic":
        assert ("cheap", False) in kinds
    if kind == "vsam":                    # sampled SAM steps and cheap steps that reuse the PSF
        assert opt.stats["sam_steps"] < STEPS and ("cheap", True) in kinds, opt.stats
    replays = sum(g.replays for g, _ in graphed._graphs.values())
    assert replays >= 2 * (STEPS - 4) - 4, replays   # the checked replays, beyond each capture's own step


def test_a_changed_rho_captures_again():
    def change(step, *opts):
        if step == 7:
            for o in opts:
                o.param_groups[0]["rho"] = 0.1
    graphed, _ = _check_equal_runs("sam", torch.optim.SGD, None, TracedGraph, "cpu", between=change)
    assert graphed.captures == 4            # front + sam, twice


def test_the_trace_catches_a_host_float():
    """The check can fail: a launch that passes lr as a host float (no device scalars) replays
    a stale lr once the scheduler changes it, and the trace says so."""
    class Stale(GraphedStep):
        def _launch(self, b, psf, backup, coeff):
            opt = self.opt
            return opt._fused_base.launch(opt._ops, b, opt.param_groups[b.group_index], psf, backup, coeff)
    model = make_mlp(seed=3)
    opt = vsam_ext.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x, y = batch(0)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    graphed = Stale(opt, closure, warmup_steps=1, graph_type=TracedGraph)
    with pytest.raises(AssertionError, match="other work than the capture"):
        for _ in range(6):
            graphed()
            sched.step()


def test_a_host_read_in_the_closure_is_refused():
    model = make_mlp(seed=3)
    opt = vsam_ext.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        float(loss)                      # a host read: a graph cannot hold it
        return loss
    graphed = GraphedStep(opt, closure, warmup_steps=1, graph_type=TracedGraph)
    graphed()
    with pytest.raises(AssertionError, match="host read"):
        graphed()


@pytest.mark.parametrize("make, match", [
    (lambda m: vsam_ext.LookSAM(m.parameters(), torch.optim.SGD, lr=0.1), "LookSAM runs its own"),
    (lambda m: vsam_ext.SAM(m.parameters(), torch.optim.Adagrad, lr=0.1), "Adagrad runs its own step"),
    (lambda m: vsam_ext.SAM(m.parameters(), torch.optim.SGD, lr=0.1, fused_base=False), "runs its own step"),
    (lambda m: vsam_ext.SAM(m.parameters(), torch.optim.SGD, lr=0.1, param_storage="in_place"), "param_storage"),
])
def test_unsupported_optimizers_are_refused(make, match):
    with pytest.raises(TypeError, match=match):
        GraphedStep(make(make_mlp()), lambda: None, graph_type=TracedGraph)


def test_bad_arguments():
    opt = vsam_ext.SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        GraphedStep(opt, lambda: None, warmup_steps=0, graph_type=TracedGraph)
    with pytest.raises(TypeError, match="closure"):
        GraphedStep(opt, None, graph_type=TracedGraph)
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="CUDA device"):
            GraphedStep(opt, lambda: None)


def test_a_parameter_without_gradient_is_refused_at_capture():
    model = make_mlp(seed=3)
    opt = vsam_ext.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)

    def closure():                        # the last layer's bias gets no gradient
        loss = torch.nn.functional.cross_entropy(model[:-1](x)[:, :3], y)
        loss.backward()
        return loss
    graphed = GraphedStep(opt, closure, warmup_steps=1, graph_type=TracedGraph)
    graphed()
    with pytest.raises(RuntimeError, match="without a gradient"):
        graphed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["sam", "vsam"])
def test_cuda_graphs_are_the_eager_step(kind, base, backend):
    if backend not in vsam_ext.available_backends():
        pytest.skip(f"{backend} not built")
    _check_equal_runs(kind, base, backend, CudaGraph, device_for(backend))
