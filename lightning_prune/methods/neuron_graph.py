"""Which neurons and channels are coupled: Torch-Pruning's dependency graph turned into neuron groups.

A *neuron* is an output unit of an ``nn.Linear`` or an output channel of an ``nn.Conv*d``. Pruning it
masks, in one step, its row in its own weight, its bias entry, the matching entries of a following
``BatchNorm``, and its column(s) in every layer that consumes it (for
conv -> flatten -> linear, the block of input columns that the channel maps to). Which layers are coupled
is found by Torch-Pruning's ``DependencyGraph`` from one traced forward pass, so that, for example, the
channels of tensors added by a residual connection form one group and are pruned together.

This module only describes the groups (:class:`NeuronGroup`, :func:`neuron_groups`); the method that ranks
and prunes them is :class:`lightning_prune.methods.neurons.NeuronPruning`, and :mod:`lightning_prune.methods.compaction`
removes pruned neurons physically, as Torch-Pruning separates its ``dependency`` from its ``pruner``.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from torch import Tensor, nn

from lightning_prune._utils.lightning import rank_zero_warn
from lightning_prune._utils.modules import device_of, keep_modes, to_device
from lightning_prune.methods import MaskReader, NewMask
from lightning_prune.selection import PruningTarget, matrix_weight_names

if TYPE_CHECKING:
    import torch_pruning as tp

__all__ = [
    "ExcludeSpec",
    "NeuronGroup",
    "NeuronSlice",
    "build_graph",
    "check_exclude",
    "groups_from_graph",
    "neuron_groups",
    "output_layers",
]

ExcludeSpec = Union[str, nn.Module]  # noqa: UP007 (runtime alias, py3.10)
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
        """The group's entries of the tensor as the model uses it, shape ``(size, k)``: row ``i`` holds neuron
        ``i``'s."""
        with torch.no_grad():
            t = self.target.tensor.movedim(self.dim, 0)
            order = torch.argsort(self.owner, stable=True)
            picked = t[self.index.to(t.device)[order.to(t.device)]]
            return picked.reshape(size, -1)

    def mask_for(self, keep: Tensor) -> Tensor:
        """A mask of the tensor's shape that zeroes the positions of neurons with ``keep[i] == False``."""
        tensor = self.target.tensor
        line = torch.ones(tensor.shape[self.dim], dtype=torch.uint8, device=tensor.device)
        line[self.index.to(line.device)] = keep.to(line.device)[self.owner.to(line.device)].to(line.dtype)
        shape = [1] * tensor.dim()
        shape[self.dim] = -1
        return line.view(shape).expand_as(tensor).clone()


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

    def alive(self, masks: MaskReader | None = None) -> Tensor:
        """Boolean ``(size,)``: neurons not pruned yet in ``masks`` (a neuron is pruned when its root row is
        masked); all of them without masks."""
        root = self.slices[0]
        mask = None if masks is None else masks.mask(root.target)
        if mask is None:
            return torch.ones(self.size, dtype=torch.bool)
        with torch.no_grad():
            rows = mask.movedim(root.dim, 0)[root.index.to(mask.device)].reshape(len(root.index), -1)
            live_pos = rows.ne(0).any(dim=1).cpu()
        alive = torch.zeros(self.size, dtype=torch.bool)
        alive[root.owner[live_pos]] = True
        return alive

    def masks_for(self, keep: Tensor) -> Iterator[NewMask]:
        """Masks of every coupled tensor that keep only the neurons with ``keep[i]`` (they narrow the masks
        already kept)."""
        for s in self.slices:
            mask = s.mask_for(keep)
            if bool((mask == 0).any()):
                yield NewMask(s.target, mask)

    def tensors(self) -> list[PruningTarget]:
        return [s.target for s in self.slices]


# ---------------------------------------------------------------------------------------------- graph


@contextmanager
def _traced(model: nn.Module) -> Iterator[None]:
    """Torch-Pruning's tracing switches the model to eval mode; give every module its mode back."""
    with keep_modes(model), torch.enable_grad():
        yield


_GRAPH_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)


def _check_known(model: nn.Module) -> None:
    """Refuse a model with matrix layers that Torch-Pruning's graph does not model: it would take their weights
    for loose parameters, and a neuron feeding one would be pruned without its columns there."""
    unknown = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if matrix_weight_names(m) and not isinstance(m, _GRAPH_TYPES)
    ]
    if unknown:
        more = f", and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise ValueError(
            "Neuron pruning and compaction couple each neuron's row with its columns in the next layers through "
            "Torch-Pruning's dependency graph, which knows nn.Linear and nn.Conv*d but not the matrix layers "
            f"{', '.join(unknown[:4])}{more}; their rows and columns could not be kept consistent. Use an "
            "unstructured method (the default, Wanda) or N:M for this model."
        )


def build_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, leaving the model's train/eval modes.

    Raises:
        ValueError: for a model with matrix layers that the graph does not know (Hugging Face's ``Conv1D``,
            registered layers; see :mod:`lightning_prune.layers`).
    """
    _check_known(model)
    with _traced(model):
        inputs = to_device(example_inputs, device_of(model))
        return _torch_pruning().DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)


def _torch_pruning() -> Any:
    """Torch-Pruning, imported where neuron pruning first needs it (a heavy import the rest of the package spares)."""
    try:
        import torch_pruning
    except ImportError as err:
        raise ImportError(
            "Neuron pruning and compaction need Torch-Pruning: pip install 'lightning-prune[structured]'."
        ) from err
    return torch_pruning


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
    return [pname for pname, value in module._parameters.items() if value is not None]


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


def check_exclude(exclude: Sequence[ExcludeSpec]) -> tuple[ExcludeSpec, ...]:
    """``exclude`` as a tuple of module names, glob patterns or modules, else a ``ValueError``."""
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
    for spec in check_exclude(exclude):
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
            if isinstance(module, nn.Parameter):  # a loose parameter that the graph prunes by guesswork
                supported = False
                break
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
        model: any module with plain parameters (a model in torch's pruning form: call
            :func:`~lightning_prune.reparam.make_permanent` first); its train/eval modes are left as they were.
        example_inputs: what ``model(...)`` takes: a tensor, a tuple of positional inputs or a dict.
        exclude: layers whose neurons are kept: qualified module names, glob patterns over them, or modules.
            A group is skipped when any of its layers is excluded. Output layers are always excluded.

    Returns:
        One :class:`NeuronGroup` per independent set of prunable neurons, in Torch-Pruning's order.

    Raises:
        ValueError: for an ``exclude`` entry that matches no module.
    """
    return groups_from_graph(model, build_graph(model, example_inputs), exclude)
