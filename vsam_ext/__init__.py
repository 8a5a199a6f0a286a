"""vsam_ext: efficient Sharpness-Aware Minimization optimizers for PyTorch.

``SAM`` (and ASAM), ``PeriodicSAM`` (SAM-k) and ``VSAM`` (arXiv 2403.08821), on one two-pass
driver over flat parameter buffers.
"""
from .ops import available_backends
from .optim import SAM, VSAM, PeriodicSAM

__version__ = "0.1.0"
__all__ = ["SAM", "VSAM", "PeriodicSAM", "available_backends", "__version__"]
