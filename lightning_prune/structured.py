"""Neuron and channel pruning: whole output units removed with every weight that touches them.

A *neuron* is an output unit of an ``nn.Linear`` or an output channel of an ``nn.Conv*d``. Pruning it
masks, in one step, its row in its own weight, its bias entry, the matching entries of a following
``BatchNorm``, and its column(s) in every layer that consumes it (for
conv -> flatten -> linear, the block of input columns that the channel maps to). Which layers are coupled
is found by Torch-Pruning's ``DependencyGraph`` from one traced forward pass, so that, for example, the
channels of tensors added by a residual connection form one group and are pruned together.

The network's output layers (the Conv/Linear layers whose outputs reach a model output through
parameter-free operations) are never pruned; more layers can be excluded.

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> groups = neuron_groups(net, torch.randn(1, 4))
    >>> [(g.name, g.size) for g in groups]
    [('2', 6), ('0', 8)]
    >>> [s.name for s in groups[1].slices]
    ['0.weight', '0.bias', '2.weight']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_prune._lightning import rank_zero_warn
from lightning_prune.masking import apply_mask, count_for
from lightning_prune.methods import PruningMethod
from lightning_prune.selection import PruningTarget

__all__ = [
    "ImportanceLike",
    "NeuronGroup",
    "NeuronPruning",
    "NeuronSlice",
    "group_importance",
    "neuron_groups",
]

NeuronImportanceFn = Callable[["NeuronGroup"], Tensor]
ImportanceLike = Union[Literal["l2", "l1", "random"], NeuronImportanceFn]  # noqa: UP007 (runtime alias, py3.10)
ExcludeSpec = Union[str, nn.Module]  # noqa: UP007
_IMPORTANCES = ("l2", "l1", "random")
_NORMS = (nn.modules.batchnorm._BatchNorm,)
_ACROSS = (nn.LayerNorm, nn.GroupNorm)  # normalize across neurons: removing some changes the others


@dataclass(frozen=True)
class NeuronSlice:
    """The entries of one tensor that belong to the neurons of a group.

    Along dimension ``dim`` of the tensor, position ``index[j]`` belongs to neuron ``owner[j]``.

    Attributes:
        name: qualified tensor name, e.g. ``"model.fc1.weight"``.
        module: the owning module.
        param: the parameter's name in it (``"weight"`` or ``"bias"``).
        dim: the dimension the neurons index (0: rows / output channels, 1: columns / input channels).
        index: positions along ``dim``.
        owner: the neuron each position belongs to.
        kind: ``"out"`` (the neuron's own row, bias entry or normalization entry) or ``"in"`` (a column
            of a consumer).
    """

    name: str
    module: nn.Module = field(repr=False)
    param: str
    dim: int
    index: Tensor = field(repr=False)
    owner: Tensor = field(repr=False)
    kind: Literal["out", "in"] = "out"

    @property
    def target(self) -> PruningTarget:
        return PruningTarget(self.name, self.name.rpartition(".")[0], self.module, self.param)

    @property
    def is_weight(self) -> bool:
        return self.param == "weight"

    def values(self, size: int) -> Tensor:
        """The group's entries of the effective tensor, shape ``(size, k)``: row ``i`` holds neuron ``i``'s."""
        with torch.no_grad():
            t = self.target.effective().movedim(self.dim, 0)
            order = torch.argsort(self.owner, stable=True)
            picked = t[self.index.to(t.device)[order.to(t.device)]]
            return picked.reshape(size, -1)

    def mask_for(self, keep: Tensor) -> Tensor:
        """A mask of the tensor's shape that zeroes the positions of neurons with ``keep[i] == False``."""
        original = self.target.original
        line = torch.ones(original.shape[self.dim], dtype=original.dtype, device=original.device)
        line[self.index.to(line.device)] = keep.to(line.device)[self.owner.to(line.device)].to(line.dtype)
        shape = [1] * original.dim()
        shape[self.dim] = -1
        return line.view(shape).expand_as(original).clone()


