"""Compaction: physically remove pruned neurons and channels, and load compact weights into a fresh model.

:func:`compact` turns a model whose neurons are pruned (masked by
:class:`~lightning_prune.methods.neurons.NeuronPruning`,
or with the zeros already made permanent) into a smaller dense model: every neuron whose entries in all
coupled tensors are zero is removed with Torch-Pruning's pruning functions, so that the layers get smaller
shapes (conv2 with 16 -> 8 channels makes fc1 take 200 instead of 400 inputs) and the outputs stay the same.

The compact model's ``state_dict`` has smaller tensors than a freshly built model of the same class.
:func:`resize_to_state_dict` gives a fresh model those shapes, so that ``load_state_dict`` (and Lightning's
``load_from_checkpoint``, from ``on_load_checkpoint``) works with the original class.

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight[:3].zero_(), net[0].bias[:3].zero_(), net[2].weight[:, :3].zero_()
    >>> compact(net, torch.randn(1, 4))
    {'0': (8, 5)}
    >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> resize_to_state_dict(fresh, net.state_dict())
    ['0', '2']
    >>> fresh.load_state_dict(net.state_dict())
    <All keys matched successfully>
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.methods.neuron_graph import ExcludeSpec, NeuronGroup, build_graph, groups_from_graph
from lightning_prune.reparam import make_permanent

__all__ = ["compact", "load_compact_state_dict", "resize_to_state_dict"]


def _dead(group: NeuronGroup) -> list[int]:
    """Neurons whose entries are zero in every coupled tensor (rows, biases, norm entries and columns)."""
    with torch.no_grad():
        live = torch.zeros(group.size, dtype=torch.bool)
        for s in group.slices:
            live |= s.values(group.size).ne(0).any(dim=1).cpu()
    dead = (~live).nonzero().flatten().tolist()
    return dead[:-1] if len(dead) == group.size else dead


def compact(model: nn.Module, example_inputs: Any, exclude: Sequence[ExcludeSpec] = ()) -> dict[str, tuple[int, int]]:
    """Physically remove pruned neurons/channels from ``model``, in place.

    Torch's pruning reparametrization, if the model carries it, is removed first (zeros baked in). A neuron is
    removed when all of its entries are zero: its row and bias entry in every coupled layer, its normalization
    entries and its columns in every consumer, so the compact model computes what the masked one did (a neuron whose
    column is zero contributes nothing downstream). Output layers and ``exclude`` keep their width; each group keeps
    at least one neuron.

    Args:
        model: any module (a ``LightningModule`` too), masked or with permanent zeros.
        example_inputs: inputs to trace it with (a tensor, a tuple of inputs or a dict).
        exclude: layers to leave whole (module names, glob patterns or modules).

    Returns:
        ``{group name: (neurons before, neurons after)}`` for every group that got smaller.

    Note:
        Parameters are replaced by new, smaller ones: build the optimizer again to train the compact model.
    """
    make_permanent(model)  # a model still in torch's pruning form
    graph = build_graph(model, example_inputs)
    plan = [(g, _dead(g)) for g in groups_from_graph(model, graph, exclude)]
    widths = {}
    for group, dead in plan:
        if not dead:
            continue
        root = group.modules[0]
        pruner = graph.get_pruner_of_module(root)
        graph.get_pruning_group(root, pruner.prune_out_channels, dead).prune(record_history=False)
        widths[group.name] = (group.size, group.size - len(dead))
    return widths


def _new_param(old: nn.Parameter | Tensor, shape: torch.Size) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def _resize(module: nn.Module, name: str, shapes: Mapping[str, torch.Size]) -> None:
    for pname in list(module._parameters):
        param = module._parameters[pname]
        if param is not None and pname in shapes:
            module._parameters[pname] = _new_param(param, shapes[pname])
    for bname in list(module._buffers):
        buf = module._buffers[bname]
        if buf is not None and bname in shapes and buf.dim() > 0:
            module._buffers[bname] = torch.empty(shapes[bname], dtype=buf.dtype, device=buf.device)
    if isinstance(module, nn.modules.conv._ConvNd):
        w = shapes["weight"]  # (out, in / groups, ...), transposed: (in, out / groups, ...)
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = int(w[0])
        first, second = int(w[0]), int(w[1]) * module.groups
        module.out_channels, module.in_channels = (second, first) if module.transposed else (first, second)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(shapes["weight"][0]), int(shapes["weight"][1])
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = int(next(iter(s[0] for k, s in shapes.items() if k in ("weight", "running_mean"))))
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(int(d) for d in shapes.get("weight", module.normalized_shape))
    else:
        raise ValueError(
            f"resize_to_state_dict: module {name!r} ({type(module).__name__}) has tensors of other shapes in the "
            "state_dict, and only Conv*d, Linear, BatchNorm and LayerNorm layers can be resized."
        )


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Give ``model``'s layers the shapes of the tensors in ``state_dict`` (before ``load_state_dict``).

    Only the shapes change (the new tensors are uninitialised), together with the layers' size attributes
    (``out_features``, ``in_channels``, ``num_features``, ...). Keys are matched by qualified name; keys the
    model lacks are ignored (``load_state_dict`` reports them).

    Returns:
        Qualified names of the modules that were resized.

    Raises:
        ValueError: for a module with other shapes that is not a Conv*d, Linear, BatchNorm or LayerNorm.
    """
    resized = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        local = {k: v for k, v in module.named_parameters(recurse=False)}
        local.update({k: v for k, v in module.named_buffers(recurse=False)})
        shapes = {k: state_dict[prefix + k].shape for k in local if prefix + k in state_dict}
        if any(local[k].shape != s for k, s in shapes.items()):
            _resize(module, name, shapes)
            resized.append(name)
    return resized


def load_compact_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> Any:
    """:func:`resize_to_state_dict` then ``model.load_state_dict(state_dict, strict)``; returns its result."""
    resize_to_state_dict(model, state_dict)
    return model.load_state_dict(state_dict, strict=strict)
