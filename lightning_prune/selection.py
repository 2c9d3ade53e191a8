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
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

from torch import nn
from torch.nn.utils import parametrize

from lightning_prune._utils.checks import check_fraction
from lightning_prune._utils.lightning import rank_zero_warn
from lightning_prune.layers import Layout, is_embedding, is_router, matrix_layer

__all__ = [
    "ParameterSpec",
    "PlannedSparsity",
    "PruningTarget",
    "SelectionSummary",
    "SparsityKey",
    "SparsitySpec",
    "describe_selection",
    "iter_parameters",
    "matrix_weight_names",
    "planned_targets",
    "select_parameters",
]

ParameterSpec = str | tuple[nn.Module, str]
SparsityKey = type | str


@runtime_checkable
class PlannedSparsity(Protocol):
    """Per-tensor targets that carry their own account, such as :class:`~lightning_prune.inference.SpeedPlan`:
    taken wherever a per-tensor ``sparsity`` mapping is; the callback prints ``str(plan)`` when ``fit`` starts."""

    @property
    def sparsity(self) -> Mapping[str, float]: ...


SparsitySpec = float | Mapping[SparsityKey, float] | PlannedSparsity | None


PlainSparsity = float | dict[SparsityKey, float] | None


def planned_targets(
    sparsity: SparsitySpec, model: nn.Module | None = None
) -> tuple[PlainSparsity, PlannedSparsity | None]:
    """``(sparsity, plan)``: a plan's per-tensor mapping and the plan, or the argument (a mapping as a ``dict``) and
    ``None``.

    With ``model``, the plan's names are taken relative to it: a plan made on a submodule (``plan_speedup(net,
    ...)`` for the ``net`` that a LightningModule holds as ``self.model``) is moved under that submodule's name, the
    one submodule in which every planned name is a parameter.

    Example::

        >>> from types import SimpleNamespace
        >>> plan = SimpleNamespace(sparsity={"0.weight": 0.9})
        >>> planned_targets(plan)[0]
        {'0.weight': 0.9}
        >>> planned_targets(plan, nn.ModuleDict({"model": nn.Sequential(nn.Linear(2, 2))}))[0]
        {'model.0.weight': 0.9}
        >>> planned_targets(0.5)
        (0.5, None)
    """
    if isinstance(sparsity, PlannedSparsity) and not isinstance(sparsity, Mapping):
        prefix = "" if model is None else _plan_root(model, list(sparsity.sparsity))
        targets: dict[SparsityKey, float] = {prefix + name: value for name, value in sparsity.sparsity.items()}
        return targets, sparsity
    return (dict(sparsity) if isinstance(sparsity, Mapping) else cast(PlainSparsity, sparsity)), None


def _plan_root(model: nn.Module, names: Sequence[str]) -> str:
    """``""`` where every one of ``names`` is a parameter of ``model``, else ``"<submodule>."`` for the one
    submodule where each is; an error naming the candidates where none or several are."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if all(n in params for n in names):
        return ""
    roots = [f"{m}." for m, _ in model.named_modules() if m and all(f"{m}.{n}" in params for n in names)]
    if len(roots) == 1:
        return roots[0]
    missing = next(n for n in names if n not in params)
    where = f"under each of {[r[:-1] for r in roots]}" if roots else "under no submodule either"
    raise ValueError(
        f"The plan's parameter {missing!r} is not a parameter of the model, and its names are {where}: plan on the "
        "model you train (or on the one submodule that holds every planned layer)."
    )


_GLOB_CHARS = set("*?[")


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
        layout: ``"out_in"`` or ``"in_out"`` when the tensor is a matrix layer's weight (see
            :mod:`lightning_prune.layers`), else ``None``.
    """

    name: str
    module_name: str
    module: nn.Module = field(compare=False, repr=False)
    param: str = "weight"
    sparsity: float | None = None
    aliases: tuple[str, ...] = field(default=(), compare=False, repr=False)
    layout: Layout | None = field(default=None, compare=False, repr=False)

    @property
    def tensor(self) -> nn.Parameter:
        """The parameter (``module.get_parameter(param)``: the same tensor the model computes with)."""
        return self.module.get_parameter(self.param)

    def with_sparsity(self, sparsity: float | None) -> PruningTarget:
        return PruningTarget(self.name, self.module_name, self.module, self.param, sparsity, self.aliases, self.layout)


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _layout(model: nn.Module, modules: Mapping[str, nn.Module], qual: str) -> Layout | None:
    """The layout of the tensor named ``qual`` when it is a matrix layer's weight, directly or as the tensor that a
    weight-norm or spectral-norm parametrization scales."""
    module_name, _, pname = qual.rpartition(".")
    module = modules[module_name]
    entry = matrix_layer(module, pname)
    if entry is not None:
        return entry.layout
    owner_name, sep, rest = module_name.rpartition(".parametrizations.")
    if not sep and module_name.startswith("parametrizations."):
        owner_name, rest = "", module_name[len("parametrizations.") :]
    if rest and "." not in rest:  # <owner>.parametrizations.<weight>.original*
        owner = modules[owner_name]
        if _zero_keeping_source(owner, rest) == f"parametrizations.{rest}.{pname}":
            entry = matrix_layer(owner, rest)
    elif pname.endswith("_v") and _zero_keeping_source(module, pname[:-2]) == pname:  # older weight_norm
        entry = matrix_layer(module, pname[:-2])
    return None if entry is None else entry.layout


