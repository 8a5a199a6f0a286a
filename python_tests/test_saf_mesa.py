"""SAF and MESA (vsam_ext/saf.py, mesa.py) against eager oracles written from ALGORITHMS.md ("SAF
and MESA") and the authors' code (AngusDujw/SAF), not from the package:

* the KL term: explicit max-shifted log-sum-exp sums in float64, and its gradient in closed form
  (d/dz of lam T^2 KL / B is lam T (q - p) / B; the cross-entropy's is (softmax(z) - onehot) / B);
* SAF's reference: a dict per sample of the logits it got at each epoch (no slots), read at
  ``epoch - epochs_ago``; and, separately, the slot arithmetic on the table itself; and the
  authors' own rule (a zero-initialised numpy table, ``softmax().log()``), which must agree with
  ours when every sample is seen every epoch;
* MESA's EMA: float64 dicts stepped ``d e + (1 - d) m``, and timm's ModelEmaV2 loop (zip over the
  two state_dicts), which must give the same bits.
"""
import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vsam_ext
from helpers import device_for

DEVICES = [pytest.param(torch.device("cpu"), id="cpu")] + (
    [pytest.param(device_for("cuda"), id="cuda")] if torch.cuda.is_available() else [])
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


# -- oracles ---------------------------------------------------------------------------------
def oracle_log_softmax(a):
    """Row-wise log-softmax of a float64 array: shift by the max, log of the sum of exps."""
    a = np.asarray(a, np.float64)
    shifted = a - a.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def oracle_kl_term(z, z_ref, has_ref, lam, temp):
    """(term, d term / d z): lam T^2 / B * sum over rows with a reference of
    sum_c p_c (log p_c - log q_c), p = softmax(z_ref / T), q = softmax(z / T)."""
    z = np.asarray(z, np.float64)
    b = z.shape[0]
    log_p, log_q = oracle_log_softmax(np.asarray(z_ref, np.float64) / temp), oracle_log_softmax(z / temp)
    p, q = np.exp(log_p), np.exp(log_q)
    mask = np.asarray(has_ref, bool)[:, None]
    kl = (p * (log_p - log_q)).sum(axis=1)
    term = lam * temp ** 2 * kl[mask[:, 0]].sum() / b
    grad = np.where(mask, lam * temp * (q - p) / b, 0.0)
    return term, grad


def oracle_ce(z, y):
    z = np.asarray(z, np.float64)
    log_s = oracle_log_softmax(z)
    onehot = np.eye(z.shape[1])[np.asarray(y)]
    return -(log_s * onehot).sum() / z.shape[0], (np.exp(log_s) - onehot) / z.shape[0]


class OracleSAF:
    """The reference of sample i at epoch e is the (finite) logits it got at epoch e - E~."""

    def __init__(self, lam, temp, ago, start, end):
        self.lam, self.temp, self.ago, self.start, self.end = lam, temp, ago, start, end
        self.seen = {}                                  # sample id -> {epoch: logits row}

    def step(self, z, ids, epoch):
        z = np.asarray(z, np.float64)
        ids = [int(i) for i in ids]
        refs = [self.seen.get(i, {}).get(epoch - self.ago) for i in ids]
        on = self.start < epoch < self.end
        has = [on and r is not None for r in refs]
        ref = np.stack([r if r is not None else np.zeros(z.shape[1]) for r in refs])
        for i, row in zip(ids, z):
            if np.isfinite(row).all():
                self.seen.setdefault(i, {})[epoch] = row.copy()
        if not on:
            return 0.0, np.zeros_like(z), has
        term, grad = oracle_kl_term(z, ref, has, self.lam, self.temp)
        return term, grad, has


class AuthorsSAF:
    """SAF_train.py's rule: a zero numpy float32 table, written then read, softmax().log()."""

    def __init__(self, n, c, lam, temp, ago, start, end):
        self.table = np.zeros((n, ago + 1, c), np.float32)
        self.lam, self.temp, self.ago, self.start, self.end = lam, temp, ago, start, end

    def loss(self, output, target, indices, epoch):
        self.table[indices, epoch % (self.ago + 1)] = output.detach().cpu().numpy()
        loss = F.cross_entropy(output, target)
        if self.start < epoch < self.end:
            ref = torch.tensor(self.table[indices, (epoch - self.ago) % (self.ago + 1)])
            kl = F.kl_div(F.softmax(output / self.temp, dim=1).log(), F.softmax(ref / self.temp, dim=1),
                          reduction="none").sum(-1).mean() * self.temp ** 2
            loss = loss + kl * self.lam
        return loss


