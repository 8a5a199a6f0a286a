"""Datasets of the training tool, read with numpy from the offline copies, and batched
augmentation on tensors (no torchvision, no DataLoader).

* ``fmnist``        Fashion-MNIST, the original idx ``.gz`` files (60000 train / 10000 test, 1x28x28)
* ``cifar10``       CIFAR-10 subset, JPEG-decoded (10000 train / 2000 test, 3x32x32)
* ``cifar10-exact`` CIFAR-10 subset, lossless pixels (5000 train / 1000 test)

Images are normalised once, kept in memory (on the training device), and every batch is
gathered and augmented there: random crop (zero padding of the *raw* image, i.e. black, as
torchvision's ``RandomCrop(padding=p)``), horizontal flip, and Cutout (DeVries & Taylor 2017:
a square of side ``cutout`` centred at a uniformly drawn pixel, clipped at the border, set to 0
after normalisation). All randomness comes from one ``torch.Generator`` per run, so the same
seed gives the same batches and augmentations for every optimizer.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["DATASETS", "DATA_ENV", "Augment", "Data", "default_data_dir", "resolve_data_dir", "missing_files",
           "load_dataset", "batches"]

DATA_ENV = "VSAM_EXT_DATA"      # environment variable naming the data folder


def default_data_dir() -> str:
    """The project's offline data: ``../shared/data`` beside the project root, found from this
    package's location (``<root>/vsam_ext/train/data.py``), not from the current directory."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.normpath(os.path.join(root, "..", "shared", "data"))


def resolve_data_dir(given: Optional[str] = None) -> Tuple[str, str]:
    """The data folder and where it came from: ``given`` (``--data-dir``), else the environment
    variable ``VSAM_EXT_DATA``, else :func:`default_data_dir`. Returns ``(path, source)``."""
    if given:
        return os.path.abspath(os.path.expanduser(given)), "--data-dir"
    env = os.environ.get(DATA_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env)), DATA_ENV
    return default_data_dir(), "default (../shared/data beside the project root)"


def _files(name: str, data_dir: str) -> List[str]:
    if name == "fmnist":
        d = os.path.join(data_dir, "fashion_mnist")
        return [os.path.join(d, f"{k}.gz") for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    return [os.path.join(data_dir, "cifar10", DATASETS[name]["file"])]


def missing_files(name: str, data_dir: str) -> List[str]:
    """The files of dataset ``name`` that ``data_dir`` lacks (paths relative to ``data_dir``)."""
    return [os.path.relpath(p, data_dir) for p in _files(name, data_dir) if not os.path.isfile(p)]

# name -> files, normalisation constants (per channel, raw pixels in [0, 1]), class names
DATASETS = {
    "fmnist": {
        "mean": (0.2860,), "std": (0.3530,),
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot"],
    },
    "cifar10": {
        "file": "cifar10_jpeg_10k_2k.npz",
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    },
    "cifar10-exact": {
        "file": "cifar10_exact_5k_1k.npz",
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    },
}


@dataclass
class Augment:
    """Batched augmentation: ``crop_pad`` pixels of random-crop padding (0: none), horizontal
    ``flip`` with probability 1/2, ``cutout`` square side (0: none)."""
    crop_pad: int = 0
    flip: bool = False
    cutout: int = 0
    fill: Optional[torch.Tensor] = None      # the normalised value of a black pixel, (1, C, 1, 1)

    def describe(self) -> str:
        parts = []
        if self.crop_pad:
            parts.append(f"random crop (pad {self.crop_pad})")
        if self.flip:
            parts.append("horizontal flip")
        if self.cutout:
            parts.append(f"cutout {self.cutout}x{self.cutout}")
        return " + ".join(parts) or "none"

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        if self.crop_pad:
            p = self.crop_pad
            fill = self.fill if self.fill is not None else torch.zeros(1, c, 1, 1, device=dev)
            padded = torch.nn.functional.pad(x - fill, (p, p, p, p)) + fill
            oy = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
            rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]      # n,1,h,1
            cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]      # n,1,1,w
            bi = torch.arange(n, device=dev)[:, None, None, None]
            ci = torch.arange(c, device=dev)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=gen, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cutout:
            cy = torch.randint(0, h, (n,), generator=gen, device=dev)
            cx = torch.randint(0, w, (n,), generator=gen, device=dev)
            half = self.cutout // 2
            ys = torch.arange(h, device=dev)[None, :]
            xs = torch.arange(w, device=dev)[None, :]
            in_y = (ys >= (cy[:, None] - half)) & (ys < (cy[:, None] - half + self.cutout))   # n,h
            in_x = (xs >= (cx[:, None] - half)) & (xs < (cx[:, None] - half + self.cutout))   # n,w
            hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]                           # n,1,h,w
            x = x.masked_fill(hole, 0.0)
        return x