@dataclass(frozen=True)
class NeuronGroup:
    """Neurons (or channels) that are pruned together, with every tensor entry that belongs to them.

    Attributes:
        name: qualified name of the group's first layer (its root), e.g. ``"model.conv2"``.
        layers: qualified names of every Conv/Linear layer whose *outputs* are these neurons (one for a
            plain layer; several when a residual connection adds their outputs).
        size: number of neurons.
        slices: the coupled tensors: the layers' rows and biases, normalization entries, consumers' columns.
    """

    name: str
    layers: tuple[str, ...]
    size: int
    slices: tuple[NeuronSlice, ...] = field(repr=False)
    modules: tuple[nn.Module, ...] = field(repr=False, compare=False, default=())

    def weights(self) -> list[Tensor]:
        """Each coupled weight tensor's entries as ``(size, k)`` (biases left out), in the model's units."""
        return [s.values(self.size) for s in self.slices if s.is_weight]

    def alive(self) -> Tensor:
        """Boolean ``(size,)``: neurons not pruned yet (a neuron is pruned when its root row is masked)."""
        root = self.slices[0]
        mask = root.target.mask
        if mask is None:
            return torch.ones(self.size, dtype=torch.bool)
        with torch.no_grad():
            rows = mask.movedim(root.dim, 0)[root.index.to(mask.device)].reshape(len(root.index), -1)
            live_pos = rows.ne(0).any(dim=1).cpu()
        alive = torch.zeros(self.size, dtype=torch.bool)
        alive[root.owner[live_pos]] = True
        return alive

    def prune_to(self, keep: Tensor) -> None:
        """Mask every coupled tensor so that only the neurons with ``keep[i]`` remain (masks only narrow)."""
        for s in self.slices:
            mask = s.mask_for(keep)
            if not bool((mask == 0).any()):
                continue
            apply_mask(s.target, mask)

    def tensors(self) -> list[PruningTarget]:
        return [s.target for s in self.slices]


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
            return torch.rand(group.size, generator=torch.Generator().manual_seed(seed))
        parts = [w.detach().float().cpu() for w in group.weights()]
        if importance == "l1":
            return sum(p.abs().sum(dim=1) for p in parts)
        return torch.sqrt(sum(p.pow(2).sum(dim=1) for p in parts))
    scores = importance(group)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (group.size,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"`importance` must return one score per neuron, shape ({group.size},) for {group.name!r}, got {got}."
        )
    return scores.detach().float().cpu()


# ---------------------------------------------------------------------------------------------- graph


