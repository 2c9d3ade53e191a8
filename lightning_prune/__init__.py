"""lightning_prune: prune PyTorch models while they train with PyTorch Lightning.

The names here are the ones users call, by task (``docs/api/index.md`` lists them the same way):

* prune while training: :class:`PruningScheduleCallback`, the schedules :class:`OneShot`, :class:`AtEpochs`,
  :class:`Polynomial` (:class:`Schedule` for your own), :class:`Rewind`;
* keeping accuracy at high sparsity: :class:`Distillation`, :class:`LearningRateRewarm` (and the callback's
  ``allocation=``);
* how entries are chosen: :class:`NeuronPruning`, :class:`NMPruning`, :class:`Wanda`, :class:`SparseGPT`, and for
  your own :class:`PruningMethod` and :class:`NewMask`;
* which tensors: :func:`select_parameters`, :func:`describe_selection`, :func:`register_matrix_layer`;
* one step, outside training: :func:`prune_step` (with a :class:`MaskStore` and what is due: :class:`Local`,
  :class:`Global` or :class:`Trigger`), :func:`prune_once`, :class:`PruningError`;
* what it gave: :func:`sparsity_report`, :func:`sensitivity_analysis`, :func:`suggest_sparsity`,
  :func:`plot_sensitivity`;
* smaller and faster models: :func:`save_sparse`, :func:`load_sparse`, :func:`load_sparse_into`,
  :func:`inspect_sparse`, :class:`SparseCheckpointIO`, :func:`to_sparse_inference` (:func:`inference_report`),
  :func:`plan_speedup` (per-layer sparsities for a speed-up),
  :func:`compact`, :func:`load_compact_state_dict`, :func:`nm_satisfied`, :func:`to_semi_structured`.

Everything else lives in its module (``lightning_prune.report.SparsityReport``, ...); version 0.1's checkpoints
and torch's pruning form are converted by :mod:`lightning_prune.migration`.

Example::

    >>> from lightning_prune import Polynomial, PruningScheduleCallback
    >>> cb = PruningScheduleCallback(sparsity=0.9, scope="global", schedule=Polynomial(start_epoch=1, end_epoch=4))
"""

from lightning_prune.callback import PruningScheduleCallback
from lightning_prune.distillation import Distillation
from lightning_prune.files.checkpoint import SparseCheckpointIO
from lightning_prune.files.sparse_files import inspect_sparse, load_sparse, load_sparse_into, save_sparse
from lightning_prune.inference import inference_report, plan_speedup, to_semi_structured, to_sparse_inference
from lightning_prune.layers import register_matrix_layer
from lightning_prune.learning_rate import LearningRateRewarm
from lightning_prune.methods import NewMask, PruningMethod
from lightning_prune.methods.compaction import compact, load_compact_state_dict
from lightning_prune.methods.neurons import NeuronPruning
from lightning_prune.methods.nm import NMPruning, nm_satisfied
from lightning_prune.methods.sparsegpt import SparseGPT
from lightning_prune.methods.wanda import Wanda
from lightning_prune.report import sparsity_report
from lightning_prune.rewind import Rewind
from lightning_prune.schedules import AtEpochs, OneShot, Polynomial, Schedule
from lightning_prune.selection import describe_selection, select_parameters
from lightning_prune.sensitivity import plot_sensitivity, sensitivity_analysis, suggest_sparsity
from lightning_prune.step import PruningError, prune_once, prune_step
from lightning_prune.store import MaskStore
from lightning_prune.targets import Global, Local, Trigger

__version__ = "0.4.0"

__all__ = [
    "AtEpochs",
    "Global",
    "Local",
    "Distillation",
    "LearningRateRewarm",
    "MaskStore",
    "NMPruning",
    "NeuronPruning",
    "NewMask",
    "OneShot",
    "Polynomial",
    "PruningError",
    "PruningMethod",
    "PruningScheduleCallback",
    "Rewind",
    "Schedule",
    "SparseCheckpointIO",
    "Trigger",
    "SparseGPT",
    "Wanda",
    "__version__",
    "compact",
    "describe_selection",
    "inference_report",
    "inspect_sparse",
    "load_compact_state_dict",
    "load_sparse",
    "load_sparse_into",
    "nm_satisfied",
    "plan_speedup",
    "plot_sensitivity",
    "prune_once",
    "prune_step",
    "register_matrix_layer",
    "save_sparse",
    "select_parameters",
    "sensitivity_analysis",
    "sparsity_report",
    "suggest_sparsity",
    "to_semi_structured",
    "to_sparse_inference",
]
