"""lightning_prune: prune PyTorch models while they train with PyTorch Lightning.

Example::

    >>> from lightning_prune import PruningScheduleCallback
    >>> from lightning_prune.schedules import Polynomial
    >>> cb = PruningScheduleCallback(sparsity=0.9, scope="global", schedule=Polynomial(start_epoch=1, end_epoch=4))
"""

from lightning_prune.callback import PruningScheduleCallback
from lightning_prune.compaction import compact, load_compact_state_dict, resize_to_state_dict
from lightning_prune.layers import register_matrix_layer
from lightning_prune.methods import NewMask, PruningMethod
from lightning_prune.neuron_graph import NeuronGroup, neuron_groups
from lightning_prune.nm import NMPruning, nm_satisfied, to_semi_structured
from lightning_prune.reparam import convert_on_load, make_permanent, upgrade_state_dict
from lightning_prune.report import SparsityReport, TensorSparsity, sparsity_report
from lightning_prune.rewind import Rewind
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial, Schedule
from lightning_prune.selection import PruningTarget, SelectionSummary, describe_selection, select_parameters
from lightning_prune.sensitivity import SensitivityTable, plot_sensitivity, sensitivity_analysis, suggest_sparsity
from lightning_prune.sparse_checkpoint import SparseCheckpointIO, save_dense_checkpoint
from lightning_prune.sparse_files import SparseFileInfo, inspect_sparse, load_sparse, load_sparse_into, save_sparse
from lightning_prune.store import MaskStore
from lightning_prune.structured import NeuronPruning
from lightning_prune.wanda import Wanda, prune_once, wanda_prune

__version__ = "0.2.0"

__all__ = [
    "AtEpochs",
    "MaskStore",
    "NMPruning",
    "NeuronGroup",
    "NeuronPruning",
    "NewMask",
    "OneShot",
    "Polynomial",
    "PruningMethod",
    "PruningScheduleCallback",
    "PruningTarget",
    "Rewind",
    "Schedule",
    "SelectionSummary",
    "SensitivityTable",
    "SparseCheckpointIO",
    "SparseFileInfo",
    "SparsityReport",
    "TensorSparsity",
    "Wanda",
    "__version__",
    "compact",
    "convert_on_load",
    "describe_selection",
    "inspect_sparse",
    "load_compact_state_dict",
    "load_sparse",
    "load_sparse_into",
    "make_permanent",
    "neuron_groups",
    "nm_satisfied",
    "plot_sensitivity",
    "prune_once",
    "register_matrix_layer",
    "resize_to_state_dict",
    "save_dense_checkpoint",
    "save_sparse",
    "select_parameters",
    "sensitivity_analysis",
    "sparsity_report",
    "suggest_sparsity",
    "to_semi_structured",
    "upgrade_state_dict",
    "wanda_prune",
]
