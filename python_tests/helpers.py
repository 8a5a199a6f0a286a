"""Small models, data and the device choice shared by the tests."""
import pytest
import torch

from vsam_ext.ops import available_backends, backend_module


def device_for(backend):
    """The device whose tensors ``backend`` serves on this machine: ``cuda`` needs CUDA tensors;
    ``triton`` runs on CUDA tensors when there is a GPU, else on CPU tensors under the
    interpreter (conftest switches it on); ``cpu``, ``reference`` and the default (None) run on
    CPU tensors. Every test that runs a backend puts its model, batch and optimizer here."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def device_of(model):
    """The device of a model's (first) parameter: where its batches must go."""
    return next(iter(model.parameters())).device


TRITON_INTERPRETED = "triton" in available_backends() and bool(getattr(backend_module("triton"), "_INTERPRET", False))
FUSED_BACKENDS = [b for b in available_backends() if b != "reference"]
# pytest parameters: every fused backend, or one skipped case when only the reference is built.
FUSED_PARAMS = [pytest.param(b, id=b) for b in FUSED_BACKENDS] or [
    pytest.param("none", marks=pytest.mark.skip(reason="only the reference backend is built"))]


def make_mlp(seed=0, dtype=torch.float32, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def batch(step, dtype=torch.float32, n=24, device="cpu"):
    """The same numbers on every device: drawn on the CPU, then moved."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x.to(device), y.to(device)


def closure_for(model, opt, step, dtype=torch.float32, counter=None):
    x, y = batch(step, dtype, device=device_of(model))

    def closure():
        if counter is not None:
            counter.append(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def run(model, opt, steps, start=0, dtype=torch.float32):
    decisions = []
    for t in range(start, start + steps):
        opt.step(closure_for(model, opt, t, dtype))
        decisions.append(opt.stats["last_step_sam"])
    return decisions


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]
