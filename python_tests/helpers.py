"""Small models and data shared by the tests."""
import torch


def make_mlp(seed=0, dtype=torch.float32, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def batch(step, dtype=torch.float32, n=24):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def closure_for(model, opt, step, dtype=torch.float32, counter=None):
    x, y = batch(step, dtype)

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