def _tensors(model: nn.Module) -> list[tuple[list[str], nn.Module, str, Layout | None]]:
    """Every distinct parameter once: ``([qualified names], owning module of the first name, local name,
    layout)``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, tuple[list[str], nn.Module, str, Layout | None]] = {}
    for qual, tensor in model.named_parameters(remove_duplicate=False):
        module_name, _, pname = qual.rpartition(".")
        module = modules[module_name]
        layout = _layout(model, modules, qual)
        entry = by_id.get(id(tensor))
        if entry is None:
            by_id[id(tensor)] = ([qual], module, pname, layout)
        else:
            if qual not in entry[0]:
                entry[0].append(qual)
            if entry[3] is None and layout is not None:  # a tied tensor: the layout of a matrix layer among its owners
                by_id[id(tensor)] = (entry[0], entry[1], entry[2], layout)
    return list(by_id.values())


def iter_parameters(model: nn.Module) -> Iterator[PruningTarget]:
    """Every distinct parameter of ``model`` once, in model order, as a :class:`PruningTarget` without a target.

    A tensor shared by several modules is yielded once, with all its names in ``aliases``. (A model in torch's
    pruning form, ``weight_orig`` and ``weight_mask``, is read as it is: see :func:`lightning_prune.reparam.plain`.)

    Example::

        >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> [(t.aliases, t.layout) for t in iter_parameters(nn.ModuleDict({"emb": emb, "head": head}))]
        [(('emb.weight', 'head.weight'), 'out_in')]
    """
    for names, module, pname, layout in _tensors(model):
        yield PruningTarget(names[0], names[0].rpartition(".")[0], module, pname, None, tuple(names), layout)


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


def _zero_keeping_source(module: nn.Module, pname: str = "weight") -> str | None:
    """For a layer whose ``pname`` a parametrization computes: the local name (relative to ``module``) of the
    tensor whose zeros are zeros of the weight, or ``None`` when no such tensor is known."""
    if parametrize.is_parametrized(module, pname):
        plist = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[pname])
        kinds = [type(p).__name__ for p in plist]
        if kinds == ["_WeightNorm"]:
            return f"parametrizations.{pname}.original1"
        if kinds == ["_SpectralNorm"]:
            return f"parametrizations.{pname}.original"
        return None
    own = dict(module.named_parameters(recurse=False))
    if isinstance(own.get(pname + "_v"), nn.Parameter) and pname not in own:
        return pname + "_v"  # torch.nn.utils.weight_norm (the older hook-based form)
    return None


def _computed(module: nn.Module, pname: str) -> bool:
    """Whether a parametrization (or the older weight norm) computes ``pname`` of ``module``."""
    return parametrize.is_parametrized(module, pname) or (
        pname not in module._parameters and isinstance(module._parameters.get(pname + "_v"), nn.Parameter)
    )


def matrix_weight_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s own matrix weights (see :mod:`lightning_prune.layers`), those that a
    parametrization computes included."""
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += list(cast(nn.ModuleDict, module.parametrizations).keys())
    names += [n[:-2] for n in names if n.endswith("_v") and _computed(module, n[:-2])]
    return [n for n in dict.fromkeys(names) if matrix_layer(module, n) is not None]