def oracle_ema_step(state, model, decay, buffers="average"):
    """float64 EMA of every floating state_dict entry (buffers only when averaged); ints copied."""
    params = {n for n, _ in model.named_parameters()}
    for name, m in model.state_dict().items():
        if m.is_floating_point() and (name in params or buffers == "average"):
            state[name] = decay * state[name] + (1.0 - decay) * m.double()
        else:
            state[name] = m.clone().double() if m.is_floating_point() else m.clone()


def timm_ema_v2_update(ema_module, model, decay):
    """timm's ModelEmaV2._update, float entries (the authors' code)."""
    with torch.no_grad():
        for ema_v, model_v in zip(ema_module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.copy_(decay * ema_v + (1. - decay) * model_v)
            else:
                ema_v.copy_(model_v)


# -- helpers -------------------------------------------------------------------------------
def quiet_saf(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vsam_ext.SAF(**kw)


def leaf(z, dtype=torch.float32, device="cpu"):
    return torch.as_tensor(np.asarray(z), dtype=torch.float64).to(device, dtype).requires_grad_()


def through_bytes(source, target):
    """A checkpoint of every object of ``source`` through torch.save/load, loaded into the
    matching object of ``target``; returns the loaded states."""
    buf = io.BytesIO()
    torch.save([o.state_dict() for o in source], buf)
    buf.seek(0)
    states = torch.load(buf)
    for obj, state in zip(target, states):
        obj.load_state_dict(state)
    return states


def make_mlp(seed=0, c=4, bn=True):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 12)] + ([torch.nn.BatchNorm1d(12)] if bn else []) + [torch.nn.Tanh(),
                                                                                      torch.nn.Linear(12, c)]
    return torch.nn.Sequential(*layers)


# -- SAF -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_saf_loss_and_gradient_match_the_oracle_over_epochs(device, dtype):
    """Shuffled batches over 7 epochs (E~=2, window 1 < e < 6): loss and d loss / d logits as
    the float64 oracle's, the table's slots as the spec's arithmetic."""
    n, c, ago = 10, 5, 2
    saf = quiet_saf(num_samples=n, num_classes=c, epochs=7, lam=0.7, temperature=2.5, epochs_ago=ago,
                    kl_start_epoch=1, kl_end_epoch=6, device=device, dtype=torch.float64)
    oracle = OracleSAF(0.7, 2.5, ago, 1, 6)
    rng = np.random.default_rng(0)
    terms_on = set()
    for epoch in range(7):
        order = rng.permutation(n)
        for ids in (order[:6], order[6:]):
            z = rng.normal(0, 3, (len(ids), c))
            y = rng.integers(0, c, len(ids))
            logits = leaf(z, dtype, device)
            z = logits.detach().double().cpu().numpy()      # the values the dtype holds
            loss = saf.loss(logits, torch.as_tensor(y, device=device), torch.as_tensor(ids), epoch)
            loss.backward()
            term, grad, has = oracle.step(z, ids, epoch)
            ce, ce_grad = oracle_ce(z, y)
            assert loss.item() == pytest.approx(ce + term, rel=TOL[dtype], abs=TOL[dtype])
            np.testing.assert_allclose(logits.grad.double().cpu().numpy(), ce_grad + grad, rtol=1e-3 if
                                       dtype in (torch.bfloat16, torch.float16) else TOL[dtype] * 10,
                                       atol=2e-3 if dtype in (torch.bfloat16, torch.float16) else TOL[dtype])
            if any(has):
                terms_on.add(epoch)
            for i, row in zip(ids, z):                      # written to slot e mod (E~ + 1), exactly
                assert torch.equal(saf.table[i, epoch % (ago + 1)].cpu(), torch.as_tensor(row))
                assert int(saf.written[i, epoch % (ago + 1)]) == epoch
    assert terms_on == {2, 3, 4, 5}                       # 1 < e < 6, and a reference from e - 2 >= 0


