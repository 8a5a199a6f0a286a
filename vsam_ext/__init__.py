"""vsam_ext: efficient Sharpness-Aware Minimization optimizers for PyTorch.

``SAM`` (and ASAM), ``PeriodicSAM`` (SAM-k), ``VSAM`` (arXiv 2403.08821) and the rest of the
efficient-SAM family (``LookSAM``, ``AESAM``, ``ESAM``, ``AUSAM``), on one two-pass driver
over flat parameter buffers; ``SAF`` and ``MESA``, SAM-free losses used with any optimizer.
"""
from .data import IndexedDataset
from .graphs import GraphedStep
from .mesa import MESA
from .ops import available_backends
from .optim import AESAM, AUSAM, ESAM, SAM, VSAM, LookSAM, PeriodicSAM
from .saf import SAF

__version__ = "0.2.0"
__all__ = ["SAM", "VSAM", "PeriodicSAM", "LookSAM", "AESAM", "ESAM", "AUSAM", "SAF", "MESA", "IndexedDataset",
           "GraphedStep", "available_backends", "__version__"]
