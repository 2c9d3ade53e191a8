"""Which tensors are pruned, and to what target: resolving ``parameters`` and ``sparsity`` against a model.

Names are *qualified parameter names* relative to the module given (for a ``LightningModule`` that holds its
network as ``self.model``: ``"model.conv1.weight"``). A tensor that torch's pruning has reparametrized
(``weight_orig`` + ``weight_mask``) keeps its logical name (``weight``).

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

__all__ = [
    "ParameterSpec",
    "PruningTarget",
    "SparsityKey",
    "SparsitySpec",
    "iter_parameters",
    "select_parameters",
]

ParameterSpec = str | tuple[nn.Module, str]
SparsityKey = type | str
SparsitySpec = float | Mapping[SparsityKey, float] | None

_DEFAULT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class PruningTarget:
    """One tensor to prune: ``getattr(module, param)`` is its effective value.

    Attributes:
        name: qualified parameter name, e.g. ``"model.conv1.weight"``.
        module_name: qualified name of the owning module, e.g. ``"model.conv1"``.
        module: the owning module.
        param: the parameter's name in its module, e.g. ``"weight"``.
        sparsity: this tensor's final target (local scope), or ``None`` when the target is global or the
            method takes none.
    """

    name: str
    module_name: str
    module: nn.Module = field(compare=False, repr=False)
    param: str = "weight"
    sparsity: float | None = None

    @property
    def is_masked(self) -> bool:
        """Whether torch's pruning reparametrization is in place (``<param>_orig`` and ``<param>_mask``)."""
        return hasattr(self.module, self.param + "_mask") and self.param + "_orig" in self.module._parameters

    @property
    def original(self) -> Tensor:
        """The trainable tensor: ``<param>_orig`` when masked, else the parameter itself."""
        if self.is_masked:
            return self.module._parameters[self.param + "_orig"]
        return self.module._parameters[self.param]

    @property
    def mask(self) -> Tensor | None:
        """The current mask buffer, or ``None`` before the first pruning step."""
        return getattr(self.module, self.param + "_mask") if self.is_masked else None

    def effective(self) -> Tensor:
        """The weights as the model uses them: ``orig * mask`` (never torch's cached, possibly stale attribute)."""
        mask = self.mask
        return self.original if mask is None else self.original * mask


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def iter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(qualified name, module, param name)`` for every logical parameter, in model order.

    A reparametrized tensor is yielded once, under its logical name (``weight``, not ``weight_orig``).
    """
    for module_name, module in model.named_modules():
        for pname, value in module._parameters.items():
            if value is None:
                continue
            if pname.endswith("_orig") and hasattr(module, pname[: -len("_orig")] + "_mask"):
                pname = pname[: -len("_orig")]
            yield _qualify(module_name, pname), module, pname


def _key_matches(key: SparsityKey, qualname: str, module_name: str, module: nn.Module) -> bool:
    if isinstance(key, type):
        return isinstance(module, key)
    if fnmatch.fnmatchcase(qualname, key) or fnmatch.fnmatchcase(module_name, key):
        return True
    return not (_GLOB_CHARS & set(key)) and key in {c.__name__ for c in type(module).__mro__}


def _check_sparsity_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
    return float(value)


def _resolve_specs(model: nn.Module, parameters: Sequence[ParameterSpec]) -> list[tuple[str, nn.Module, str]]:
    all_params = list(iter_parameters(model))
    by_module = {id(m): n for n, m in model.named_modules()}
    chosen: dict[str, tuple[str, nn.Module, str]] = {}
    if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Sequence):
        raise ValueError(
            f"`parameters` must be a list of names, glob patterns or (module, name) pairs, got {parameters!r}."
        )
    for spec in parameters:
        if isinstance(spec, str):
            hits = [p for p in all_params if fnmatch.fnmatchcase(p[0], spec)]
            if not hits:
                some = ", ".join(p[0] for p in all_params[:6])
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
            hits = [p for p in all_params if p[0] == qual]
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
            chosen.setdefault(hit[0], hit)
    order = {p[0]: i for i, p in enumerate(all_params)}
    return sorted(chosen.values(), key=lambda p: order[p[0]])


def _default_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [p for p in iter_parameters(model) if p[2] == "weight" and isinstance(p[1], _DEFAULT_TYPES)]


def select_parameters(
    model: nn.Module,
    parameters: Sequence[ParameterSpec] | None = None,
    sparsity: SparsitySpec = None,
) -> list[PruningTarget]:
    """Resolve a selection of tensors, each with its own final target when ``sparsity`` is per layer.

    Args:
        model: the module whose parameters are named (qualified names are relative to it).
        parameters: qualified names, glob patterns over them (``"model.fc*.weight"``) or
            ``(module, "weight")`` pairs. ``None``: the ``weight`` of every ``nn.Conv*d`` and ``nn.Linear``
            (or, with a ``sparsity`` mapping, what its keys match).
        sparsity: a single target for every tensor, or a mapping whose keys are module types
            (``nn.Conv2d``), module type names (``"Conv2d"``) or glob patterns over qualified parameter or
            module names (``"model.fc*"``). A tensor takes the value of the *first* key that matches it.
            With ``parameters=None``, the candidates are the ``weight`` tensors that some key matches (list
            biases in ``parameters`` to prune them). Patterns follow :mod:`fnmatch` (``*`` spans dots).

    Returns:
        The chosen tensors, in the model's order, each at most once.

    Raises:
        ValueError: for a name, pattern or key that matches nothing, a tensor that is not floating point,
            a target outside [0, 1), a tensor that no mapping key covers, or an empty selection.
    """
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("`sparsity` mapping is empty; give at least one key (a module type or a name pattern).")
        for key, value in sparsity.items():
            if not isinstance(key, (type, str)):
                raise ValueError(f"`sparsity` keys must be module types or name patterns, got {key!r}.")
            _check_sparsity_value(f"sparsity[{getattr(key, '__name__', key)!r}]", value)
        if parameters is None:
            candidates = [
                p
                for p in iter_parameters(model)
                if p[2] == "weight" and any(_key_matches(k, p[0], p[0].rpartition(".")[0], p[1]) for k in sparsity)
            ]
        else:
            candidates = _resolve_specs(model, parameters)
        targets = []
        used: set[int] = set()
        for qual, module, pname in candidates:
            module_name = qual.rpartition(".")[0]
            for i, (key, value) in enumerate(sparsity.items()):
                if _key_matches(key, qual, module_name, module):
                    used.add(i)
                    targets.append(PruningTarget(qual, module_name, module, pname, float(value)))
                    break
            else:
                raise ValueError(f"`parameters` entry {qual!r} matches no key of the `sparsity` mapping.")
        for i, key in enumerate(sparsity):
            if i not in used:
                label = key.__name__ if isinstance(key, type) else repr(key)
                raise ValueError(f"`sparsity` key {label} matches no chosen parameter of the model.")
    else:
        if sparsity is not None:
            sparsity = _check_sparsity_value("sparsity", sparsity)
        candidates = _default_candidates(model) if parameters is None else _resolve_specs(model, parameters)
        targets = [PruningTarget(q, q.rpartition(".")[0], m, p, sparsity) for q, m, p in candidates]

    if not targets:
        raise ValueError(
            "The selection is empty: `parameters` (default: the weights of every nn.Conv*d and nn.Linear) "
            "chose no tensor of the model."
        )
    for t in targets:
        value = t.original
        if not value.is_floating_point():
            raise ValueError(
                f"`parameters`: {t.name!r} is a {value.dtype} tensor; only floating tensors can be pruned."
            )
    return targets