@contextmanager
def _traced(model: nn.Module) -> Iterator[None]:
    """Torch-Pruning's tracing switches the model to eval mode; give every module its mode back."""
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(x, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    return inputs


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` (masked or not), leaving the model's train/eval modes."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with _traced(model):
        inputs = _to_device(example_inputs, device)
        return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)


def _prunable_layer(module: Any) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach a model output without passing another Conv/Linear layer."""
    found: list[nn.Module] = []
    stack = [n for n in graph.module2node.values() if not n.outputs]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _prunable_layer(node.module):
            if not any(node.module is m for m in found):
                found.append(node.module)
            continue
        stack.extend(node.inputs)
    return found


def _has_params(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(p is not None for p in module._parameters.values())


def _param_names(module: nn.Module) -> list[str]:
    names = []
    for pname, value in module._parameters.items():
        if value is None:
            continue
        masked = pname.endswith("_orig") and hasattr(module, pname[:-5] + "_mask")
        names.append(pname[:-5] if masked else pname)
    return names


def _slices_for(
    module: nn.Module, qual: str, handler: Any, idxs: list[int], owner: list[int]
) -> list[NeuronSlice] | None:
    """The tensor slices that one graph entry touches, or ``None`` for a layer type this module cannot mask."""
    index, own = torch.tensor(idxs, dtype=torch.long), torch.tensor(owner, dtype=torch.long)
    out = getattr(handler, "__name__", "") == "prune_out_channels"
    names = _param_names(module)

    def mk(param: str, dim: int, kind: Literal["out", "in"]) -> NeuronSlice:
        return NeuronSlice(f"{qual}.{param}" if qual else param, module, param, dim, index, own, kind)

    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if out or depthwise:
            dim = 1 if module.transposed and not depthwise else 0
            return [mk("weight", dim, "out")] + ([mk("bias", 0, "out")] if "bias" in names else [])
        if module.groups != 1:
            return None
        return [mk("weight", 0 if module.transposed else 1, "in")]
    if isinstance(module, nn.Linear):
        if out:
            return [mk("weight", 0, "out")] + ([mk("bias", 0, "out")] if "bias" in names else [])
        return [mk("weight", 1, "in")]
    if isinstance(module, _NORMS):  # per channel: removing one leaves the others' outputs unchanged
        return [mk(p, 0, "out") for p in ("weight", "bias") if p in names]
    return None


def _matches(spec: ExcludeSpec, name: str, module: nn.Module) -> bool:
    if isinstance(spec, nn.Module):
        return spec is module
    return fnmatch.fnmatchcase(name, spec)


def _check_exclude(exclude: Sequence[ExcludeSpec]) -> tuple[ExcludeSpec, ...]:
    if isinstance(exclude, (str, nn.Module)) or not isinstance(exclude, Sequence):
        raise ValueError(f"`exclude` must be a list of module names, glob patterns or modules, got {exclude!r}.")
    for spec in exclude:
        if not isinstance(spec, (str, nn.Module)):
            raise ValueError(f"`exclude` entries must be module names, glob patterns or modules, got {spec!r}.")
    return tuple(exclude)


def groups_from_graph(
    model: nn.Module, graph: tp.DependencyGraph, exclude: Sequence[ExcludeSpec] = ()
) -> list[NeuronGroup]:
    """Turn the graph's pruning groups into :class:`NeuronGroup` s (see :func:`neuron_groups`)."""
    names = {id(m): n for n, m in model.named_modules()}
    layers = [(n, m) for n, m in model.named_modules() if _prunable_layer(m)]
    for spec in _check_exclude(exclude):
        if not any(_matches(spec, n, m) for n, m in model.named_modules()):
            label = spec if isinstance(spec, str) else type(spec).__name__
            raise ValueError(f"`exclude` entry {label!r} matches no module of the model.")
    ignored = output_layers(graph) + [m for n, m in layers if any(_matches(s, n, m) for s in exclude)]
    groups = []
    for g in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        slices: list[NeuronSlice] = []
        outs: list[str] = []
        modules: list[nn.Module] = []
        supported = True
        for item in g:
            module = item.dep.target.module
            if not _has_params(module) and not isinstance(module, _ACROSS):
                continue
            if id(module) not in names:
                supported = False
                break
            qual = names[id(module)]
            found = _slices_for(module, qual, item.dep.handler, list(item.idxs), list(item.root_idxs))
            if found is None:
                rank_zero_warn(
                    f"Neuron pruning skips the group of {g[0].dep.target.module.__class__.__name__} "
                    f"{names.get(id(g[0].dep.target.module))!r}: it couples {type(module).__name__} {qual!r}, "
                    "which it cannot remove exactly (supported: Conv*d with groups 1 or depthwise, Linear, BatchNorm; "
                    "LayerNorm and GroupNorm normalize across neurons, so removing some would change the others)."
                )
                supported = False
                break
            if _prunable_layer(module) and found[0].kind == "out" and qual not in outs:
                outs.append(qual)
                modules.append(module)
            slices.extend(found)
        if not supported or not outs:
            continue
        root = slices[0]
        size = int(root.owner.max()) + 1
        groups.append(NeuronGroup(outs[0], tuple(outs), size, tuple(slices), tuple(modules)))
    return groups


def neuron_groups(model: nn.Module, example_inputs: Any, exclude: Sequence[ExcludeSpec] = ()) -> list[NeuronGroup]:
    """The prunable groups of neurons/channels of ``model``, found by tracing it once on ``example_inputs``.

    Args:
        model: any module (masked by torch's pruning or not); its train/eval modes are left as they were.
        example_inputs: what ``model(...)`` takes: a tensor, a tuple of positional inputs or a dict.
        exclude: layers whose neurons are kept: qualified module names, glob patterns over them, or modules.
            A group is skipped when any of its layers is excluded. Output layers are always excluded.

    Returns:
        One :class:`NeuronGroup` per independent set of prunable neurons, in Torch-Pruning's order.

    Raises:
        ValueError: for an ``exclude`` entry that matches no module.
    """
    return groups_from_graph(model, build_graph(model, example_inputs), exclude)


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
    supports_global = True

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
        self.exclude = _check_exclude(exclude)
        if isinstance(min_neurons, bool) or not isinstance(min_neurons, int) or min_neurons < 1:
            raise ValueError(f"`min_neurons` must be an integer >= 1, got {min_neurons!r}.")
        self.min_neurons = min_neurons
        if normalize not in ("mean", None):
            raise ValueError(f"`normalize` must be one of ['mean', None], got {normalize!r}.")
        self.normalize = normalize
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

    def metrics(self) -> dict[str, float]:
        alive = {g.name: int(g.alive().sum()) for g in self.groups}
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

    def prune_local(self, targets: Sequence[PruningTarget], sparsities: Sequence[float], seed: int) -> None:
        # every score is taken from the model as it was before this step, then all masks are applied
        plan = []
        for i, g in enumerate(self.groups):
            sparsity = sparsities[self._chosen[g.name]]
            alive = g.alive()
            extra = min(count_for(sparsity, g.size), g.size - 1) - int((~alive).sum())
            if extra > 0:
                scores = self._scores(g, seed * 1_000_003 + i).masked_fill(~alive, float("inf"))
                keep = alive.clone()
                keep[torch.argsort(scores, stable=True)[:extra]] = False
                plan.append((g, keep))
        for g, keep in plan:
            g.prune_to(keep)

    def prune_global(self, targets: Sequence[PruningTarget], sparsity: float, seed: int) -> None:
        alive = [g.alive() for g in self.groups]
        total = sum(g.size for g in self.groups)
        extra = count_for(sparsity, total) - sum(int((~a).sum()) for a in alive)
        if extra <= 0:
            return
        scores = torch.cat(
            [self._global_scores(g, a, seed * 1_000_003 + i) for i, (g, a) in enumerate(zip(self.groups, alive))]
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
                g.prune_to(k)

    def compact(self, pl_module: nn.Module) -> dict[str, tuple[int, int]]:
        """Physically remove the pruned neurons from ``pl_module`` (see :func:`lightning_prune.compact`)."""
        from lightning_prune.compaction import compact

        return compact(pl_module, self.example_inputs, exclude=self.exclude)
