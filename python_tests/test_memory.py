"""Memory: the optimizers' extra memory against the stated budget, measured from outside (the
storages of every live tensor, not the optimizer's own bookkeeping), and no growth over
10 000 steps (the histories and queues are bounded)."""
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx

BUDGET = {  # parameter-sized buffers beyond the base optimizer's state (README)
    "sam": 1, "sam5": 1, "vsam": 2, "looksam": 2, "aesam": 1, "esam": 1, "ausam": 1,
}
BUILD = {
    "sam": lambda ps, m: vx.SAM(ps, torch.optim.SGD, lr=0.01, momentum=0.9, model=m),
    "sam5": lambda ps, m: vx.PeriodicSAM(ps, torch.optim.SGD, period=2, lr=0.01, momentum=0.9, model=m),
    "vsam": lambda ps, m: vx.VSAM(ps, torch.optim.SGD, warmup_steps=2, window=4, slices=1, lr=0.01, momentum=0.9,
                                  model=m),
    "looksam": lambda ps, m: vx.LookSAM(ps, torch.optim.SGD, k=2, lr=0.01, momentum=0.9, model=m),
    "aesam": lambda ps, m: vx.AESAM(ps, torch.optim.SGD, total_steps=10, lr=0.01, momentum=0.9, model=m),
    "esam": lambda ps, m: vx.ESAM(ps, torch.optim.SGD, lr=0.01, momentum=0.9, model=m),
    "ausam": lambda ps, m: vx.AUSAM(ps, torch.optim.SGD, num_samples=64, lr=0.01, momentum=0.9, model=m),
}


def live_tensor_bytes():
    """Bytes of memory under the storages of every tensor Python can reach, each byte once (a
    parameter's own storage lies inside its optimizer's flat buffer: the union of the ranges)."""
    gc.collect()
    ranges = []
    with warnings.catch_warnings():     # isinstance() on some module objects warns (deprecated names)
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_sparse:
                try:
                    st = obj.untyped_storage()
                    ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
                except RuntimeError:    # no data: a FakeTensor that torch.compile's caches keep
                    continue
    total, end = 0, 0
    for a, b in sorted(ranges):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def step(name, model, opt, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
    if opt is None:
        opt_sgd = model._sgd
        opt_sgd.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt_sgd.step()
        return
    if name in ("esam", "ausam"):
        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")
        opt.step(closure, torch.arange(32) + 32 * (t % 2)) if name == "ausam" else opt.step(closure)
    else:
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("name", list(BUDGET))
def test_extra_memory_is_within_the_stated_budget(name):
    model = make_model()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model._sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for t in range(4):                              # params + grads + momentum, warmed up
        step(name, model, None, t)
    baseline = live_tensor_bytes()
    del model

    model = make_model()
    opt = BUILD[name](model.parameters(), model)
    for t in range(4):                              # both kinds of step, lazy buffers allocated
        step(name, model, opt, t)
    extra = live_tensor_bytes() - baseline
    slack = 64 * 1024                               # statistics slots, per-tensor vectors, tables
    assert extra <= BUDGET[name] * param_bytes + slack, (name, extra / param_bytes)
    assert extra >= BUDGET[name] * param_bytes - slack, (name, extra / param_bytes)   # the budget is tight


def test_no_growth_over_10000_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = vx.VSAM(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9, warmup_steps=20, window=10,
                  slices=2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    sizes = []
    for t in range(10_000):
        opt.step(closure)
        if t in (999, 9_999):
            gc.collect()
            sizes.append((live_tensor_bytes(), len(gc.get_objects())))
    ctrl = opt.controller
    assert len(ctrl.H) <= ctrl.window and len(ctrl.R) <= ctrl.window and len(ctrl.V) <= ctrl.window
    assert len(opt._pending) <= ctrl.window
    (bytes_a, objs_a), (bytes_b, objs_b) = sizes
    assert bytes_b == bytes_a
    assert objs_b <= objs_a + 100, (objs_a, objs_b)
    assert opt.stats["steps"] == 10_000 and 0 < opt.stats["sam_steps"] < 10_000
