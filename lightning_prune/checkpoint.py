"""Loading checkpoints of pruned models, and keeping the parameter order that optimizer states rely on.

A checkpoint written while masks are in place holds ``<name>_orig`` and ``<name>_mask`` instead of
``<name>``. A freshly built model has plain ``<name>`` parameters, so ``load_state_dict(sd, strict=True)``
fails with missing and unexpected keys. :func:`restore_pruning` re-creates torch's reparametrization
wherever the state dict has masks, so that the strict load then succeeds; :func:`restore_pruning_on_load`
makes every ``load_state_dict`` of a module do that by itself (the callback installs it on the
``LightningModule`` it trains; call it in your ``__init__`` for ``LightningModule.load_from_checkpoint``).

Parameter order matters. An optimizer's state (momentum, Adam moments) is saved and restored by the
*position* of each parameter in the optimizer, and ``configure_optimizers`` builds that list from
``module.parameters()``. Torch's pruning deletes ``<name>`` and appends ``<name>_orig``, which moves the
tensor to the end of its module's ``_parameters``. The callback therefore puts ``<name>_orig`` back into
the slot ``<name>`` had (:func:`parameter_slots` / :func:`restore_slots`), and :func:`restore_pruning`
places re-created parameters in the order the state dict lists them, so a resumed run builds its
optimizer over the same tensors in the same order as the run that wrote the checkpoint.

Example::

    >>> import torch, torch.nn as nn, torch.nn.utils.prune as prune
    >>> pruned = nn.Sequential(nn.Linear(4, 3))
    >>> _ = prune.l1_unstructured(pruned[0], "weight", amount=6)
    >>> fresh = nn.Sequential(nn.Linear(4, 3))
    >>> restore_pruning(fresh, pruned.state_dict())
    ['0.weight']
    >>> fresh.load_state_dict(pruned.state_dict(), strict=True)
    <All keys matched successfully>
    >>> int((fresh[0].weight_orig * fresh[0].weight_mask == 0).sum())
    6
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch.nn.utils.prune as prune
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["parameter_slots", "restore_pruning", "restore_pruning_on_load", "restore_slots"]

_ORIG, _MASK = "_orig", "_mask"
_HOOKED: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def _is_masked(module: nn.Module, name: str) -> bool:
    return name + _ORIG in module._parameters and hasattr(module, name + _MASK)


def _logical(module: nn.Module, key: str) -> str:
    """``weight_orig`` -> ``weight`` when it is a pruning reparametrization, else the key itself."""
    if key.endswith(_ORIG) and _is_masked(module, key[: -len(_ORIG)]):
        return key[: -len(_ORIG)]
    return key


def parameter_slots(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, list[str]]]:
    """Record each module's parameter order, by logical name (``weight_orig`` counts as ``weight``)."""
    seen: set[int] = set()
    slots = []
    for module in modules:
        if id(module) not in seen:
            seen.add(id(module))
            slots.append((module, [_logical(module, k) for k in module._parameters]))
    return slots


def _reorder(module: nn.Module, order: list[str]) -> None:
    params = module._parameters
    keys = [k for k in order if k in params]
    keys += [k for k in params if k not in keys]
    if keys != list(params):
        items = [(k, params[k]) for k in keys]
        params.clear()
        params.update(items)


def restore_slots(slots: Iterable[tuple[nn.Module, list[str]]]) -> None:
    """Put every parameter back into the slot recorded by :func:`parameter_slots`.

    A parameter reparametrized since (``weight`` -> ``weight_orig``) or made permanent since
    (``weight_orig`` -> ``weight``) takes the slot of its logical name, so ``module.parameters()`` yields
    the same tensors in the same order as when the slots were recorded.
    """
    for module, order in slots:
        actual = {_logical(module, k): k for k in module._parameters}
        _reorder(module, [actual[name] for name in order if name in actual])


def _module_keys(state_dict: Mapping[str, Any], prefix: str) -> dict[str, list[str]]:
    """``{module path: [local keys in state-dict order]}`` for keys under ``prefix``."""
    out: dict[str, list[str]] = {}
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        path, _, local = key[len(prefix) :].rpartition(".")
        out.setdefault(path, []).append(local)
    return out


