"""lightning_prune: prune PyTorch models while they train with PyTorch Lightning.

Example::

    >>> from lightning_prune import PruningScheduleCallback
    >>> from lightning_prune.schedules import Polynomial
    >>> cb = PruningScheduleCallback(sparsity=0.9, scope="global", schedule=Polynomial(start_epoch=1, end_epoch=4))
"""

from lightning_prune.callback import PruningScheduleCallback
from lightning_prune.checkpoint import restore_pruning, restore_pruning_on_load
from lightning_prune.compaction import compact, load_compact_state_dict, resize_to_state_dict
from lightning_prune.masking import make_permanent
from lightning_prune.report import SparsityReport, TensorSparsity, sparsity_report
from lightning_prune.rewind import Rewind
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial, Schedule
from lightning_prune.selection import PruningTarget, select_parameters
from lightning_prune.sensitivity import SensitivityTable, plot_sensitivity, sensitivity_analysis, suggest_sparsity
from lightning_prune.sparse_checkpoint import SparseCheckpointIO, save_dense_checkpoint
from lightning_prune.sparse_files import SparseFileInfo, inspect_sparse, load_sparse, load_sparse_into, save_sparse
from lightning_prune.structured import NeuronGroup, NeuronPruning, neuron_groups

__version__ = "0.1.0"

__all__ = [
    "AtEpochs",
    "NeuronGroup",
    "NeuronPruning",
    "OneShot",
    "Polynomial",
    "PruningScheduleCallback",
    "PruningTarget",
    "Rewind",
    "Schedule",
    "SensitivityTable",
    "SparseCheckpointIO",
    "SparseFileInfo",
    "SparsityReport",
    "TensorSparsity",
    "__version__",
    "compact",
    "inspect_sparse",
    "load_compact_state_dict",
    "load_sparse",
    "load_sparse_into",
    "make_permanent",
    "neuron_groups",
    "plot_sensitivity",
    "resize_to_state_dict",
    "restore_pruning",
    "restore_pruning_on_load",
    "save_dense_checkpoint",
    "save_sparse",
    "select_parameters",
    "sensitivity_analysis",
    "sparsity_report",
    "suggest_sparsity",
]