def test_saf_window_is_open_interval_and_before_e_tilde_no_reference():
    """kl_start=0, E~=3: the term is on from epoch 1, but until epoch 3 no sample has a
    reference from epoch e - 3, so the loss is the cross-entropy; epoch 3 reads epoch 0; the term
    ends before kl_end."""
    saf = quiet_saf(num_samples=4, num_classes=3, epochs=8, epochs_ago=3, kl_start_epoch=0, kl_end_epoch=6)
    assert [e for e in range(8) if saf.term_on(e)] == [1, 2, 3, 4, 5]
    ids, y = torch.arange(4), torch.tensor([0, 1, 2, 0])
    gen = torch.Generator().manual_seed(1)
    for epoch in range(8):
        logits = torch.randn(4, 3, generator=gen, requires_grad=True)
        loss = saf.loss(logits, y, ids, epoch)
        ce = F.cross_entropy(logits, y)
        if epoch in (3, 4, 5):
            assert loss.item() > ce.item() + 1e-3
        else:
            assert torch.equal(loss, ce)


def test_saf_equals_the_authors_rule_when_every_sample_is_seen():
    """A shuffled IndexedDataset loader (no drop_last), kl_start >= E~: our loss is the authors'."""
    n, c = 12, 3
    ds = vsam_ext.IndexedDataset(TensorDataset(torch.randn(n, 5), torch.randint(0, c, (n,))))
    loader = DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = make_mlp(c=c, bn=False)
    saf = quiet_saf(num_samples=n, num_classes=c, epochs=9, lam=0.3, temperature=5.0, epochs_ago=3,
                    kl_start_epoch=3)
    authors = AuthorsSAF(n, c, 0.3, 5.0, 3, 3, 9)
    on = 0
    for epoch in range(9):
        for x, y, idx in loader:
            out = model(x) * 3.0
            ours, theirs = saf.loss(out, y, idx, epoch), authors.loss(out, y, idx.numpy(), epoch)
            assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
            on += saf.term_on(epoch)
    assert on > 0


