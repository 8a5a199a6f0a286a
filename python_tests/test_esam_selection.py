"""ESAM's sharpness-sensitive data selection (SDS) is a function of the loss rises alone, the same
on every device: largest rise first, ties to the lower batch position, positions returned sorted
(ALGORITHMS.md, ESAM, "Ties in SDS"). ``torch.topk`` broke ties differently on CUDA and CPU, so
a step whose SWP kept no tensor (every rise exactly 0) trained on different samples on a GPU."""
import math

import pytest
import torch
import torch.nn.functional as F

import vsam_ext as vx
from helpers import batch, device_of, make_mlp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _esam(model, gamma=0.5, beta=1.0):
    return vx.ESAM(model.parameters(), torch.optim.SGD, beta=beta, gamma=gamma, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rises,gamma,want", [
    ([1.0, 3.0, 3.0, 0.0, 3.0, 2.0], 0.5, [1, 2, 4]),          # three-way tie at the top
    ([1.0, 3.0, 3.0, 0.0, 3.0, 2.0], 0.3, [1, 2]),             # ceil(1.8) = 2: the lower two of the tie
    ([0.0] * 6, 0.5, [0, 1, 2]),                               # all tied: the first ceil(gamma B)
    ([2.0, -1.0, 2.0, 5.0, -1.0, -1.0, 0.0], 0.7, [0, 1, 2, 3, 6]),   # a tie straddling the cut
])
def test_select_breaks_ties_by_the_lower_position(device, rises, gamma, want):
    opt = _esam(make_mlp(dtype=torch.float64).to(device), gamma=gamma)
    loss0 = torch.linspace(0.5, 1.5, len(rises), dtype=torch.float64, device=device)
    got = opt.select(loss0, loss0 + torch.tensor(rises, dtype=torch.float64, device=device))
    assert got.device.type == device and got.tolist() == want
    assert opt.sample_fraction == len(want) / len(rises)


@pytest.mark.parametrize("device", DEVICES)
def test_large_tied_batches_keep_the_first_positions(device):
    """The case that differed on the H200: thousands of equal rises (CUDA's topk takes another
    subset of a tie than the CPU's)."""
    opt = _esam(make_mlp().to(device), gamma=0.5)
    loss0 = torch.rand(4097, generator=torch.Generator().manual_seed(0)).to(device)
    rises = torch.zeros(4097, device=device)
    rises[::7] = 1.0                                           # 586 sharp samples, the rest tied at 0
    got = opt.select(loss0, loss0 + rises).cpu()
    k = math.ceil(0.5 * 4097)
    sharp = torch.arange(0, 4097, 7)
    rest = torch.tensor([i for i in range(4097) if i % 7][: k - len(sharp)])
    assert torch.equal(got, torch.cat([sharp, rest]).sort().values)


def test_a_step_whose_swp_keeps_no_tensor_trains_on_the_first_samples():
    """beta tiny: SWP keeps no tensor, so e = 0, every rise is exactly 0 and the second pass runs
    on positions 0 .. ceil(gamma B) - 1."""
    model = make_mlp(dtype=torch.float64)
    opt = _esam(model, gamma=0.4, beta=1e-9)
    x, y = batch(0, torch.float64, device=device_of(model))
    seen = []

    def closure(indices=None):
        seen.append(None if indices is None else indices.tolist())
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    opt.step(closure)
    assert opt.stats["weight_fraction"] == 0.0
    assert seen[-1] == list(range(math.ceil(0.4 * len(y))))