def _embedding_tie(model: nn.Module, target: PruningTarget) -> str | None:
    """``"embedding"`` (with the names it is tied to) when an alias of ``target`` is an embedding table."""
    owners = [(a, a.rpartition(".")[0], a.rpartition(".")[2]) for a in target.aliases]
    tables = [a for a, m, p in owners if is_embedding(model.get_submodule(m), p)]
    if not tables:
        return None
    others = [a for a in target.aliases if a != target.name]
    return "embedding" + (f", tied to {', '.join(others)}" if others else "")


def _default_candidates(model: nn.Module) -> tuple[list[PruningTarget], dict[str, str], list[str]]:
    """Every matrix weight of the model (through its parametrization where that keeps zeros), ``{name: reason}``
    of the matrix-like tensors left out (embedding tables and tensors tied to them, the tensors of layers whose
    weight an unknown parametrization computes), and the names of those layers."""
    everything = list(iter_parameters(model))
    by_alias = {a: t for t in everything for a in t.aliases}
    chosen: dict[str, PruningTarget] = {}
    left_out: dict[str, str] = {}
    parametrized: list[str] = []
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        parent = modules.get(module_name.rpartition(".")[0]) if module_name else None
        if is_router(module_name, module, parent):
            for pname, tensor in module.named_parameters(recurse=False):
                if tensor.dim() >= 2:
                    left_out.setdefault(by_alias[_qualify(module_name, pname)].name, "router")
            continue
        for pname in matrix_weight_names(module):
            if not _computed(module, pname):
                t = by_alias[_qualify(module_name, pname)]
                chosen.setdefault(t.name, t)
                continue
            source = _zero_keeping_source(module, pname)
            if source is not None:
                t = by_alias[_qualify(module_name, source)]
                chosen.setdefault(t.name, t)
                continue
            parametrized.append(module_name)
            inputs = _qualify(module_name, f"parametrizations.{pname}.")
            for t in everything:
                if t.name.startswith(inputs):
                    left_out[t.name] = f"a parametrization computes {_qualify(module_name, pname)}"
    for t in everything:
        why = _embedding_tie(model, t)
        if why is not None:
            chosen.pop(t.name, None)
            left_out[t.name] = why
    order = {t.name: i for i, t in enumerate(everything)}
    return sorted(chosen.values(), key=lambda t: order[t.name]), left_out, parametrized


def _warn_parametrized(parametrized: Sequence[str]) -> None:
    if parametrized:
        rank_zero_warn(
            f"Pruning leaves out {list(parametrized)}: a parametrization computes their weight, and zeros of its "
            "input tensor are not known to stay zeros of the weight. If they do, name the input tensor in "
            f"`parameters` (e.g. '{parametrized[0]}.parametrizations.weight.original')."
        )


