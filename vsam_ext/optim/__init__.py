"""The optimizers: one file each, all on the shared two-pass driver (``_driver.py``)."""
from .aesam import AESAM
from .ausam import AUSAM
from .esam import ESAM
from .looksam import LookSAM
from .periodic import PeriodicSAM
from .sam import SAM
from .vsam import VSAM

__all__ = ["SAM", "VSAM", "PeriodicSAM", "LookSAM", "AESAM", "ESAM", "AUSAM"]
