"""Torch's pruning reparametrization as an adapter over the mask store, and version 0.1 checkpoints.

The package keeps masks beside plain parameters (:class:`~lightning_prune.store.MaskStore`). Torch's own
form, ``<name>_orig`` (the trainable tensor), a ``<name>_mask`` buffer and a forward pre-hook that computes
``<name> = orig * mask``, appears in three places only, all handled here:

* ``mask_mode="hook"``: :func:`install` puts the store's masks on the model in torch's form between pruning
  steps, :func:`remove` takes them off (``prune.remove``: zeros baked in, same parameter objects);
* checkpoints written in torch's form (version 0.1 of this package, or ``mask_mode="hook"`` before it
  converts them) are turned into the model's own keys by :func:`upgrade_state_dict`;
  :func:`convert_on_load` makes every ``load_state_dict`` of a module do that and keeps the masks aside;
* a model pruned with ``torch.nn.utils.prune`` before training: :func:`take_over` hands its masks to the store,
  and :func:`plain` lets any code read such a model as plain parameters for a while (reports, sensitivity
  analysis), putting torch's form back exactly as it was.

Everything else in the package sees plain parameters: a :class:`~lightning_prune.selection.PruningTarget` is a
handle on a parameter, never on ``<name>_orig``.

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
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.selection import PruningTarget
from lightning_prune.store import MaskStore, apply_mask_

__all__ = [
    "TorchFormMasking",
    "check_hook_mode",
    "convert_on_load",
    "install",
    "loaded_masks",
    "make_permanent",
    "plain",
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


def _torch_masked(module: nn.Module, name: str) -> bool:
    """Whether torch's pruning reparametrization (``<name>_orig`` + ``<name>_mask``) is on ``module``."""
    return hasattr(module, name + _MASK) and isinstance(getattr(module, name + _ORIG, None), nn.Parameter)


def _masked_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, name)`` of every tensor of ``model`` in torch's form, each module once."""
    out = []
    for module_name, module in model.named_modules():
        for pname in list(module._parameters):
            if pname.endswith(_ORIG) and _torch_masked(module, pname[: -len(_ORIG)]):
                name = pname[: -len(_ORIG)]
                out.append((f"{module_name}.{name}" if module_name else name, module, name))
    return out


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
            _remove_one(t.module, t.param)
            done.append(t.name)
    return done


def _reorder(module: nn.Module, order: list[str]) -> None:
    """Put ``module``'s own parameters in ``order`` (torch offers no public way to reorder them)."""
    params = module._parameters
    keys = [k for k in order if k in params] + [k for k in params if k not in order]
    if keys != list(params):
        items = [(k, params[k]) for k in keys]
        params.clear()
        params.update(items)


def _remove_one(module: nn.Module, name: str) -> None:
    prune.remove(module, name)
    order = _ORDER.get(module)
    if order is not None and not any(_torch_masked(module, n) for n in order):
        _reorder(module, _ORDER.pop(module))


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
    done = []
    for qual, module, name in _masked_tensors(model):
        _remove_one(module, name)
        done.append(qual)
    return done


def take_over(model: nn.Module) -> dict[str, Tensor]:
    """Remove torch's reparametrization from ``model`` and return its masks (``uint8``) by qualified name."""
    masks = {}
    for qual, module, name in _masked_tensors(model):
        masks[qual] = getattr(module, name + _MASK).detach().ne(0).to(torch.uint8)
        _remove_one(module, name)
    return masks


@contextmanager
def plain(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the block, ``model`` holds plain parameters (``<name> = orig * mask``, zeros baked in) wherever torch's
    pruning had put its form; afterwards torch's form is back exactly as it was: the same parameter objects, the
    same ``<name>_orig`` values (also at masked entries), masks, parameter order and cached ``<name>``. Yields the
    masks by qualified name (empty for a plain model, which is left as it is).

    Example::

        >>> import torch.nn as nn, torch.nn.utils.prune as prune
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> _ = prune.l1_unstructured(net[0], "weight", amount=6)
        >>> with plain(net) as masks:
        ...     sorted(net.state_dict()), int((net[0].weight == 0).sum()), list(masks)
        (['0.bias', '0.weight'], 6, ['0.weight'])
        >>> sorted(net.state_dict())
        ['0.bias', '0.weight_mask', '0.weight_orig']
    """
    saved = []
    orders: dict[Any, Any] = {}
    for qual, module, name in _masked_tensors(model):
        orig = getattr(module, name + _ORIG)
        saved.append((qual, module, name, getattr(module, name + _MASK).detach().clone(), orig.detach().clone()))
        orders.setdefault(module, list(module._parameters))
        prune.remove(module, name)
    try:
        yield {qual: mask.ne(0).to(torch.uint8) for qual, _, _, mask, _ in saved}
    finally:
        for _, module, name, mask, values in reversed(saved):
            param = module._parameters[name]
            prune.custom_from_mask(module, name, mask)
            with torch.no_grad():
                param.copy_(values)
                setattr(module, name, param * mask)
        for module, order in orders.items():
            _reorder(module, order)


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
                plain[name] = apply_mask_(value.clone(), mask).to(value.dtype)
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
    if pop:
        return _LOADED.pop(model) if model in _LOADED else {}
    return dict(_LOADED.get(model, {}))


class TorchFormMasking:
    """``mask_mode="hook"``: between pruning steps the store's masks are on the model in torch's form
    (``<name>_orig``, ``<name>_mask``, a forward pre-hook), for code that expects it; the steps themselves see plain
    parameters. The counterpart of :class:`lightning_prune.store.StoreMasking`, with the same methods."""

    mode = "hook"

    def check(self, model: nn.Module, targets: Iterable[PruningTarget]) -> None:
        check_hook_mode(model, targets)

    def start(self, store: MaskStore, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        install(store.items())

    def before_optimizer_step(self, store: MaskStore, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: torch's form multiplies by the mask in every forward pass, so pruned entries get no gradient."""

    def before_prune(self, store: MaskStore) -> None:
        remove(t for t, _ in store.items())

    def after_prune(self, store: MaskStore) -> None:
        install(store.items())

    def end(self, store: MaskStore) -> None:
        remove(t for t, _ in store.items())

    def keep(self, store: MaskStore) -> None:
        install(store.items())

    def checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # the model's own keys, as without torch's form
            checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])[0]

    @contextmanager
    def plain(self, store: MaskStore) -> Iterator[None]:
        self.before_prune(store)
        try:
            yield
        finally:
            self.after_prune(store)
