"""vsam_ext: efficient Sharpness-Aware Minimization optimizers for PyTorch.

``SAM`` (and ASAM), ``PeriodicSAM`` (SAM-k), ``VSAM`` (arXiv 2403.08821) and the rest of the
efficient-SAM family (``LookSAM``, ``AESAM``, ``ESAM``, ``AUSAM``), on one two-pass driver
over flat parameter buffers.
"""
from .data import IndexedDataset
from .ops import available_backends
from .optim import AESAM, AUSAM, ESAM, SAM, VSAM, LookSAM, PeriodicSAM

__version__ = "0.2.0"
__all__ = ["SAM", "VSAM", "PeriodicSAM", "LookSAM", "AESAM", "ESAM", "AUSAM", "IndexedDataset",
           "available_backends", "__version__"]
