"""A dataset wrapper that also yields each sample's index (for AUSAM's importance table)."""
from __future__ import annotations

from torch.utils.data import Dataset

__all__ = ["IndexedDataset"]


class IndexedDataset(Dataset):
    """``IndexedDataset(ds)[i] == (*ds[i], i)`` (``(ds[i], i)`` when an item is not a tuple),
    so a ``DataLoader`` yields ``(x, y, index)`` batches; pass ``index`` as AUSAM's
    ``sample_ids``. Works with any map-style dataset and any sampler (shuffle, distributed)."""

    def __init__(self, dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)