@dataclass
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None
    augment: Augment = field(default_factory=Augment)
    classes: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        val = f", val {len(self.y_val)}" if self.y_val is not None else ""
        shape = "x".join(str(s) for s in self.x_train.shape[1:])
        return (f"{self.name}: train {len(self.y_train)}{val}, test {len(self.y_test)} ({shape}); "
                f"augmentation: {self.augment.describe()}")


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _read_raw(name: str, data_dir: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images N,H,W,C and uint8 labels, train then test."""
    missing = missing_files(name, data_dir)
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {', '.join(missing)} (give --data-dir or set {DATA_ENV})")
    if name == "fmnist":
        d = os.path.join(data_dir, "fashion_mnist")
        files = {k: os.path.join(d, f"{k}.gz") for k in
                 ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte")}
        xtr = _read_idx(files["train-images-idx3-ubyte"], 16).reshape(-1, 28, 28, 1)
        ytr = _read_idx(files["train-labels-idx1-ubyte"], 8)
        xte = _read_idx(files["t10k-images-idx3-ubyte"], 16).reshape(-1, 28, 28, 1)
        yte = _read_idx(files["t10k-labels-idx1-ubyte"], 8)
        return xtr, ytr, xte, yte
    path = os.path.join(data_dir, "cifar10", DATASETS[name]["file"])
    with np.load(path, allow_pickle=False) as z:
        return z["x_train"], z["y_train"], z["x_test"], z["y_test"]


def _balanced_pick(labels: np.ndarray, n: int, rng: np.random.Generator,
                   exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """``n`` indices, as evenly spread over the classes as possible, drawn at random (sorted)."""
    pool = np.arange(len(labels))
    if exclude is not None and len(exclude):
        pool = np.setdiff1d(pool, exclude)
    if n > len(pool):
        raise ValueError(f"asked for {n} images but only {len(pool)} are available")
    classes = np.unique(labels[pool])
    per_class = [rng.permutation(pool[labels[pool] == c]) for c in classes]
    counts = np.zeros(len(classes), np.int64)
    left = n
    while left > 0:             # fill every class evenly; full classes drop out
        open_ = [i for i in range(len(classes)) if counts[i] < len(per_class[i])]
        share = max(1, left // len(open_))
        for i in open_:
            take = min(share, len(per_class[i]) - counts[i], left)
            counts[i] += take
            left -= take
            if left == 0:
                break
    picked = [idx[:k] for idx, k in zip(per_class, counts)]
    return np.sort(np.concatenate(picked))


def _to_tensor(x: np.ndarray, mean, std, device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return ((t - m) / s).contiguous()


def load_dataset(name: str, data_dir: Optional[str] = None, *, train_size: Optional[int] = None,
                 test_size: Optional[int] = None, val_size: int = 0, data_seed: int = 0,
                 augment: Optional[Augment] = None, device="cpu") -> Data:
    """Load ``name`` from ``data_dir`` (None: :func:`resolve_data_dir`). ``train_size``/
    ``test_size``: class-balanced random subsets (None: all). ``val_size``: a class-balanced
    validation set held out of the training images (disjoint from the training subset) for
    choosing hyper-parameters without the test set.
    Subsets depend on ``data_seed`` only, not on the run seed."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    if data_dir is None:
        data_dir = resolve_data_dir()[0]
    xtr, ytr, xte, yte = _read_raw(name, data_dir)
    def rng(split: int) -> np.random.Generator:          # one stream per split: a subset does
        return np.random.default_rng([data_seed, split])  # not change when another one does

    val_idx = _balanced_pick(ytr, val_size, rng(0)) if val_size else np.zeros(0, np.int64)
    if train_size is not None:
        tr_idx = _balanced_pick(ytr, train_size, rng(1), exclude=val_idx)
    else:
        tr_idx = np.setdiff1d(np.arange(len(ytr)), val_idx)
    te_idx = _balanced_pick(yte, test_size, rng(2)) if test_size is not None else np.arange(len(yte))
    mean, std = spec["mean"], spec["std"]

    def lab(y):
        return torch.from_numpy(y.astype(np.int64)).to(device)

    aug = augment if augment is not None else Augment()
    aug.fill = ((torch.zeros(len(mean), device=device) - torch.tensor(mean, device=device))
                / torch.tensor(std, device=device)).view(1, -1, 1, 1)
    data = Data(name=name,
                x_train=_to_tensor(xtr[tr_idx], mean, std, device), y_train=lab(ytr[tr_idx]),
                x_test=_to_tensor(xte[te_idx], mean, std, device), y_test=lab(yte[te_idx]),
                augment=aug, classes=list(spec["classes"]))
    if val_size:
        data.x_val = _to_tensor(xtr[val_idx], mean, std, device)
        data.y_val = lab(ytr[val_idx])
    return data


def batches(data: Data, batch_size: int, gen: torch.Generator, drop_last: bool = True,
            augment: bool = True) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented training batches (gathered from the in-memory tensors):
    ``(x, y, dataset indices)``."""
    n = len(data.y_train)
    perm = torch.randperm(n, generator=gen, device=data.y_train.device)
    stop = (n // batch_size) * batch_size if (drop_last and n >= batch_size) else n
    for i in range(0, stop, batch_size):
        idx = perm[i:i + batch_size]
        x = data.x_train[idx]
        if augment:
            x = data.augment(x, gen)
        yield x, data.y_train[idx], idx


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)