def restore_pruning(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """Re-create the pruning reparametrization that ``state_dict`` was saved with, so it loads strictly.

    Wherever ``state_dict`` holds ``<path>.<name>_orig`` and ``<path>.<name>_mask`` but the submodule at
    ``<path>`` has a plain parameter ``<name>``, the parameter becomes ``<name>_orig`` (the same tensor
    object) with an all-ones ``<name>_mask`` buffer and torch's forward pre-hook, exactly as
    ``torch.nn.utils.prune`` leaves a module; ``load_state_dict`` then fills in the saved values and mask.
    The module's parameters are put in the order the state dict lists them, the order of the model that
    saved it, so an optimizer state restored by position lands on the right tensors.

    Tensors that are already masked, or that the state dict holds as plain ``<name>`` (a checkpoint
    written after ``prune.remove``), are left as they are. Nothing is loaded here.

    Args:
        model: the module the state dict belongs to (a ``LightningModule`` or a plain ``nn.Module``).
        state_dict: e.g. ``torch.load(path)["state_dict"]`` for a Lightning checkpoint.
        prefix: a prefix of every key of ``model`` in ``state_dict`` (as in ``load_state_dict`` hooks).

    Returns:
        The qualified names (``"model.fc1.weight"``) whose reparametrization was re-created.

    Example::

        >>> import torch.nn as nn, torch.nn.utils.prune as prune
        >>> pruned = nn.Linear(3, 2)
        >>> _ = prune.random_unstructured(pruned, "bias", amount=1)
        >>> fresh = nn.Linear(3, 2)
        >>> restore_pruning(fresh, pruned.state_dict()), list(fresh.state_dict())
        (['bias'], ['weight', 'bias_orig', 'bias_mask'])
    """
    modules = dict(model.named_modules())
    restored = []
    for path, local in _module_keys(state_dict, prefix).items():
        module = modules.get(path)
        if module is None:
            continue
        names = [k[: -len(_MASK)] for k in local if k.endswith(_MASK) and k[: -len(_MASK)] + _ORIG in local]
        todo = [n for n in names if not _is_masked(module, n) and isinstance(module._parameters.get(n), nn.Parameter)]
        for name in todo:
            prune.identity(module, name)
            restored.append(f"{path}.{name}" if path else name)
        if todo:
            _reorder(module, local)
    return restored


def _load_hook(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
    restore_pruning(module, state_dict, prefix)


def _refresh_hook(module: nn.Module, incompatible_keys: Any) -> None:
    """After a load, recompute the ``<name>`` attributes that torch's pre-hook otherwise updates at forward."""
    for sub in module.modules():
        for key in list(sub._parameters):
            name = key[: -len(_ORIG)]
            if key.endswith(_ORIG) and _is_masked(sub, name):
                setattr(sub, name, sub._parameters[key] * getattr(sub, name + _MASK))


def restore_pruning_on_load(model: nn.Module) -> RemovableHandle:
    """Make every ``model.load_state_dict(...)`` re-create saved masks first (see :func:`restore_pruning`).

    Installs a ``load_state_dict`` pre-hook on ``model`` (once: calling again returns the same handle), and
    a post-hook that recomputes the masked ``<name>`` attributes from the loaded values right away (torch
    itself would only do so at the next forward).
    :class:`~lightning_prune.PruningScheduleCallback` installs it on the ``LightningModule`` it is used with,
    which covers ``trainer.fit``, ``validate`` and ``test`` with ``ckpt_path=...``.
    ``LightningModule.load_from_checkpoint`` builds a new instance without any callback, so call this at
    the end of your module's ``__init__`` for strict loading there.

    Example::

        >>> import torch, torch.nn as nn, torch.nn.utils.prune as prune
        >>> pruned = nn.Linear(3, 2)
        >>> _ = prune.l1_unstructured(pruned, "weight", amount=2)
        >>> fresh = nn.Linear(3, 2)
        >>> _ = restore_pruning_on_load(fresh)
        >>> fresh.load_state_dict(pruned.state_dict(), strict=True)
        <All keys matched successfully>
        >>> torch.equal(fresh.weight, pruned.weight_orig * pruned.weight_mask)
        True
    """
    handle = _HOOKED.get(model)
    if handle is None:
        handle = model.register_load_state_dict_pre_hook(_load_hook)
        model.register_load_state_dict_post_hook(_refresh_hook)
        _HOOKED[model] = handle
    return handle