def select_parameters(
    model: nn.Module,
    parameters: Sequence[ParameterSpec] | None = None,
    sparsity: SparsitySpec = None,
    exclude: Sequence[str] = (),
) -> list[PruningTarget]:
    """Resolve a selection of tensors, each with its own final target when ``sparsity`` is per layer.

    Args:
        model: the module whose parameters are named (qualified names are relative to it).
        parameters: qualified names (any alias of a shared tensor), glob patterns over them
            (``"model.fc*.weight"``) or ``(module, "weight")`` pairs. ``None``: every matrix weight of the model
            (see :mod:`lightning_prune.layers`: ``nn.Linear``, ``nn.Conv*d``, Hugging Face's ``Conv1D``,
            attention's input projections, recurrent layers' weights, your registered layers; through a
            weight-norm or spectral-norm parametrization, the tensor it scales), leaving out embedding tables and
            every tensor tied to one; with a ``sparsity`` mapping, those that its keys match.
        sparsity: a single target for every tensor, or a mapping whose keys are module types
            (``nn.Conv2d``), module type names (``"Conv2d"``) or glob patterns over qualified parameter or
            module names (``"model.fc*"``). A tensor takes the value of the *first* key that matches it.
            With ``parameters=None``, the candidates are the default ones that some key matches (list
            biases in ``parameters`` to prune them). Patterns follow :mod:`fnmatch` (``*`` spans dots).
        exclude: qualified names or glob patterns (over any alias of a tensor, or its module's name) taken out
            of the selection after ``parameters`` (or the default) is resolved: ``["model.conv1.*", "lm_head.*"]``
            keeps a first layer or an untied head dense. Each entry must match a chosen tensor.

    Returns:
        The chosen tensors, in the model's order, each at most once.

    Raises:
        ValueError: for a name, pattern or key that matches nothing, a tensor that is not floating point,
            a target outside [0, 1), a tensor that no mapping key covers, an ``exclude`` entry that matches no
            chosen tensor, or an empty selection.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> [t.name for t in select_parameters(net, exclude=["0.*", "3"])]
        ['2.weight']
    """
    exclude = check_exclude(exclude)
    left_out: dict[str, str] = {}
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("`sparsity` mapping is empty; give at least one key (a module type or a name pattern).")
        for key, given in sparsity.items():
            if not isinstance(key, (type, str)):
                raise ValueError(f"`sparsity` keys must be module types or name patterns, got {key!r}.")
            check_fraction(f"sparsity[{getattr(key, '__name__', key)!r}]", given)
        if parameters is None:
            candidates, left_out, parametrized = _default_candidates(model)
            _warn_parametrized(parametrized)
            candidates = [t for t in candidates if any(_key_matches(k, model, t) for k in sparsity)]
        else:
            candidates = _resolve_specs(model, parameters)
        targets = []
        used: set[int] = set()
        for t in candidates:
            for i, (key, share) in enumerate(sparsity.items()):
                if _key_matches(key, model, t):
                    used.add(i)
                    targets.append(t.with_sparsity(float(share)))
                    break
            else:
                raise ValueError(f"`parameters` entry {t.name!r} matches no key of the `sparsity` mapping.")
        for i, key in enumerate(sparsity):
            if i not in used:
                label = key.__name__ if isinstance(key, type) else repr(key)
                hint = ""
                if parameters is None and any(
                    _key_matches(key, model, t) for t in iter_parameters(model) if t.name in left_out
                ):
                    hint = " (the default selection leaves embeddings out: name them in `parameters` to prune them)"
                raise ValueError(f"`sparsity` key {label} matches no chosen parameter of the model{hint}.")
    else:
        value: float | None = None if sparsity is None else check_fraction("sparsity", sparsity)
        if parameters is None:
            candidates, left_out, parametrized = _default_candidates(model)
            _warn_parametrized(parametrized)
        else:
            candidates = _resolve_specs(model, parameters)
        targets = [t.with_sparsity(value) for t in candidates]
    targets = _excluded(targets, exclude)

    if not targets:
        why = f" (left out: {_listed(left_out)})" if left_out else ""
        raise ValueError(
            "The selection is empty: `parameters` (default: every matrix weight, see lightning_prune.layers) "
            f"chose no tensor of the model{why}."
        )
    for t in targets:
        if not t.tensor.is_floating_point():
            raise ValueError(
                f"`parameters`: {t.name!r} is a {t.tensor.dtype} tensor; only floating tensors can be pruned."
            )
    return targets


def check_disjoint(mine: Sequence[str], others: Sequence[str]) -> None:
    """Refuse two pruning callbacks of one Trainer that both prune a tensor (``ValueError`` naming them)."""
    shared = sorted(set(mine) & set(others))
    if shared:
        raise ValueError(
            f"Two PruningScheduleCallbacks in one Trainer both prune {shared}; give them disjoint `parameters`."
        )


def check_exclude(exclude: object) -> tuple[str, ...]:
    """``exclude`` as a tuple of names or patterns; a ``ValueError`` for anything else."""
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence):
        raise ValueError(f"`exclude` must be a list of names or glob patterns, got {exclude!r}.")
    for entry in exclude:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"`exclude` entries must be names or glob patterns, got {entry!r}.")
    return tuple(exclude)


def _excluded(targets: list[PruningTarget], exclude: Sequence[str]) -> list[PruningTarget]:
    """``targets`` without those an ``exclude`` entry matches (a qualified name of the tensor or of its module)."""

    def hit(pattern: str, t: PruningTarget) -> bool:
        return any(fnmatch.fnmatchcase(n, pattern) for a in t.aliases for n in (a, a.rpartition(".")[0]))

    for pattern in exclude:
        if not any(hit(pattern, t) for t in targets):
            chosen = ", ".join(t.name for t in targets[:6])
            raise ValueError(f"`exclude` entry {pattern!r} matches no chosen tensor (chosen: {chosen}, ...).")
    return [t for t in targets if not any(hit(p, t) for p in exclude)]


