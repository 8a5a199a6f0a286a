"""The training tool: ``python -m vsam_ext.train`` trains real models (small CNN on Fashion-MNIST,
ResNet-18 / WideResNet on CIFAR-10) with SGD, SAM, SAM-5, vSAM and vSAM-A over several seeds, and
writes a table, a JSON file of every epoch and PNG plots (``--help`` for the options).

Modules: ``models`` (``build_model``), ``data`` (numpy readers, augmentation on tensors),
``loop`` (one run), ``report`` (table, JSON, plots), ``cli`` (the command line). Importing this
package loads only the models; tqdm and matplotlib are imported when a run starts.
"""
from .models import build_model


def main(argv=None) -> int:
    """The command line; ``argv`` as in ``sys.argv[1:]``."""
    from .cli import main as _main
    return _main(argv)


__all__ = ["build_model", "main"]
