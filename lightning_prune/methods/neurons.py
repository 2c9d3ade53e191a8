"""Neuron and channel pruning: whole output units masked during training, with every weight that touches them.

:class:`NeuronPruning` ranks the neuron groups that :mod:`lightning_prune.methods.neuron_graph` finds (by
:func:`group_importance`: L2 of each neuron's row and columns by default) and masks whole groups' rows,
biases, normalization entries and consumer columns. With ``compact=True`` on the callback, the pruned
neurons are removed physically at the end (:mod:`lightning_prune.methods.compaction`).

Example::

    >>> from lightning_prune import PruningScheduleCallback
    >>> callback = PruningScheduleCallback(sparsity=0.5, method=NeuronPruning(), scope="global", compact=True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from lightning_prune._utils.checks import check_choice, check_int
from lightning_prune.counting import count_for
from lightning_prune.methods import MaskReader, NewMask, PruningMethod
from lightning_prune.methods.compaction import compact
from lightning_prune.methods.neuron_graph import ExcludeSpec, NeuronGroup, check_exclude, neuron_groups
from lightning_prune.seeding import derive_seed, generator
from lightning_prune.selection import PruningTarget

__all__ = ["ImportanceLike", "NeuronPruning", "group_importance"]

NeuronImportanceFn = Callable[[NeuronGroup], Tensor]
ImportanceLike = Union[Literal["l2", "l1", "random"], NeuronImportanceFn]  # noqa: UP007 (runtime alias, py3.10)
_IMPORTANCES = ("l2", "l1", "random")


def group_importance(group: NeuronGroup, importance: ImportanceLike = "l2", seed: int = 0) -> Tensor:
    """Score every neuron of a group (higher is kept), shape ``(group.size,)``, on CPU, float32.

    * ``"l2"``: ``sqrt(sum of squares of the neuron's entries in every coupled weight tensor)``: its row
      (and normalization scale) together with its columns in the next layer(s);
    * ``"l1"``: the sum of the absolute values of the same entries;
    * ``"random"``: uniform scores from a generator seeded with ``seed``;
    * a function ``group -> scores``: anything computed from the group (``group.weights()`` gives the
      entries, ``group.slices`` the tensors).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
        ...     _ = net[2].weight.copy_(torch.tensor([[0.0, 0.0, 12.0]]))
        >>> group_importance(neuron_groups(net, torch.randn(1, 2))[0])
        tensor([ 1.,  2., 13.])
    """
    if isinstance(importance, str):
        if importance == "random":
            return torch.rand(group.size, generator=generator(seed))
        parts = [w.detach().float().cpu() for w in group.weights()]
        if importance == "l1":
            return torch.stack([p.abs().sum(dim=1) for p in parts]).sum(0)
        return torch.stack([p.pow(2).sum(dim=1) for p in parts]).sum(0).sqrt()
    scores = importance(group)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (group.size,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"`importance` must return one score per neuron, shape ({group.size},) for {group.name!r}, got {got}."
        )
    return scores.detach().float().cpu()


# ---------------------------------------------------------------------------------------------- method


def _check_importance(importance: ImportanceLike) -> ImportanceLike:
    if isinstance(importance, str):
        if importance not in _IMPORTANCES:
            raise ValueError(_importance_message(importance))
        return importance
    if not callable(importance):
        raise ValueError(_importance_message(importance))
    return importance


def _importance_message(importance: object) -> str:
    return f"`importance` must be one of {list(_IMPORTANCES)} or a function group -> scores, got {importance!r}."


class NeuronPruning(PruningMethod):
    """Prune whole neurons and channels, with every synapse that touches them, as masks during training.

    Use it as the ``method`` of :class:`~lightning_prune.PruningScheduleCallback`. The callback's
    ``sparsity`` is then the fraction of *neurons/channels* removed: of each layer's (local scope, rounded,
    at least one neuron kept) or of all prunable layers' together (global scope: one ranking across layers,
    with a floor of ``min_neurons`` per layer so that no layer is emptied). The callback's ``parameters``
    say which layers are pruned (default: every Conv/Linear layer); output layers never are.

    Args:
        importance: ``"l2"`` (default: ``sqrt(sum row^2 + sum column^2)`` over all coupled weights),
            ``"l1"``, ``"random"`` or a function ``NeuronGroup -> scores`` of shape ``(group.size,)``
            (higher is kept); see :func:`group_importance`.
        exclude: more layers to keep whole: qualified names relative to the ``LightningModule``
            (``"model.fc1"``), glob patterns, or modules.
        example_inputs: inputs to trace the model with; default: the module's ``example_input_array``.
        min_neurons: neurons kept at least in every group in global scope (and, at least 1, in local).
        normalize: in global scope, divide each group's scores by their mean over its live neurons
            (``"mean"``, default) so that layers of different fan-in and weight scale compete fairly, or
            rank the raw scores (``None``). Local scope ranks within a group and is not affected.

    Raises:
        ValueError: for an unknown importance, a bad ``exclude`` or ``min_neurons`` (here), and when
            ``fit`` starts, for missing example inputs, an ``exclude`` entry that matches nothing, or a
            selection with no prunable layer.

    Example::

        >>> from lightning_prune import PruningScheduleCallback
        >>> callback = PruningScheduleCallback(
        ...     sparsity=0.5, method=NeuronPruning(importance="l2"), scope="global", compact=True
        ... )
    """

    name = "neurons"
    structured = True
    scopes = ("local", "global")
    compacts = True
    per_tensor = False

    def __init__(
        self,
        importance: ImportanceLike = "l2",
        *,
        exclude: Sequence[ExcludeSpec] = (),
        example_inputs: Any = None,
        min_neurons: int = 1,
        normalize: Literal["mean"] | None = "mean",
    ) -> None:
        self.importance = _check_importance(importance)
        self.exclude = check_exclude(exclude)
        self.min_neurons = check_int("min_neurons", min_neurons, minimum=1)
        self.normalize = check_choice("normalize", normalize, ("mean", None))
        self.example_inputs = example_inputs
        label = importance if isinstance(importance, str) else getattr(importance, "__name__", "custom")
        self.name = f"neurons({label})"
        self.groups: list[NeuronGroup] = []
        self._chosen: dict[str, int] = {}  # group name -> index of the target that chose it

    # -- hooks called by the callback

    def setup(self, pl_module: nn.Module, targets: Sequence[PruningTarget]) -> None:
        inputs = self.example_inputs
        if inputs is None:
            inputs = getattr(pl_module, "example_input_array", None)
        if inputs is None:
            raise ValueError(
                "NeuronPruning traces the model once to find coupled layers: give `example_inputs=` or set "
                "`self.example_input_array` in the LightningModule."
            )
        self.example_inputs = inputs
        groups = neuron_groups(pl_module, inputs, self.exclude)
        by_module = {id(t.module): i for i, t in enumerate(targets) if t.param == "weight"}
        self.groups, self._chosen = [], {}
        for g in groups:
            hits = [by_module[id(m)] for m in g.modules if id(m) in by_module]
            if hits:
                self.groups.append(g)
                self._chosen[g.name] = hits[0]
        if not self.groups:
            raise ValueError(
                "NeuronPruning found no prunable layer among the chosen `parameters` (output layers and `exclude` "
                f"are kept whole): chosen {[t.name for t in targets]}."
            )

    def masked(self, targets: Sequence[PruningTarget]) -> list[PruningTarget]:
        out = {t.name: t for t in targets}
        for g in self.groups:
            for t in g.tensors():
                out.setdefault(t.name, t)
        return list(out.values())

    def metrics(self, masks: MaskReader) -> dict[str, float]:
        alive = {g.name: int(g.alive(masks).sum()) for g in self.groups}
        total = sum(g.size for g in self.groups)
        removed = total - sum(alive.values())
        out = {
            "pruning/neurons_removed": float(removed),
            "pruning/neurons_total": float(total),
            "pruning/neuron_sparsity": removed / total if total else 0.0,
        }
        out.update({f"pruning/width/{name}": float(n) for name, n in alive.items()})
        return out

    # -- pruning

    def _scores(self, group: NeuronGroup, seed: int) -> Tensor:
        return group_importance(group, self.importance, seed)

    def _global_scores(self, group: NeuronGroup, alive: Tensor, seed: int) -> Tensor:
        scores = self._scores(group, seed)
        if self.normalize == "mean":
            scores = scores / scores[alive].mean().clamp_min(torch.finfo(scores.dtype).tiny)
        return scores.masked_fill(~alive, float("inf"))

    def local_masks(
        self, targets: Sequence[PruningTarget], sparsities: Sequence[float | None], seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        # every score is taken from the model as it was before this step, then all masks are decided
        plan = []
        for i, g in enumerate(self.groups):
            sparsity = sparsities[self._chosen[g.name]] or 0.0
            alive = g.alive(masks)
            extra = min(count_for(sparsity, g.size), g.size - 1) - int((~alive).sum())
            if extra > 0:
                scores = self._scores(g, derive_seed(seed, i)).masked_fill(~alive, float("inf"))
                keep = alive.clone()
                keep[torch.argsort(scores, stable=True)[:extra]] = False
                plan.append((g, keep))
        for g, keep in plan:
            yield from g.masks_for(keep)

    def global_masks(
        self, targets: Sequence[PruningTarget], sparsity: float | None, seed: int, masks: MaskReader
    ) -> Iterator[NewMask]:
        alive = [g.alive(masks) for g in self.groups]
        total = sum(g.size for g in self.groups)
        extra = count_for(sparsity or 0.0, total) - sum(int((~a).sum()) for a in alive)
        if extra <= 0:
            return
        scores = torch.cat(
            [self._global_scores(g, a, derive_seed(seed, i)) for i, (g, a) in enumerate(zip(self.groups, alive))]
        )
        owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(self.groups)])
        offset = torch.cumsum(torch.tensor([0] + [g.size for g in self.groups]), 0)
        room = [max(0, int(a.sum()) - min(self.min_neurons, g.size)) for g, a in zip(self.groups, alive)]
        keep = [a.clone() for a in alive]
        for pos in torch.argsort(scores, stable=True).tolist():
            if extra == 0 or scores[pos] == float("inf"):
                break
            gi = int(owner[pos])
            if room[gi] == 0:
                continue
            keep[gi][pos - int(offset[gi])] = False
            room[gi] -= 1
            extra -= 1
        for g, a, k in zip(self.groups, alive, keep):
            if not torch.equal(a, k):
                yield from g.masks_for(k)

    def compact(self, pl_module: nn.Module) -> dict[str, tuple[int, int]]:
        """Physically remove the pruned neurons from ``pl_module`` (see :func:`lightning_prune.compact`)."""
        return compact(pl_module, self.example_inputs, exclude=self.exclude)