def _listed(reasons: Mapping[str, str]) -> str:
    """Every name with its reason, names that differ only in layer indices grouped as one pattern
    (``model.layers.*.mlp.gate.weight (router, 4 tensors)``)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, why in reasons.items():
        groups.setdefault((re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name), why), []).append(name)
    return ", ".join(
        f"{pattern} ({why}, {len(names)} tensors)" if len(names) > 1 else f"{names[0]} ({why})"
        for (pattern, why), names in groups.items()
    )


_POSITIONAL = re.compile(r"(^|[._])(pos|position|positional|cls|class|dist)(_|\.|$)|(pos|position)_?emb|cls_token")


def _why_left_out(model: nn.Module, t: PruningTarget, defaults: Mapping[str, str]) -> str:
    why = _embedding_tie(model, t) or defaults.get(t.name)
    if why is not None:
        return why
    if t.layout is not None:
        return "not chosen (`parameters` / `exclude`)"
    if _POSITIONAL.search(t.name):
        return "positional"
    if t.name.endswith("bias"):
        return "bias, not a matrix"
    return "not a matrix layer's weight"


def _amount(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} M"
    if n >= 10_000:
        return f"{n / 1e3:.1f} k"
    return str(n)


@dataclass(frozen=True)
class SelectionSummary:
    """What a selection takes of a model and what it leaves out; ``str(summary)`` is one line.

    Attributes:
        chosen: qualified names of the chosen tensors.
        chosen_numel: their entries.
        model_numel: every parameter entry of the model (biases and normalization included, tied tensors once).
        left_out: ``{name: reason}`` of the model's matrix-like tensors (two or more dimensions) that are not
            chosen, each with its reason: ``"embedding"`` (and ``"embedding, tied to ..."`` for the tensors tied to
            one), ``"router"`` (a Mixture-of-Experts router), layers whose weight an unknown parametrization
            computes, ``"not chosen (`parameters` / `exclude`)"`` for matrix weights left out by the arguments,
            ``"positional"`` (positional embeddings, class tokens) and ``"not a matrix layer's weight"`` (layers of
            your own: see :func:`~lightning_prune.layers.register_matrix_layer`). ``str()`` lists every one of
            them, names that differ only in their layer index grouped as one pattern.
    """

    chosen: tuple[str, ...]
    chosen_numel: int
    model_numel: int
    left_out: Mapping[str, str]

    def __str__(self) -> str:
        share = self.chosen_numel / self.model_numel if self.model_numel else 0.0
        line = (
            f"pruning {len(self.chosen)} tensor{'s' if len(self.chosen) != 1 else ''}, {_amount(self.chosen_numel)} "
            f"of the model's {_amount(self.model_numel)} parameters ({share:.0%})"
        )
        return line + (f"; left out: {_listed(self.left_out)}" if self.left_out else "")


def describe_selection(model: nn.Module, targets: Sequence[PruningTarget]) -> SelectionSummary:
    """Summarize a selection (from :func:`select_parameters`) against the whole model.

    Example::

        >>> lm = nn.ModuleDict({"emb": nn.Embedding(100, 8), "mlp": nn.Linear(8, 8), "head": nn.Linear(8, 100)})
        >>> lm["head"].weight = lm["emb"].weight
        >>> summary = describe_selection(lm, select_parameters(lm))
        >>> summary.chosen, dict(summary.left_out)
        (('mlp.weight',), {'emb.weight': 'embedding, tied to head.weight'})
        >>> print(summary)
        pruning 1 tensor, 64 of the model's 972 parameters (7%); left out: emb.weight (embedding, tied to head.weight)
    """
    chosen = {t.name for t in targets}
    _, defaults_left_out, _ = _default_candidates(model)
    left_out: dict[str, str] = {}
    numel = 0
    for t in iter_parameters(model):
        numel += t.tensor.numel()
        if t.name in chosen or t.tensor.dim() < 2:
            continue
        left_out[t.name] = _why_left_out(model, t, defaults_left_out)
    return SelectionSummary(
        chosen=tuple(t.name for t in targets),
        chosen_numel=sum(t.tensor.numel() for t in targets),
        model_numel=numel,
        left_out=left_out,
    )
