"""Saving weights the usual ways (issue "Drop-in without surprises", item 8). The parameters live
in the optimizer's flat buffer, each with a storage of its own over exactly its elements, so:
``torch.save`` of a submodule's state_dict writes that submodule alone (it used to write the whole
buffer: 4 MB for a 40 KB head), safetensors saves and loads models (it used to fail: "None is
covering the entire storage"), loading writes into the buffer the optimizer steps, and autograd
still sees the step's in-place update."""
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx

pytestmark = pytest.mark.skipif(not vx.flat._HAS_ALIAS, reason="needs the compiled extension (own storages)")


class BodyAndHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
        self.head = torch.nn.Linear(1024, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _trained(steps=3):
    model = BodyAndHead()
    opt = vx.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(steps):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    return model, opt


def test_torch_save_of_a_submodule_writes_only_that_submodule():
    model, _ = _trained()
    head_bytes = sum(p.numel() * p.element_size() for p in model.head.parameters())
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    f = io.BytesIO()
    torch.save(model.head.state_dict(), f)
    assert f.tell() < head_bytes + 16_384 < whole_bytes      # ~40 KB, not the 4.3 MB buffer
    f.seek(0)
    loaded = torch.load(f, weights_only=True)
    for k, v in model.head.state_dict().items():
        assert torch.equal(loaded[k], v)


def test_safetensors_save_model_and_load_model_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model, _ = _trained()
    path = os.path.join(tmp_path, "model.safetensors")
    st.save_model(model, path)
    st.save_file(model.head.state_dict(), os.path.join(tmp_path, "head.safetensors"))
    other = BodyAndHead()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    st.load_model(other, path)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_loading_a_state_dict_writes_the_weights_the_optimizer_steps():
    model, opt = _trained()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step(lambda: model(torch.ones(2, 64)).sum().backward())
    model.load_state_dict(saved)
    (buf,) = opt.flat.buffers
    assert torch.equal(buf.param, torch.cat([saved[k].flatten() for k in model.state_dict()]))


def test_a_step_between_forward_and_backward_is_seen_by_autograd():
    """As with torch.optim: the step updates the weights in place, so a graph that saved them
    refuses to backpropagate afterwards instead of using the new values silently."""
    model, opt = _trained(1)
    x = torch.randn(4, 64)
    stale = model(x).sum()
    opt.step(lambda: model(x).sum().backward())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_a_copied_model_is_independent_of_the_optimizer():
    model, opt = _trained()
    twin = copy.deepcopy(model)
    before = [p.detach().clone() for p in twin.parameters()]
    opt.step(lambda: model(torch.ones(2, 64)).sum().backward())
    for p, q in zip(twin.parameters(), before):
        assert torch.equal(p, q)
