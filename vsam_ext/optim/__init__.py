"""The optimizers: one file each, all on the shared two-pass driver (``_driver.py``)."""
from .periodic import PeriodicSAM
from .sam import SAM
from .vsam import VSAM

__all__ = ["SAM", "VSAM", "PeriodicSAM"]