def test_saf_skips_non_finite_rows():
    saf = quiet_saf(num_samples=6, num_classes=3, epochs=5, epochs_ago=1, kl_start_epoch=0)
    ids = torch.tensor([4, 1, 2])
    good = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0], [2.0, 2.0, 0.5]])
    saf.loss(good.clone().requires_grad_(), torch.tensor([0, 1, 2]), ids, 0)
    bad = good.clone()
    bad[1, 2] = math.nan
    bad[2, 0] = math.inf
    before = saf.table.clone(), saf.written.clone()
    saf.loss(bad.requires_grad_(), torch.tensor([0, 1, 2]), ids, 1)
    assert torch.isfinite(saf.table).all()
    assert torch.equal(saf.table[4, 1], good[0]) and int(saf.written[4, 1]) == 1
    for i in (1, 2):                                      # not written: old content and tag kept
        assert torch.equal(saf.table[i, 1], before[0][i, 1]) and int(saf.written[i, 1]) == -1
    # epoch 2 reads epoch 1: samples 1 and 2 have no reference and add nothing
    z = torch.tensor([[0.5, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    term = saf.kl_term(z, ids, 2)
    ref_term, _ = oracle_kl_term(z.detach().numpy(), np.stack([good[0].numpy()] + [np.zeros(3)] * 2),
                                 [True, False, False], 0.3, 5.0)
    assert term.item() == pytest.approx(ref_term, rel=1e-6)
    f16 = quiet_saf(num_samples=2, num_classes=2, epochs=2, dtype=torch.float16)
    f16.loss(torch.tensor([[1e5, 0.0], [1.0, 0.0]], requires_grad=True), torch.tensor([0, 1]), torch.tensor([0, 1]), 0)
    assert int(f16.written[0, 0]) == -1 and int(f16.written[1, 0]) == 0   # 1e5 overflows float16: not kept


def test_saf_bad_calls_are_refused_and_change_nothing():
    saf = quiet_saf(num_samples=5, num_classes=3, epochs=4, epochs_ago=1, kl_start_epoch=0)
    y = torch.tensor([0, 1])
    saf.loss(torch.zeros(2, 3, requires_grad=True), y, torch.tensor([0, 1]), 1)
    snapshot = (saf.table.clone(), saf.written.clone(), saf.last_epoch)
    z = torch.randn(2, 3, requires_grad=True)
    cases = [
        (dict(sample_ids=[0, 1]), TypeError, "sample_ids"),
        (dict(sample_ids=torch.tensor([0.0, 1.0])), TypeError, "sample_ids"),
        (dict(sample_ids=torch.tensor([0, 5])), ValueError, "num_samples=5"),
        (dict(sample_ids=torch.tensor([-1, 2])), ValueError, "sample_ids"),
        (dict(sample_ids=torch.tensor([2, 2])), ValueError, "distinct"),
        (dict(sample_ids=torch.tensor([[0, 1]])), ValueError, "shape [2]"),
        (dict(sample_ids=torch.tensor([0, 1, 2])), ValueError, "shape [2]"),
        (dict(logits=torch.randn(2, 4, requires_grad=True)), ValueError, "num_classes=3"),
        (dict(logits=torch.randn(3, requires_grad=True)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.long)), TypeError, "floating"),
        (dict(logits=torch.randn(2, 3)), ValueError, "require grad"),
        (dict(epoch=0), ValueError, "backwards"),
        (dict(epoch=4), ValueError, "epochs=4"),
        (dict(epoch=2.0), TypeError, "epoch"),
        (dict(epoch=True), TypeError, "epoch"),
        (dict(targets=torch.tensor([0, 1, 2])), (ValueError, RuntimeError), ""),
    ]
    for change, err, words in cases:
        args = dict(logits=z, targets=y, sample_ids=torch.tensor([3, 4]), epoch=2)
        args.update(change)
        with pytest.raises(err) as info:
            saf.loss(**args)
        assert words in str(info.value)
        assert torch.equal(saf.table, snapshot[0]) and torch.equal(saf.written, snapshot[1])
        assert saf.last_epoch == snapshot[2]


def test_saf_memory_and_arguments():
    saf = quiet_saf(num_samples=1000, num_classes=10, epochs=200)
    assert (saf.table.shape, saf.table.dtype, saf.table.device.type) == ((1000, 4, 10), torch.float32, "cpu")
    assert saf.memory_bytes == 1000 * 4 * (10 * 4 + 4) == 176_000
    assert (saf.lam, saf.temperature, saf.epochs_ago, saf.kl_start_epoch, saf.kl_end_epoch) == (0.3, 5.0, 3, 5, 200)
    assert quiet_saf(num_samples=10, num_classes=10, epochs=2, dtype=torch.bfloat16).memory_bytes == 10 * 4 * (20 + 4)
    with pytest.warns(UserWarning, match="no epoch"):
        vsam_ext.SAF(num_samples=10, num_classes=3, epochs=6)          # 5 < e < 6: none
    with pytest.raises(ValueError, match="epochs_ago"):
        vsam_ext.SAF(num_samples=10, num_classes=3, epochs=10, epochs_ago=0)
    with pytest.raises(TypeError, match="device"):
        vsam_ext.SAF(num_samples=10, num_classes=3, epochs=10, device=3.5)


def test_saf_state_dict_round_trip_continues_bit_identically():
    n, c = 9, 3
    data = [(torch.randperm(n, generator=torch.Generator().manual_seed(e)), e) for e in range(6)]

    def run(saf, model, opt, parts):
        losses = []
        for perm, epoch in parts:
            for ids in perm.split(4):
                x = torch.linspace(-1, 1, 5)[None] * (ids[:, None].float() + 1) / n
                loss = saf.loss(model(x), ids % c, ids, epoch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return losses

    def fresh():
        model = make_mlp(c=c, bn=False)
        return (quiet_saf(num_samples=n, num_classes=c, epochs=6, epochs_ago=2, kl_start_epoch=1), model,
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    a = fresh()
    straight = run(*a, data)
    b = fresh()
    first = run(*b, data[:4])
    c2 = fresh()
    ck = {"saf": through_bytes(b, c2)[0]}
    resumed = first + run(*c2, data[4:])
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed)) and len(straight) == len(resumed)
    assert torch.equal(a[0].table, c2[0].table) and torch.equal(a[0].written, c2[0].written)
    # refused checkpoints leave the object as it was
    saf = c2[0]
    keep = saf.table.clone()
    bad_shape = dict(ck["saf"], table=torch.zeros(n, 4, c))
    nan = dict(ck["saf"], table=ck["saf"]["table"].clone().fill_(math.nan))
    wrong_slot = dict(ck["saf"], written=ck["saf"]["written"].roll(1, dims=1))
    for state, words in ((bad_shape, "must match"), (nan, "non-finite"), (wrong_slot, "wrong slot"),
                         ({"table": 1}, "keys"), (dict(ck["saf"], last_epoch=6), "last_epoch")):
        with pytest.raises((ValueError, TypeError), match=words):
            saf.load_state_dict(state)
        assert torch.equal(saf.table, keep)


# -- MESA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_mesa_ema_and_term_match_the_oracles(device, buffers):
    """Six SGD steps of a BatchNorm model: the EMA as the float64 oracle's (and, averaged, with
    timm ModelEmaV2's bits), the term against the oracle EMA's eval-mode logits."""
    model = make_mlp(seed=3).to(device)
    mesa = vsam_ext.MESA(model, epochs=4, lam=0.8, temperature=5.0, decay=0.9, kl_start_epoch=0, buffers=buffers)
    timm_ema = copy.deepcopy(model).eval()
    state = {k: (v.clone().double() if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        epoch = step // 2
        x = torch.randn(8, 5, generator=gen).to(device)
        y = torch.randint(0, 4, (8,), generator=gen).to(device)
        logits = model(x)
        loss = mesa.loss(logits, y, x, epoch)
        oracle_model = copy.deepcopy(model).double().eval()
        oracle_model.load_state_dict(state)
        with torch.no_grad():
            z_ref = oracle_model(x.double()).cpu().numpy()
        z = logits.detach().double().cpu().numpy()
        term, _ = oracle_kl_term(z, z_ref, [True] * 8, 0.8, 5.0) if epoch > 0 else (0.0, None)
        assert loss.item() == pytest.approx(oracle_ce(z, y.cpu().numpy())[0] + term, rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mesa.update()
        oracle_ema_step(state, model, 0.9, buffers)
        timm_ema_v2_update(timm_ema, model, 0.9)
        for name, value in mesa.ema.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value.double(), state[name].to(value.device), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(value, state[name].to(value.device))
        if buffers == "average":
            ours = [v for v in mesa.ema.state_dict().values() if v.is_floating_point()]
            theirs = [v for v in timm_ema.state_dict().values() if v.is_floating_point()]
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert mesa.updates == 6 and not mesa.ema.training
    assert all(not p.requires_grad for p in mesa.ema.parameters())
    assert mesa.memory_bytes == sum(t.numel() * t.element_size() for t in
                                    list(model.parameters()) + list(model.buffers()))


def test_mesa_window_defaults_and_warnings():
    model = make_mlp()
    mesa = vsam_ext.MESA(model, epochs=200)
    assert (mesa.lam, mesa.temperature, mesa.decay, mesa.kl_start_epoch, mesa.kl_end_epoch, mesa.buffers) == \
        (0.8, 5.0, 0.9998, 5, 200, "copy")
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    calls = []
    mesa.ema.register_forward_hook(lambda *a: calls.append(1))
    for epoch in range(6):                                 # off for e <= 5: no EMA forward, plain CE
        logits = model(x)
        assert torch.equal(mesa.loss(logits, y, x, epoch), F.cross_entropy(logits, y))
    assert not calls
    with pytest.warns(UserWarning, match="update"):
        mesa.loss(model(x), y, x, 6)
    assert calls
    with pytest.warns(UserWarning, match="no epoch"):
        vsam_ext.MESA(model, epochs=10, kl_start_epoch=3, kl_end_epoch=4)


def test_mesa_bad_calls_are_refused():
    with pytest.raises(ValueError, match="at least one parameter"):
        vsam_ext.MESA(torch.nn.ReLU(), epochs=10)
    with pytest.raises(TypeError, match="model"):
        vsam_ext.MESA(lambda x: x, epochs=10)
    model = make_mlp()
    mesa = vsam_ext.MESA(model, epochs=10, kl_start_epoch=0)
    mesa.update()
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    mesa.loss(model(x), y, x, 2)
    with pytest.raises(ValueError, match="backwards"):
        mesa.loss(model(x), y, x, 1)
    with pytest.raises(ValueError, match="inputs the logits"):
        mesa.loss(model(x)[:2], y[:2], x, 2)
    with pytest.raises(TypeError, match="floating"):
        mesa.kl_term(torch.zeros(4, 4, dtype=torch.long), x, 2)
    with pytest.raises(ValueError, match="EMA model is on cpu"):
        mesa.kl_term(torch.zeros(4, 4, device="meta"), x, 2)
    assert mesa.last_epoch == 2
    other = make_mlp(c=3)
    with pytest.raises(ValueError, match="another model"):
        vsam_ext.MESA(other, epochs=10).load_state_dict(mesa.state_dict())
    mesa.model = other                                      # the layout the EMA was built for changed
    with pytest.raises(ValueError, match="changed"):
        mesa.update()


def test_mesa_state_dict_round_trip_continues_bit_identically():
    def fresh():
        model = make_mlp(seed=5)
        return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), \
            vsam_ext.MESA(model, epochs=5, decay=0.8, kl_start_epoch=0)

    def run(model, opt, mesa, steps):
        out = []
        for t in steps:
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(6, 5, generator=g), torch.randint(0, 4, (6,), generator=g)
            loss = mesa.loss(model(x), y, x, t // 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mesa.update()
            out.append(loss.detach())
        return out

    a = fresh()
    straight = run(*a, range(12))
    b = fresh()
    first = run(*b, range(7))
    c = fresh()
    through_bytes(b, c)
    assert c[2].updates == 7 and c[2].last_epoch == 2
    resumed = first + run(*c, range(7, 12))
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed))
    assert all(torch.equal(x, y) for x, y in zip(a[2].ema.state_dict().values(), c[2].ema.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_mesa_term_dtypes(dtype):
    """Logits of each dtype against fixed EMA logits: the term as the float64 oracle's (16-bit
    logits are computed in float32)."""
    model = make_mlp(seed=2, bn=False)
    mesa = vsam_ext.MESA(model, epochs=3, kl_start_epoch=0, lam=0.5, temperature=3.0)
    mesa.updates = 1                                       # no never-updated warning
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    z = leaf(np.random.default_rng(1).normal(0, 2, (5, 4)), dtype)
    term = mesa.kl_term(z, x, 1)
    assert term.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    term.backward()
    with torch.no_grad():
        ref = model.eval()(x).double().numpy()
    want, grad = oracle_kl_term(z.detach().double().numpy(), ref, [True] * 5, 0.5, 3.0)
    assert term.item() == pytest.approx(want, rel=1e-5 if dtype != torch.float64 else 1e-12)
    np.testing.assert_allclose(z.grad.double().numpy(), grad, atol=2e-3 if dtype in (torch.float16, torch.bfloat16)
                               else 1e-6)


# -- end to end ------------------------------------------------------------------------------
def test_end_to_end_tiny_model_with_indexed_dataset():
    """SGD + SAF and SGD + MESA on a separable toy problem through IndexedDataset and a shuffled,
    drop_last loader: both train, and the term is active late in the run."""
    g = torch.Generator().manual_seed(0)
    n, c = 96, 3
    centers = torch.randn(c, 5, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 5, generator=g)
    train = TensorDataset(x, y)
    results = {}
    for method in ("saf", "mesa"):
        model = make_mlp(seed=1, c=c)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(vsam_ext.IndexedDataset(train), batch_size=16, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(1))
        reg = vsam_ext.SAF(num_samples=len(train), num_classes=c, epochs=12, kl_start_epoch=2) if method == "saf" \
            else vsam_ext.MESA(model, epochs=12, kl_start_epoch=2, decay=0.9)
        extra = []
        for epoch in range(12):
            for xb, yb, ids in loader:
                logits = model(xb)
                term = reg.kl_term(logits, ids if method == "saf" else xb, epoch)
                loss = F.cross_entropy(logits, yb) + term
                opt.zero_grad()
                loss.backward()
                opt.step()
                if method == "mesa":
                    reg.update()
                extra.append(term.item())
        with torch.no_grad():
            acc = (model.eval()(x).argmax(1) == y).float().mean().item()
        results[method] = acc
        assert max(extra[-6:]) > 0 and all(t == 0 for t in extra[:18])   # epochs 0-2: off
    assert min(results.values()) > 0.9, results
