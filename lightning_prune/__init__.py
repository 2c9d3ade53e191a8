"""lightning_prune: prune PyTorch models while they train with PyTorch Lightning.

Example::

    >>> from lightning_prune import PruningScheduleCallback
    >>> from lightning_prune.schedules import Polynomial
    >>> cb = PruningScheduleCallback(sparsity=0.9, scope="global", schedule=Polynomial(start_epoch=1, end_epoch=4))
"""

from lightning_prune.callback import PruningScheduleCallback
from lightning_prune.masking import make_permanent
from lightning_prune.report import SparsityReport, TensorSparsity, sparsity_report
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial, Schedule
from lightning_prune.selection import PruningTarget, select_parameters

__version__ = "0.1.0"

__all__ = [
    "AtEpochs",
    "OneShot",
    "Polynomial",
    "PruningScheduleCallback",
    "PruningTarget",
    "Schedule",
    "SparsityReport",
    "TensorSparsity",
    "__version__",
    "make_permanent",
    "select_parameters",
    "sparsity_report",
]
