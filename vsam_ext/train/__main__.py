"""``python -m vsam_ext.train``: see ``vsam_ext.train.cli``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
