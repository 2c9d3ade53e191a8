"""Torch's pruning reparametrization as an adapter over the mask store, and version 0.1 checkpoints.

The package keeps masks beside plain parameters (:class:`~lightning_prune.store.MaskStore`). Torch's own
form, ``<name>_orig`` (the trainable tensor), a ``<name>_mask`` buffer and a forward pre-hook that computes
``<name> = orig * mask``, appears in three places only, all handled here:

* ``mask_mode="hook"``: :func:`install` puts the store's masks on the model in torch's form between pruning
  steps, :func:`remove` takes them off (``prune.remove``: zeros baked in, same parameter objects);
* checkpoints written in torch's form (version 0.1 of this package, or ``mask_mode="hook"`` before it
  converts them) are turned into the model's own keys by :func:`upgrade_state_dict`;
  :func:`convert_on_load` makes every ``load_state_dict`` of a module do that and keeps the masks aside;
* a model pruned with ``torch.nn.utils.prune`` before training: :func:`take_over` hands its masks to the store.

Example::

    >>> import torch, torch.nn as nn, torch.nn.utils.prune as prune
    >>> old = nn.Linear(4, 3)
    >>> _ = prune.l1_unstructured(old, "weight", amount=6)
    >>> plain, masks = upgrade_state_dict(old.state_dict())
    >>> list(plain), int((plain["weight"] == 0).sum()), int((masks["weight"] == 0).sum())
    (['bias', 'weight'], 6, 6)
    >>> nn.Linear(4, 3).load_state_dict(plain, strict=True)
    <All keys matched successfully>
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.selection import PruningTarget, _torch_masked, iter_parameters

__all__ = [
    "check_hook_mode",
    "convert_on_load",
    "install",
    "loaded_masks",
    "make_permanent",
    "refresh",
    "remove",
    "take_over",
    "upgrade_state_dict",
]

_ORIG, _MASK = "_orig", "_mask"
_LOADED: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()
_HOOKED: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()
# a module's parameter names in their order before `install`: `remove` puts them back in that order, so that
# `module.parameters()` (and an optimizer built from it later) sees the order the model was built with
_ORDER: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def install(items: Iterable[tuple[PruningTarget, Tensor]]) -> None:
    """Put each ``(target, mask)`` on its module in torch's form (the parameter becomes ``<name>_orig``, the
    same object, so optimizers keep their references)."""
    for target, mask in items:
        if not _torch_masked(target.module, target.param):
            _ORDER.setdefault(target.module, [n for n, _ in target.module.named_parameters(recurse=False)])
            prune.custom_from_mask(target.module, target.param, mask)


def remove(targets: Iterable[PruningTarget]) -> list[str]:
    """``prune.remove`` every target in torch's form: plain parameters with the zeros baked in."""
    done = []
    for t in targets:
        if _torch_masked(t.module, t.param):
            prune.remove(t.module, t.param)
            done.append(t.name)
            order = _ORDER.get(t.module)
            if order is not None and not any(_torch_masked(t.module, n) for n in order):
                _reorder(t.module, _ORDER.pop(t.module))
    return done


def _reorder(module: nn.Module, order: list[str]) -> None:
    """Put ``module``'s own parameters in ``order`` (torch offers no public way to reorder them)."""
    params = module._parameters
    keys = [k for k in order if k in params] + [k for k in params if k not in order]
    if keys != list(params):
        items = [(k, params[k]) for k in keys]
        params.clear()
        params.update(items)


def refresh(target: PruningTarget) -> None:
    """Recompute torch's cached ``<name> = orig * mask`` attribute of a target in torch's form now (torch itself
    would only at the next forward), after its values changed in place."""
    if _torch_masked(target.module, target.param):
        with torch.no_grad():
            setattr(target.module, target.param, target.value())


def make_permanent(model: nn.Module) -> list[str]:
    """Take torch's pruning reparametrization off every tensor of ``model`` (``prune.remove``): plain
    parameters with the zeros baked in and the model's own ``state_dict`` keys. Returns the names.

    Example::

        >>> import torch.nn as nn, torch.nn.utils.prune as prune
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> _ = prune.random_unstructured(net[0], "weight", amount=0.5)
        >>> make_permanent(net), sorted(net.state_dict())
        (['0.weight'], ['0.bias', '0.weight'])
    """
    return remove(iter_parameters(model))


