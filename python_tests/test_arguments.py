"""Walks vsam_ext.arguments.TABLE: every constructor argument of every optimizer (and of SAF and
MESA), given a wrong type and values just outside its range, fails with an error that names the
argument, the value and what is allowed; values at the edges of the range are accepted."""
import math
import warnings

import pytest
import torch

import vsam_ext as vx
from vsam_ext.arguments import INF, TABLE

CLASSES = {"SAM": vx.SAM, "PeriodicSAM": vx.PeriodicSAM, "VSAM": vx.VSAM, "LookSAM": vx.LookSAM,
           "AESAM": vx.AESAM, "ESAM": vx.ESAM, "AUSAM": vx.AUSAM, "SAF": vx.SAF, "MESA": vx.MESA}
REQUIRED = {"AESAM": {"total_steps": 10}, "AUSAM": {"num_samples": 10},
            "SAF": {"num_samples": 10, "num_classes": 2, "epochs": 10}, "MESA": {"epochs": 10}}
LOSSES = ("SAF", "MESA")           # loss-side objects: SAF(...), MESA(model, ...), no optimizer
# Defaults the bounds that name another argument refer to (VSAM's window, AUSAM's f_min).
DEFAULTS = {"window": 50, "f_min": 0.1}
# What an edge value needs of the argument that depends on it (slices <= window, f_max >= f_min).
COMPANIONS = {("VSAM", "window"): {"slices": 1}, ("AUSAM", "f_min"): {"f_max": 1.0}}


def build(owner, **kw):
    model = torch.nn.Linear(3, 2)
    args = dict(REQUIRED.get(owner, {}), **kw)
    if owner == "GraphedStep":             # on the CPU with the tests' stand-in for CUDA graphs
        from traced_graph import TracedGraph
        opt = vx.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        return vx.GraphedStep(opt, lambda: None, graph_type=TracedGraph, **args)
    if owner in LOSSES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # an edge value may leave the KL window empty: a warning
            return vx.SAF(**args) if owner == "SAF" else vx.MESA(model, **args)
    return CLASSES[owner](model.parameters(), torch.optim.SGD, lr=0.1, **args)


def bad_values(rule):
    """(value, exception type) pairs that the rule must refuse."""
    low = DEFAULTS.get(rule.low, rule.low)
    high = DEFAULTS.get(rule.high, rule.high)
    if rule.kind == "int":
        out = [(2.5, TypeError), ("3", TypeError), (True, TypeError), (low - 1, ValueError)]
        return out + ([(high + 1, ValueError)] if high != INF else [])
    if rule.kind == "float":
        out = [("x", TypeError), (math.nan, ValueError)] + ([] if rule.optional else [(None, TypeError)])
        out.append((low if rule.low_open else (low - 1 if low > -INF else -INF), ValueError))
        out.append((high if rule.high_open else high + 1, ValueError))
        return [(v, e) for v, e in out if not (isinstance(v, float) and v == -INF and rule.low == -INF)]
    if rule.kind == "pair":
        return [((1.0,), ValueError), ("ab", TypeError), ((1.0, math.inf), ValueError), ((1.0, "x"), TypeError)]
    if rule.kind == "bool":
        return [("yes", TypeError), (1, TypeError)]
    return [("nope", ValueError), (2, ValueError)]


def good_values(rule):
    low = DEFAULTS.get(rule.low, rule.low)
    high = DEFAULTS.get(rule.high, rule.high)
    if rule.kind == "int":
        return [low] + ([high] if high != INF else [])
    if rule.kind == "float":
        out = ([] if rule.low_open else [low]) + ([None] if rule.optional else [])
        return out + ([] if rule.high_open or high == INF else [high])
    if rule.kind == "pair":
        return [(0.5, -0.5)]
    return list(rule.choices or (False, True))


CASES = [(owner, name) for owner, rules in TABLE.items() for name in rules]


@pytest.mark.parametrize("owner,name", CASES, ids=[f"{o}.{n}" for o, n in CASES])
def test_every_argument_refuses_what_the_table_refuses(owner, name):
    rule = TABLE[owner][name]
    for value, err in bad_values(rule):
        with pytest.raises(err) as info:
            build(owner, **{name: value})
        message = str(info.value)
        shown = [repr(value), str(value)] + ([repr(v) for v in value] + [str(v) for v in value]
                                             if isinstance(value, tuple) else [])
        assert name in message and "must be" in message, (owner, name, value, message)
        assert any(s in message for s in shown), (owner, name, value, message)


@pytest.mark.parametrize("owner,name", CASES, ids=[f"{o}.{n}" for o, n in CASES])
def test_every_argument_accepts_the_edges_of_its_range(owner, name):
    rule = TABLE[owner][name]
    for value in good_values(rule):
        if name == "perturbation" and value == "per_rank":
            continue                       # needs a DDP module: tested in test_ddp.py
        build(owner, **{name: value}, **COMPANIONS.get((owner, name), {}))


def test_the_table_covers_every_constructor_argument():
    """Each optimizer's own keyword arguments (beyond params, base_optimizer and the base's
    keyword arguments) have a row; the driver's shared ones too."""
    import inspect
    shared = {"rho", "adaptive", "eta", "perturbation", "fused_base"}
    free = {"self", "params", "base_optimizer", "kwargs", "base_kwargs", "model", "backend", "adaptive_params"}
    for owner, cls in CLASSES.items():
        names = set(inspect.signature(cls.__init__).parameters) - free - ({"device"} if owner in LOSSES else set())
        assert names <= set(TABLE[owner]), (owner, names - set(TABLE[owner]))
        assert owner in LOSSES or shared <= set(TABLE[owner])
    graphed = set(inspect.signature(vx.GraphedStep.__init__).parameters) - {"self", "opt", "closure", "graph_type"}
    assert graphed == set(TABLE["GraphedStep"])
