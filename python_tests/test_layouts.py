"""``param_storage``: parameters packed into flat buffers ("flat") or left where they live
("in_place", the layout of FSDP2's shards, over tensor lists). Every family member takes the
same decisions and gives the same weights bit for bit in both layouts, on every backend; in
place, the parameters keep their storage and ``.grad`` is torch's own."""
import pytest
import torch

import vsam_ext as vx
from helpers import FUSED_BACKENDS, device_for, make_mlp
from test_family import BUILDERS as FAMILY, DTYPE, take_step

BUILDERS = dict(FAMILY,
                sam=lambda ps, **kw: vx.SAM(ps, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                            **kw),
                sam_adamw=lambda ps, **kw: vx.SAM(ps, torch.optim.AdamW, rho=0.1, lr=3e-3, **kw),
                periodic=lambda ps, **kw: vx.PeriodicSAM(ps, torch.optim.SGD, period=3, lr=0.05, momentum=0.9, **kw),
                vsam=lambda ps, **kw: vx.VSAM(ps, torch.optim.SGD, window=8, warmup_steps=4, stat_tensors=3, lr=0.05,
                                              momentum=0.9, **kw))
STEPS = 24


def _run(name, backend, storage, dtype=DTYPE):
    model = make_mlp(seed=1, dtype=dtype, bn=True).to(device_for(backend))
    opt = BUILDERS[name](model.parameters(), backend=backend, model=model, param_storage=storage)
    decisions = []
    for t in range(STEPS):
        take_step(name, model, opt, t)
        decisions.append(opt.stats["last_step_sam"])
    return model, opt, decisions


# The Triton interpreter is slow: three members there (the segment ops, the statistics, ASAM's
# weighted norm); all of them on the other backends.
CASES = [(n, b) for b in ["reference"] + FUSED_BACKENDS for n in sorted(BUILDERS)
         if b != "triton" or n in ("asam", "looksam", "vsam")]


@pytest.mark.parametrize("name,backend", CASES)
def test_in_place_equals_flat_bit_for_bit(name, backend):
    flat_model, _, flat_decisions = _run(name, backend, "flat")
    model, opt, decisions = _run(name, backend, "in_place")
    assert all(b.sharded for b in opt.flat.buffers)
    assert decisions == flat_decisions and any(decisions)
    for p, q in zip(model.parameters(), flat_model.parameters()):
        assert torch.equal(p, q)


def test_in_place_parameters_keep_their_storage_and_torch_grads():
    model = make_mlp(dtype=torch.float32)
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = vx.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, param_storage="in_place")
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    opt.step(lambda: _loss(model))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    state = opt.state_dict()
    assert all("momentum_buffer" in s for s in state["base"]["state"].values())
    with pytest.raises(ValueError, match="param_storage"):
        vx.SAM(model.parameters(), torch.optim.SGD, lr=0.1, param_storage="lists")


def _loss(model):
    torch.manual_seed(0)
    loss = model(torch.randn(8, 6)).square().mean()
    loss.backward()
    return loss
