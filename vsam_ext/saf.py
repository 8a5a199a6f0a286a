"""SAF, Sharpness-Aware training for Free (Du et al., NeurIPS 2022; the authors' code:
AngusDujw/SAF, ``SAF_train.py``): SAM's second pass replaced by a KL term against the logits
each training sample got ``epochs_ago`` epochs earlier (ALGORITHMS.md, "SAF and MESA")."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._kl_term import (check_epoch, check_kl_arguments, check_logits, compute_dtype, kl_rows, state_values,
                       term_on)
from .arguments import check

__all__ = ["SAF"]


class SAF:
    """SAF's loss, used with any optimizer (e.g. plain ``torch.optim.SGD``): one forward and one
    backward per step, as SGD::

        loader = DataLoader(vsam_ext.IndexedDataset(train_set), batch_size=128, shuffle=True)
        saf = vsam_ext.SAF(num_samples=len(train_set), num_classes=10, epochs=200)
        for epoch in range(200):                       # 0-based, as in the authors' loop
            for x, y, ids in loader:
                loss = saf.loss(model(x), y, ids, epoch)
                opt.zero_grad(); loss.backward(); opt.step()

    ``loss(logits, targets, sample_ids, epoch)`` returns ``CE(logits, targets) + kl_term(...)``
    and ``kl_term(logits, sample_ids, epoch)`` the term alone (to add to a loss of your own,
    e.g. label-smoothed; call one of the two once per batch). Each call records the batch's
    logits (detached) in the table, slot ``epoch mod (epochs_ago + 1)`` of each sample, and,
    for ``kl_start_epoch < epoch < kl_end_epoch``, returns

        lam * temperature^2 * (1/B) * sum_i KL(softmax(z_ref,i / T) || softmax(z_i / T))

    where ``z_ref,i`` is slot ``(epoch - epochs_ago) mod (epochs_ago + 1)``: the logits sample
    ``i`` got ``epochs_ago`` epochs earlier, under whatever augmentation it had then; otherwise
    a zero scalar (no read). Computed in float32 for float16/bfloat16 logits, in the logits'
    dtype otherwise; ``log_softmax`` where the authors take ``softmax(...).log()`` (same value).

    The table's slots carry the epoch they were written at, and a reference is used only if it
    is from exactly ``epoch - epochs_ago``. A sample without one (never seen that epoch: a
    ``drop_last`` loader, a ``kl_start_epoch < epochs_ago``, a row that was not finite) adds
    nothing to the sum (the mean still divides by ``B``). The authors' table starts at zeros and
    keeps stale slots, so there such a sample is pulled towards the uniform distribution or
    logits ``epochs_ago + 1`` epochs older; with their defaults and every sample seen in every
    epoch both rules give the same loss. Rows of ``logits`` that are not all finite are not
    written (the slot keeps its old logits and tag, which no later read takes): NaN or Inf
    never enters the table; their loss is non-finite as it would be without SAF.

    Memory: the table lives on ``device`` (default the host, as in the authors' code) and
    takes ``num_samples * (epochs_ago + 1) * (num_classes * itemsize(dtype) + 4)`` bytes
    (``memory_bytes``; the 4 bytes are each slot's int32 epoch tag): CIFAR-10 with the
    defaults 50 000 * 4 * (10 * 4 + 4) = 8.8 MB; ImageNet with ``epochs_ago=2``
    1 281 167 * 3 * (1000 * 4 + 4) = 15.4 GB. With CUDA logits and a host table each call
    copies the batch's logits to the host (a wait for the forward) and the references back;
    ``device="cuda"`` keeps it all on the GPU when it fits. ``sample_ids`` are checked on the
    host (CUDA ids: one device read per call; the loader's CPU ids cost nothing).

    Arguments (checked through ``vsam_ext.arguments``; defaults: the authors' README and
    ALGORITHMS.md, where their code's argparse default for ``lam`` is 0.16):

    * ``num_samples``: the training set's size; ids run over ``[0, num_samples)``. Int >= 1.
    * ``num_classes``: the logits' width. Int >= 2.
    * ``epochs``: the run's length; epochs are numbered ``0 .. epochs - 1``. Int >= 1.
    * ``lam``: the term's weight lambda (authors' ``--reinforce``), float >= 0. Default 0.3
      (their README for CIFAR; 0.8 for ImageNet with ``epochs_ago=2``).
    * ``temperature``: T, float > 0. Default 5.
    * ``epochs_ago``: E~, the reference's age in epochs (``--minus_epoch``), int >= 1. Default 3.
    * ``kl_start_epoch``, ``kl_end_epoch``: the term is on for ``start < epoch < end``; ints
      >= 0. Defaults 5 and None (= ``epochs``: on to the last epoch). A window that holds no
      epoch of the run gives a ``UserWarning``.
    * ``device``: where the table lives (keyword), default ``"cpu"``.
    * ``dtype``: the table's dtype (keyword), one of torch.float16, bfloat16, float32 (default;
      exact for 16-bit logits, as the authors' float32 numpy table), float64.

    Errors (``TypeError`` for a wrong type, ``ValueError`` for a wrong value, each naming the
    argument and what is allowed; nothing is recorded when a call fails): ``logits`` not a
    floating ``[B, num_classes]`` tensor, or not requiring grad (``loss`` is the training loss:
    evaluate with ``F.cross_entropy``); ``sample_ids`` not a 1-D integer tensor of ``B``
    distinct ids in ``[0, num_samples)``; ``epoch`` not an int in ``[0, epochs)`` or smaller
    than the last epoch seen.

    ``state_dict()``: the table, the epoch tags and the last epoch seen (the tensors
    themselves, as ``nn.Module.state_dict``: ``torch.save`` them, or clone before training
    on); ``load_state_dict()`` checks the shapes (``num_samples``, ``epochs_ago``,
    ``num_classes``), tags and finiteness before changing anything, and copies onto this
    object's device and dtype. The hyper-parameters are this object's.
    """

    def __init__(self, num_samples: int, num_classes: int, epochs: int, lam: float = 0.3,
                 temperature: float = 5.0, epochs_ago: int = 3, kl_start_epoch: int = 5,
                 kl_end_epoch: Optional[int] = None, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_samples = check("SAF", "num_samples", num_samples)
        self.num_classes = check("SAF", "num_classes", num_classes)
        self.epochs_ago = check("SAF", "epochs_ago", epochs_ago)
        dtype = check("SAF", "dtype", dtype)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise TypeError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda', got "
                            f"{device!r} ({exc})") from None
        self.epochs, self.lam, self.temperature, self.kl_start_epoch, self.kl_end_epoch = check_kl_arguments(
            "SAF", epochs, lam, temperature, kl_start_epoch, kl_end_epoch)
        slots = self.epochs_ago + 1
        self.table = torch.zeros(self.num_samples, slots, self.num_classes, dtype=dtype, device=device)
        self.written = torch.full((self.num_samples, slots), -1, dtype=torch.int32, device=device)
        self.last_epoch = -1

    @property
    def memory_bytes(self) -> int:
        """Bytes of the table and its epoch tags."""
        return self.table.numel() * self.table.element_size() + self.written.numel() * self.written.element_size()

    def term_on(self, epoch: int) -> bool:
        """Whether ``epoch`` has the KL term (``kl_start_epoch < epoch < kl_end_epoch``)."""
        return term_on(epoch, self.kl_start_epoch, self.kl_end_epoch)

    def _check_ids(self, sample_ids, batch: int) -> torch.Tensor:
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"SAF: sample_ids must be a 1-D integer tensor of dataset indices (see "
                            f"vsam_ext.IndexedDataset), got {type(sample_ids).__name__}")
        if sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool or sample_ids.is_complex():
            raise TypeError(f"SAF: sample_ids must be an integer tensor, got dtype {sample_ids.dtype}")
        if sample_ids.shape != (batch,):
            raise ValueError(f"SAF: sample_ids must have shape [{batch}] (one id per row of logits), got "
                             f"{tuple(sample_ids.shape)}")
        ids = sample_ids.detach().to("cpu", torch.int64)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.num_samples:
            raise ValueError(f"SAF: sample_ids must lie in [0, num_samples={self.num_samples}), got values in "
                             f"[{low}, {high}]")
        if ids.unique().numel() != batch:
            raise ValueError("SAF: sample_ids must be distinct within a batch (one table row per sample and "
                             "epoch): a sampler with replacement cannot be used")
        return ids.to(self.table.device)

    def kl_term(self, logits: torch.Tensor, sample_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """Record ``logits`` and return the KL term (a scalar; zero outside the window)."""
        check_logits("SAF", logits, self.num_classes)
        if not logits.requires_grad:
            raise ValueError("SAF: logits must require grad: SAF.loss/kl_term is the training loss and records the "
                             "logits in the table (evaluate with F.cross_entropy)")
        ids = self._check_ids(sample_ids, logits.shape[0])
        epoch = check_epoch("SAF", epoch, self.last_epoch, self.epochs)
        slots = self.epochs_ago + 1
        term = torch.zeros((), dtype=compute_dtype(logits.dtype), device=logits.device)
        if self.term_on(epoch) and epoch >= self.epochs_ago:     # before: no epoch e - E~ (tags are >= -1)
            read = (epoch - self.epochs_ago) % slots
            ref = self.table[ids, read].to(logits.device)
            has = (self.written[ids, read] == epoch - self.epochs_ago).to(logits.device)
            rows = kl_rows(logits, ref, self.temperature)
            term = self.lam * self.temperature ** 2 * torch.where(has, rows, torch.zeros_like(rows)).sum() \
                / logits.shape[0]
        z = logits.detach().to(self.table.device, self.table.dtype)
        finite = torch.isfinite(z).all(dim=1)           # after the cast: a float16 table's overflow too
        slot = epoch % slots
        self.table[ids, slot] = torch.where(finite[:, None], z, self.table[ids, slot])
        self.written[ids, slot] = torch.where(finite, torch.full_like(finite, epoch, dtype=torch.int32),
                                              self.written[ids, slot])
        self.last_epoch = epoch
        return term

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, sample_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """``F.cross_entropy(logits, targets) + kl_term(logits, sample_ids, epoch)`` (the
        cross-entropy in the term's dtype; ``targets`` as ``F.cross_entropy`` takes them)."""
        check_logits("SAF", logits, self.num_classes)
        ce = F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets)   # bad targets: nothing recorded
        return ce + self.kl_term(logits, sample_ids, epoch)

    def state_dict(self) -> dict:
        return {"table": self.table, "written": self.written, "last_epoch": self.last_epoch,
                "epochs_ago": self.epochs_ago}

    def load_state_dict(self, state: dict) -> None:
        table, written, last = state_values("SAF", state, ("table", "written", "last_epoch"))
        if not isinstance(table, torch.Tensor) or not isinstance(written, torch.Tensor):
            raise TypeError("SAF.load_state_dict: table and written must be tensors")
        if table.shape != self.table.shape or written.shape != self.written.shape:
            raise ValueError(f"SAF.load_state_dict: a table of shape {tuple(table.shape)} (num_samples, "
                             f"epochs_ago + 1, num_classes) with tags {tuple(written.shape)}; this SAF has "
                             f"{tuple(self.table.shape)}: num_samples, epochs_ago and num_classes must match")
        if not table.dtype.is_floating_point or written.dtype.is_floating_point or written.dtype == torch.bool:
            raise TypeError(f"SAF.load_state_dict: table must be floating and written integer, got "
                            f"{table.dtype} and {written.dtype}")
        if isinstance(last, bool) or not isinstance(last, int) or not -1 <= last < self.epochs:
            raise ValueError(f"SAF.load_state_dict: last_epoch must be an int in [-1, epochs={self.epochs}), "
                             f"got {last!r}")
        if written.numel() and (int(written.min()) < -1 or int(written.max()) > last):
            raise ValueError(f"SAF.load_state_dict: epoch tags must lie in [-1, last_epoch={last}], got "
                             f"[{int(written.min())}, {int(written.max())}]")
        tagged = written >= 0
        column = torch.arange(written.shape[1], device=written.device).expand_as(written)
        if bool((tagged & (written.remainder(written.shape[1]) != column)).any()):
            raise ValueError(f"SAF.load_state_dict: an epoch tag in the wrong slot (epoch e is kept in slot "
                             f"e mod (epochs_ago + 1) = e mod {written.shape[1]})")
        if not bool(torch.isfinite(table).all()):
            raise ValueError("SAF.load_state_dict: the table holds non-finite values")
        self.table.copy_(table)
        self.written.copy_(written)
        self.last_epoch = last