def take_over(model: nn.Module) -> dict[str, Tensor]:
    """Remove torch's reparametrization from ``model`` and return its masks (``uint8``) by qualified name."""
    masks = {}
    for t in list(iter_parameters(model)):
        if _torch_masked(t.module, t.param):
            masks[t.name] = getattr(t.module, t.param + _MASK).detach().ne(0).to(torch.uint8)
            prune.remove(t.module, t.param)
    return masks


def check_hook_mode(model: nn.Module, targets: Iterable[PruningTarget]) -> None:
    """Refuse, before training, what torch's reparametrization cannot mask: a weight that a module reads
    without calling its owner's ``forward`` (attention's ``out_proj``) and a tensor shared by several modules.

    Raises:
        ValueError: naming the tensor and pointing to the default ``mask_mode="inplace"``.
    """
    direct = {id(mha.out_proj): name for name, mha in model.named_modules() if isinstance(mha, nn.MultiheadAttention)}
    for t in targets:
        why = None
        if id(t.module) in direct:
            why = (
                f"nn.MultiheadAttention {direct[id(t.module)] or '(the model)'!r} reads it without calling "
                "`out_proj.forward`, so torch's forward pre-hook would never apply the mask"
            )
        elif len(t.aliases) > 1:
            why = f"it is shared as {list(t.aliases)}, and torch's reparametrization masks one module's view only"
        if why:
            raise ValueError(
                f"`mask_mode='hook'` cannot prune {t.name!r}: {why}. Use the default `mask_mode='inplace'` "
                "(plain parameters, masks kept aside), or leave the tensor out of `parameters`."
            )


def upgrade_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A ``state_dict`` in torch's pruning form (``<name>_orig`` + ``<name>_mask``, as version 0.1 saved it)
    with the model's own keys instead (``<name> = orig * mask``, in the place of ``<name>_orig``), and the
    masks (``uint8``) by their plain key. Other entries pass through unchanged."""
    plain: dict[str, Any] = {}
    masks: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_MASK) and key[: -len(_MASK)] + _ORIG in state_dict:
            continue
        if key.endswith(_ORIG) and key[: -len(_ORIG)] + _MASK in state_dict:
            name = key[: -len(_ORIG)]
            mask = state_dict[name + _MASK]
            with torch.no_grad():
                plain[name] = (value * mask).add_(0.0).to(value.dtype)
            masks[name] = mask.detach().ne(0).to(torch.uint8)
            continue
        plain[key] = value
    return plain, masks


def _upgrade_hook(
    module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    if not any(k.endswith(_ORIG) for k in state_dict):
        return
    plain, masks = upgrade_state_dict(state_dict)
    state_dict.clear()
    state_dict.update(plain)
    _LOADED.setdefault(module, {}).update({k[len(prefix) :]: m for k, m in masks.items() if k.startswith(prefix)})


def convert_on_load(model: nn.Module) -> RemovableHandle:
    """Make every ``model.load_state_dict(...)`` accept a ``state_dict`` in torch's pruning form (version 0.1
    checkpoints): it is converted to the model's own keys, and the masks are kept for :func:`loaded_masks`.

    The callback installs this on the ``LightningModule`` it trains, which covers ``trainer.fit``, ``validate``
    and ``test`` with a 0.1 ``ckpt_path``. Calling it again returns the same handle.

    Example::

        >>> import torch.nn as nn, torch.nn.utils.prune as prune
        >>> old = nn.Linear(3, 2)
        >>> _ = prune.l1_unstructured(old, "weight", amount=2)
        >>> fresh = nn.Linear(3, 2)
        >>> _ = convert_on_load(fresh)
        >>> fresh.load_state_dict(old.state_dict(), strict=True)
        <All keys matched successfully>
        >>> int((fresh.weight == 0).sum()), int((loaded_masks(fresh)["weight"] == 0).sum())
        (2, 2)
    """
    handle = _HOOKED.get(model)
    if handle is None:
        handle = _HOOKED[model] = model.register_load_state_dict_pre_hook(_upgrade_hook)
    return handle


def loaded_masks(model: nn.Module, pop: bool = False) -> dict[str, Tensor]:
    """The masks that :func:`convert_on_load` took from the last 0.1 ``state_dict`` loaded into ``model``."""
    return (_LOADED.pop(model, None) or {}) if pop else dict(_LOADED.get(model, {}))
