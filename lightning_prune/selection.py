"""Which tensors are pruned, and to what target: resolving ``parameters`` and ``sparsity`` against a model.

Names are *qualified parameter names* relative to the module given (for a ``LightningModule`` that holds its
network as ``self.model``: ``"model.conv1.weight"``). One tensor is one target: a parameter shared by several
modules (tied embeddings, ``head.weight = emb.weight``) is found once, under its first name in model order,
with the others as :attr:`PruningTarget.aliases`; naming any alias means the same tensor.

Layers whose weight is computed by a parametrization (``torch.nn.utils.parametrizations.weight_norm`` or
``spectral_norm``, or the older ``torch.nn.utils.weight_norm``) are pruned through the tensor that the
parametrization scales, which keeps every zero: ``parametrizations.weight.original1`` (weight norm's
direction ``v``) or ``parametrizations.weight.original`` (spectral norm). A layer under any other
parametrization is left out of the default selection with a warning that names it.

Example::

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    >>> [t.name for t in select_parameters(net)]
    ['0.weight', '2.weight']
    >>> [(t.name, t.sparsity) for t in select_parameters(net, sparsity={nn.Conv2d: 0.2, "2": 0.4})]
    [('0.weight', 0.2), ('2.weight', 0.4)]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize

from lightning_prune._checks import check_fraction
from lightning_prune._lightning import rank_zero_warn

__all__ = [
    "ParameterSpec",
    "PruningTarget",
    "SparsityKey",
    "SparsitySpec",
    "iter_parameters",
    "local_view",
    "select_parameters",
    "shard_offset",
]

ParameterSpec = str | tuple[nn.Module, str]
SparsityKey = type | str
SparsitySpec = float | Mapping[SparsityKey, float] | None

_DEFAULT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_GLOB_CHARS = set("*?[")
_ORIG, _MASK = "_orig", "_mask"


@dataclass(frozen=True)
class PruningTarget:
    """One tensor to prune.

    Attributes:
        name: qualified parameter name, e.g. ``"model.conv1.weight"`` (the first of its names in model order).
        module_name: qualified name of the owning module, e.g. ``"model.conv1"``.
        module: the owning module.
        param: the parameter's name in its module, e.g. ``"weight"``.
        sparsity: this tensor's final target (local scope), or ``None`` when the target is global or the
            method takes none.
        aliases: every qualified name of the tensor (``name`` first): more than one for tied weights.
    """

    name: str
    module_name: str
    module: nn.Module = field(compare=False, repr=False)
    param: str = "weight"
    sparsity: float | None = None
    aliases: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def tensor(self) -> nn.Parameter:
        """The trainable parameter (``<param>_orig`` where torch's pruning reparametrizes it)."""
        if _torch_masked(self.module, self.param):
            return self.module.get_parameter(self.param + _ORIG)
        return self.module.get_parameter(self.param)

    def value(self) -> Tensor:
        """The weights as the model uses them: the parameter, or ``orig * mask`` under torch's reparametrization
        (never torch's cached, possibly stale attribute)."""
        tensor = self.tensor
        if _torch_masked(self.module, self.param):
            return tensor * getattr(self.module, self.param + _MASK)
        return tensor

    def with_sparsity(self, sparsity: float | None) -> PruningTarget:
        return PruningTarget(self.name, self.module_name, self.module, self.param, sparsity, self.aliases)


def _torch_masked(module: nn.Module, name: str) -> bool:
    """Whether torch's pruning reparametrization (``<name>_orig`` + ``<name>_mask``) is on ``module``."""
    return hasattr(module, name + _MASK) and isinstance(getattr(module, name + _ORIG, None), nn.Parameter)


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _logical(module: nn.Module, pname: str) -> str:
    if pname.endswith(_ORIG) and _torch_masked(module, pname[: -len(_ORIG)]):
        return pname[: -len(_ORIG)]
    return pname


def _tensors(model: nn.Module) -> list[tuple[list[str], nn.Module, str]]:
    """Every distinct parameter once: ``([qualified names], owning module of the first name, local name)``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, tuple[list[str], nn.Module, str]] = {}
    for qual, tensor in model.named_parameters(remove_duplicate=False):
        module_name, _, pname = qual.rpartition(".")
        module = modules[module_name]
        logical = _qualify(module_name, _logical(module, pname))
        entry = by_id.get(id(tensor))
        if entry is None:
            by_id[id(tensor)] = ([logical], module, _logical(module, pname))
        elif logical not in entry[0]:
            entry[0].append(logical)
    return list(by_id.values())


def iter_parameters(model: nn.Module) -> Iterator[PruningTarget]:
    """Every distinct parameter of ``model`` once, in model order, as a :class:`PruningTarget` without a target.

    A tensor shared by several modules is yielded once, with all its names in ``aliases``; a tensor that
    torch's pruning has reparametrized is yielded under its logical name (``weight``, not ``weight_orig``).

    Example::

        >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> [t.aliases for t in iter_parameters(nn.ModuleDict({"emb": emb, "head": head}))]
        [('emb.weight', 'head.weight')]
    """
    for names, module, pname in _tensors(model):
        yield PruningTarget(names[0], names[0].rpartition(".")[0], module, pname, None, tuple(names))


def _owners(model: nn.Module, target: PruningTarget) -> list[tuple[str, nn.Module]]:
    """``(module name, module)`` of every alias of ``target``."""
    out = []
    for alias in target.aliases:
        module_name = alias.rpartition(".")[0]
        out.append((module_name, model.get_submodule(module_name)))
    return out


def _key_matches(key: SparsityKey, model: nn.Module, target: PruningTarget) -> bool:
    for alias, (module_name, module) in zip(target.aliases, _owners(model, target)):
        if isinstance(key, type):
            hit = isinstance(module, key)
        else:
            by_type = not (_GLOB_CHARS & set(key)) and key in {c.__name__ for c in type(module).__mro__}
            hit = by_type or fnmatch.fnmatchcase(alias, key) or fnmatch.fnmatchcase(module_name, key)
        if hit:
            return True
    return False


def _check_parameters(parameters: object) -> None:
    if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Sequence):
        raise ValueError(
            f"`parameters` must be a list of names, glob patterns or (module, name) pairs, got {parameters!r}."
        )


def _resolve_specs(model: nn.Module, parameters: Sequence[ParameterSpec]) -> list[PruningTarget]:
    _check_parameters(parameters)
    everything = list(iter_parameters(model))
    by_module = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    chosen: dict[str, PruningTarget] = {}
    for spec in parameters:
        if isinstance(spec, str):
            hits = [t for t in everything if any(fnmatch.fnmatchcase(a, spec) for a in t.aliases)]
            if not hits:
                some = ", ".join(t.name for t in everything[:6])
                raise ValueError(
                    f"`parameters` entry {spec!r} matches no parameter of the model (it has: {some}, ...)."
                )
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], nn.Module) and isinstance(spec[1], str):
            module, pname = spec
            if id(module) not in by_module:
                raise ValueError(
                    f"`parameters` entry ({type(module).__name__}, {pname!r}): the module is not part of the model."
                )
            qual = _qualify(by_module[id(module)], pname)
            hits = [t for t in everything if qual in t.aliases]
            if not hits:
                raise ValueError(
                    f"`parameters` entry ({type(module).__name__}, {pname!r}): {by_module[id(module)] or 'the model'} "
                    f"has no parameter {pname!r}."
                )
        else:
            raise ValueError(
                f"`parameters` entries must be names, glob patterns or (module, name) pairs, got {spec!r}."
            )
        for hit in hits:
            chosen.setdefault(hit.name, hit)
    order = {t.name: i for i, t in enumerate(everything)}
    return sorted(chosen.values(), key=lambda t: order[t.name])


def _zero_keeping_source(module: nn.Module) -> str | None:
    """For a layer whose ``weight`` a parametrization computes: the local name (relative to ``module``) of the
    tensor whose zeros are zeros of the weight, or ``None`` when no such tensor is known."""
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        kinds = [type(p).__name__ for p in plist]
        if kinds == ["_WeightNorm"]:
            return "parametrizations.weight.original1"
        if kinds == ["_SpectralNorm"]:
            return "parametrizations.weight.original"
        return None
    if isinstance(getattr(module, "weight_v", None), nn.Parameter) and "weight" not in dict(
        module.named_parameters(recurse=False)
    ):
        return "weight_v"  # torch.nn.utils.weight_norm (the older hook-based form)
    return None


def _default_candidates(model: nn.Module) -> tuple[list[PruningTarget], list[str]]:
    """The weight of every Conv/Linear layer (through its parametrization where that keeps zeros), and the
    names of the layers left out because an unknown parametrization computes their weight."""
    by_alias = {a: t for t in iter_parameters(model) for a in t.aliases}
    chosen: dict[str, PruningTarget] = {}
    skipped = []
    for module_name, module in model.named_modules():
        if not isinstance(module, _DEFAULT_TYPES):
            continue
        direct = by_alias.get(_qualify(module_name, "weight"))
        if direct is not None and not parametrize.is_parametrized(module, "weight"):
            chosen.setdefault(direct.name, direct)
            continue
        source = _zero_keeping_source(module)
        if source is not None:
            t = by_alias[_qualify(module_name, source)]
            chosen.setdefault(t.name, t)
        elif parametrize.is_parametrized(module, "weight") or hasattr(module, "weight_v"):
            skipped.append(module_name)
    order = {t.name: i for i, t in enumerate(by_alias.values())}
    if skipped:
        rank_zero_warn(
            f"Pruning leaves out {skipped}: a parametrization computes their weight, and zeros of its input tensor "
            "are not known to stay zeros of the weight. If they do, name the input tensor in `parameters` "
            f"(e.g. '{skipped[0]}.parametrizations.weight.original')."
        )
    return sorted(chosen.values(), key=lambda t: order[t.name]), skipped


def select_parameters(
    model: nn.Module,
    parameters: Sequence[ParameterSpec] | None = None,
    sparsity: SparsitySpec = None,
) -> list[PruningTarget]:
    """Resolve a selection of tensors, each with its own final target when ``sparsity`` is per layer.

    Args:
        model: the module whose parameters are named (qualified names are relative to it).
        parameters: qualified names (any alias of a shared tensor), glob patterns over them
            (``"model.fc*.weight"``) or ``(module, "weight")`` pairs. ``None``: the ``weight`` of every
            ``nn.Conv*d`` and ``nn.Linear`` (through a weight-norm or spectral-norm parametrization: the tensor
            it scales; or, with a ``sparsity`` mapping, what its keys match).
        sparsity: a single target for every tensor, or a mapping whose keys are module types
            (``nn.Conv2d``), module type names (``"Conv2d"``) or glob patterns over qualified parameter or
            module names (``"model.fc*"``). A tensor takes the value of the *first* key that matches it.
            With ``parameters=None``, the candidates are the default ones that some key matches (list
            biases in ``parameters`` to prune them). Patterns follow :mod:`fnmatch` (``*`` spans dots).

    Returns:
        The chosen tensors, in the model's order, each at most once.

    Raises:
        ValueError: for a name, pattern or key that matches nothing, a tensor that is not floating point,
            a target outside [0, 1), a tensor that no mapping key covers, or an empty selection.
    """
    skipped: list[str] = []
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("`sparsity` mapping is empty; give at least one key (a module type or a name pattern).")
        for key, value in sparsity.items():
            if not isinstance(key, (type, str)):
                raise ValueError(f"`sparsity` keys must be module types or name patterns, got {key!r}.")
            check_fraction(f"sparsity[{getattr(key, '__name__', key)!r}]", value)
        if parameters is None:
            candidates, skipped = _default_candidates(model)
            candidates = [t for t in candidates if any(_key_matches(k, model, t) for k in sparsity)]
        else:
            candidates = _resolve_specs(model, parameters)
        targets = []
        used: set[int] = set()
        for t in candidates:
            for i, (key, value) in enumerate(sparsity.items()):
                if _key_matches(key, model, t):
                    used.add(i)
                    targets.append(t.with_sparsity(float(value)))
                    break
            else:
                raise ValueError(f"`parameters` entry {t.name!r} matches no key of the `sparsity` mapping.")
        for i, key in enumerate(sparsity):
            if i not in used:
                label = key.__name__ if isinstance(key, type) else repr(key)
                raise ValueError(f"`sparsity` key {label} matches no chosen parameter of the model.")
    else:
        value = None if sparsity is None else check_fraction("sparsity", sparsity)
        if parameters is None:
            candidates, skipped = _default_candidates(model)
        else:
            candidates = _resolve_specs(model, parameters)
        targets = [t.with_sparsity(value) for t in candidates]

    if not targets:
        why = f" ({skipped} were left out: see the warning above)" if skipped else ""
        raise ValueError(
            "The selection is empty: `parameters` (default: the weights of every nn.Conv*d and nn.Linear) "
            f"chose no tensor of the model{why}."
        )
    for t in targets:
        if not t.tensor.is_floating_point():
            raise ValueError(
                f"`parameters`: {t.name!r} is a {t.tensor.dtype} tensor; only floating tensors can be pruned."
            )
    return targets


def shard_offset(tensor: Tensor) -> int:
    """Where this process's part of ``tensor`` starts in its row-major flattening: 0 for a plain tensor; for a
    ``DTensor`` sharded on dim 0 (FSDP2), the first local row times the row size (FSDP2 splits rows as
    ``torch.chunk`` does)."""
    if not isinstance(tensor, DTensor):
        return 0
    mesh = tensor.device_mesh
    rows = tensor.shape[0]
    per_rank = -(-rows // mesh.size())
    first = min(mesh.get_local_rank() * per_rank, rows)
    return first * (tensor.numel() // max(rows, 1))


def local_view(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: the local shard of a ``DTensor`` (FSDP2), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
