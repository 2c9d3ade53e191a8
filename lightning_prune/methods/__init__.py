"""How entries are chosen: the method contract (:mod:`~lightning_prune.methods.base`), the built-in methods
(:mod:`~lightning_prune.methods.builtin`: magnitude, random, torch's ``BasePruningMethod`` classes and importance
functions), exact selection (:mod:`~lightning_prune.methods.thresholds`), N:M (:mod:`~lightning_prune.methods.nm`),
Wanda (:mod:`~lightning_prune.methods.wanda`) and neurons with their dependency graph and compaction
(:mod:`~lightning_prune.methods.neurons`, :mod:`~lightning_prune.methods.neuron_graph`,
:mod:`~lightning_prune.methods.compaction`). A new method is one class: subclass :class:`PruningMethod`.

Each module imports only downward: the training core (selection, layers, counting, seeding) and ``base``.
"""

from lightning_prune.methods.base import ImportanceFn, MaskReader, NewMask, PruningMethod, Scope, check_scope
from lightning_prune.methods.builtin import MagnitudeScores, MethodName, ScoreMethod, TorchMethod, resolve_method

__all__ = [
    "ImportanceFn",
    "MagnitudeScores",
    "MaskReader",
    "MethodName",
    "NewMask",
    "PruningMethod",
    "Scope",
    "ScoreMethod",
    "TorchMethod",
    "check_scope",
    "resolve_method",
]
