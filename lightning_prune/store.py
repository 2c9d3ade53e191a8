"""The masks of a pruning run, kept beside plain parameters: the one mask representation of the package.

A :class:`MaskStore` holds one ``uint8`` mask (1 = live, 0 = pruned) per pruned tensor, keyed by the tensor
itself (tied weights are one tensor, so one entry), while the model keeps its own plain parameters with the
pruned entries at zero. The model's ``state_dict`` therefore has the user's keys, and every module that reads
a weight directly (attention's ``out_proj``, a tied embedding, FSDP2's sharded parameters) reads the zeros.

Pruned entries stay zero around every optimizer step, whatever drives the optimizers (automatic or manual
optimization, several optimizers, gradient accumulation and clipping), as NVIDIA's ASP keeps them:

* gradients are multiplied by the masks after backward and before the step (the callback's
  ``on_before_optimizer_step``, before Lightning clips them, and an optimizer step pre-hook for a step taken
  outside Lightning's optimizer wrapper), so the optimizer and clipping see exactly the gradients torch's
  reparametrization gives;
* for optimizers whose update of an entry with zero gradient, zero weight and zero state is exactly zero
  (``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adamax``, ``NAdam``, ``RAdam``, ``Adadelta``,
  ``ASGD``: :data:`ZERO_KEEPING_OPTIMIZERS`), the optimizer's per-entry state (momentum, moments) is zeroed
  where entries are pruned, at each pruning step, and nothing more is needed after a step; for any other
  optimizer an optimizer step post-hook multiplies the weights by their masks after every step.

Methods decide masks; :meth:`MaskStore.set` narrows the kept masks (masks only ever narrow) and
:meth:`MaskStore.apply` zeros the newly pruned weights (as ``+0.0``) and optimizer state. Checkpoints carry
the masks bit-packed (:meth:`MaskStore.state_dict`, :mod:`lightning_prune.files.packing`).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.selection import select_parameters
    >>> net = nn.Linear(4, 2)
    >>> store = MaskStore()
    >>> [target] = select_parameters(net)
    >>> store.set(target, (net.weight.abs() > net.weight.abs().median()).to(torch.uint8))
    >>> store.apply()
    ['weight']
    >>> store.pruned(target), int((net.weight == 0).sum()), list(net.state_dict())
    (4, 4, ['weight', 'bias'])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.collective import Collective
from lightning_prune.counting import mask_zeros, remember_pruned_count
from lightning_prune.files.packing import PackedMask
from lightning_prune.selection import PruningTarget
from lightning_prune.shards import local_view, shard_offset

__all__ = ["ZERO_KEEPING_OPTIMIZERS", "MaskStore", "StoreMasking", "apply_mask_"]

ZERO_KEEPING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
    torch.optim.ASGD,
)


def apply_mask_(tensor: Tensor, mask: Tensor) -> Tensor:
    """Zero ``tensor`` in place where ``mask`` is 0, as ``+0.0`` (``-x * 0`` is ``-0.0``; adding ``+0.0`` turns it
    into ``+0.0``), and return it.

    Example::

        >>> apply_mask_(torch.tensor([-1.0, 2.0, -3.0]), torch.tensor([0, 1, 0], dtype=torch.uint8)).tolist()
        [0.0, 2.0, 0.0]
    """
    return tensor.mul_(mask).add_(0.0)


class _Entry:
    __slots__ = ("mask", "target")

    def __init__(self, target: PruningTarget, mask: Tensor) -> None:
        self.target = target
        self.mask = mask  # uint8, the shape of the tensor this process holds (its local shard under FSDP2)

    @property
    def param(self) -> nn.Parameter:
        return self.target.tensor


class MaskStore:
    """``uint8`` masks beside plain parameters, one per pruned tensor (see the module docstring).

    Masks are kept for what this process holds of each tensor: the whole tensor, or its local shard when the
    parameter is a ``DTensor`` (FSDP2). Then ``group`` sums across the processes: counts are global, and
    :meth:`state_dict` holds whole masks, the same on every process.

    Args:
        group: the processes that share the tensors' shards (``None``: this process holds whole tensors).
    """

    def __init__(self, group: Collective | None = None) -> None:
        self.group = group
        self._entries: dict[str, _Entry] = {}
        self._dirty: list[str] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[RemovableHandle] = []
        self._plan: dict[int, list[tuple[Tensor, Tensor]]] = {}  # id(optimizer) -> [(param, mask)]
        self._grads_done: set[int] = set()

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, target: PruningTarget) -> bool:
        return target.name in self._entries

    @property
    def names(self) -> list[str]:
        """Names of the tensors that have a mask, in the order they got one."""
        return list(self._entries)

    def mask(self, target: PruningTarget) -> Tensor | None:
        """The kept mask of ``target`` (``uint8``), or ``None`` before its first pruning step."""
        entry = self._entries.get(target.name)
        return None if entry is None else entry.mask

    def pruned(self, target: PruningTarget) -> int:
        """Entries of ``target`` that its mask prunes (0 before its first pruning step), over all shards."""
        return self.pruned_counts([target])[0]

    def pruned_counts(self, targets: Iterable[PruningTarget]) -> list[int]:
        """:meth:`pruned` of each target, with one sum across the processes for all of them."""
        counts = [mask_zeros(self.mask(t)) for t in targets]
        return counts if self.group is None else self.group.sum(counts)

    def items(self) -> list[tuple[PruningTarget, Tensor]]:
        """``(target, mask)`` pairs."""
        return [(e.target, e.mask) for e in self._entries.values()]

    # ------------------------------------------------------------------ narrowing and applying

    @torch.no_grad()
    def set(self, target: PruningTarget, mask: Tensor, zeros: int | None = None) -> None:
        """Narrow ``target``'s mask to ``mask`` (1 = keep), composed with the mask kept already. ``mask`` may be
        the kept mask itself, narrowed in place. The weights change at :meth:`apply`. ``zeros``: the number of
        pruned entries after this, when the caller knows it (saves a count at the next step)."""
        if mask.dtype not in (torch.uint8, torch.bool):
            raise TypeError(
                f"A mask for {target.name!r} must be uint8 or bool (1 = keep), got {mask.dtype}: a method's masks are "
                "uint8 or bool by contract."
            )
        entry = self._entries.get(target.name)
        param = local_view(target.tensor)
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"A mask for {target.name!r} must have the shape {tuple(param.shape)} of the tensor, "
                f"got {tuple(mask.shape)}."
            )
        if entry is None:
            entry = self._entries[target.name] = _Entry(target, _as_uint8(mask, param.device))
            self._plan.clear()
        elif mask is not entry.mask:
            entry.mask.mul_(_as_uint8(mask, entry.mask.device))
        if zeros is not None:
            remember_pruned_count(entry.mask, zeros)
        if target.name not in self._dirty:
            self._dirty.append(target.name)

    def replace(self, target: PruningTarget, mask: Tensor) -> None:
        """Make ``mask`` the mask of ``target`` as it is (no composition): for restoring saved masks."""
        self._entries.pop(target.name, None)
        self.set(target, _as_uint8(mask, mask.device))

    @torch.no_grad()
    def apply(self) -> list[str]:
        """Zero the weights (as ``+0.0``) and the optimizers' per-entry state wherever the masks set since the
        last call prune. Returns the names of those tensors."""
        done, self._dirty = self._dirty, []
        for name in done:
            entry = self._entries[name]
            param = local_view(entry.param)
            apply_mask_(param, entry.mask)
            for optimizer in self._optimizers:
                for value in optimizer.state.get(entry.param, {}).values():
                    if isinstance(value, Tensor) and value.shape == entry.param.shape and value.is_floating_point():
                        local_view(value).mul_(entry.mask)
        return done

    @property
    def pending(self) -> list[str]:
        """Names whose masks were set but not yet applied."""
        return list(self._dirty)

    # ------------------------------------------------------------------ optimizers

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Keep pruned entries at zero through every step of ``optimizers`` (see the module docstring)."""
        self.detach()
        self._optimizers = list(optimizers)
        for optimizer in self._optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizers, self._plan = [], [], {}
        self._grads_done.clear()

    def _pairs(self, optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, Tensor]]:
        """``(local parameter, mask)`` of the masked parameters that ``optimizer`` updates."""
        pairs = self._plan.get(id(optimizer))
        if pairs is None:
            by_param = {id(e.param): e for e in self._entries.values()}
            pairs = []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    entry = by_param.get(id(p))
                    if entry is not None:
                        pairs.append((p, entry.mask))
            self._plan[id(optimizer)] = pairs
        return pairs

    @torch.no_grad()
    def mask_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Multiply the gradients of ``optimizer``'s masked parameters by their masks (once per step)."""
        if id(optimizer) in self._grads_done:
            return
        for p, mask in self._pairs(optimizer):
            if p.grad is not None:
                local_view(p.grad).mul_(mask)
        self._grads_done.add(id(optimizer))

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # under Lightning's closure the gradients come later (on_before_optimizer_step masks them); a step taken
        # on the raw optimizer after backward has them already (``args`` starts with the optimizer itself)
        if kwargs.get("closure") is not None or any(a is not None for a in args[1:]):
            return
        self.mask_grads(optimizer)

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._grads_done.discard(id(optimizer))  # the next step's gradients are new
        if type(optimizer) in ZERO_KEEPING_OPTIMIZERS:
            return  # zero gradient, weight and state: the update was exactly zero
        for p, mask in self._pairs(optimizer):
            local_view(p).mul_(mask)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: {"shape": [...], "bits": packed uint8}}``: the whole masks, bit-packed (8 entries a byte).

        With shards (``group``), every process must call it: each puts its rows in place in a zero buffer, and
        the sum across the processes is the whole mask (the same on every process)."""
        out = {}
        for name, e in self._entries.items():
            mask = e.mask
            if self.group is not None:
                param = e.param
                whole = torch.zeros(param.numel(), dtype=torch.int32, device=mask.device)  # (gloo sums no uint8)
                start = shard_offset(param)
                whole[start : start + mask.numel()] = mask.reshape(-1)
                mask = self.group.reduce(whole).view(param.shape)
            out.update(self.pack({name: mask}))
        return out

    def restore(self, targets: Iterable[PruningTarget], saved: Mapping[str, Tensor], mask_zeros: bool) -> None:
        """Put back whole masks saved in a checkpoint (or taken from the model), by any name of each tensor, and
        apply them; with ``mask_zeros``, a tensor that has no mask yet gets one of its zeros (a later ``fit`` after
        the masks were dropped keeps pruned entries pruned).

        Raises:
            ValueError: for a saved mask of another shape than its tensor.
        """
        for t in targets:
            mask = next((saved[a] for a in t.aliases if a in saved), saved.get(t.name))
            value = local_view(t.tensor).detach()
            if mask is not None:
                if tuple(mask.shape) != tuple(t.tensor.shape):
                    raise ValueError(
                        f"The checkpoint's mask for {t.name!r} has shape {tuple(mask.shape)}, but the tensor has "
                        f"{tuple(t.tensor.shape)}: the checkpoint belongs to another model."
                    )
                self.replace(t, self.local_part(mask, t.tensor).to(value.device))
            elif t not in self and mask_zeros and not bool(value.ne(0).all()):
                self.replace(t, value.ne(0))
        self.apply()

    @staticmethod
    def local_part(mask: Tensor, tensor: Tensor) -> Tensor:
        """The part of a whole ``mask`` that this process holds of ``tensor`` (all of it unless sharded)."""
        local = local_view(tensor)
        if tuple(mask.shape) == tuple(local.shape):
            return mask
        start = shard_offset(tensor)
        return mask.reshape(-1)[start : start + local.numel()].view(local.shape)

    @staticmethod
    def pack(masks: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
        """Whole masks in the form of :meth:`state_dict` (each a :class:`~lightning_prune.files.packing.PackedMask`)."""
        return {name: PackedMask.of(m).to_state() for name, m in masks.items()}

    @staticmethod
    def unpack(state: Mapping[str, Any]) -> dict[str, Tensor]:
        """The ``uint8`` masks of a :meth:`state_dict` (also accepts plain mask tensors, as 0.1 saved them)."""
        return {
            name: _as_uint8(value, torch.device("cpu"))
            if isinstance(value, Tensor)
            else PackedMask.from_state(value).unpack()
            for name, value in state.items()
        }

    def clear(self) -> None:
        """Forget every mask (the model keeps its zeros)."""
        self._entries, self._dirty, self._plan = {}, [], {}


def _as_uint8(mask: Tensor, device: torch.device) -> Tensor:
    mask = mask.detach()
    out = mask if mask.dtype == torch.uint8 else mask.ne(0).to(torch.uint8)
    return out.to(device).contiguous()


class StoreMasking:
    """How pruned entries stay zero during training, by default: the store's masks beside plain parameters,
    gradients masked before every optimizer step (see the module docstring). The other way is torch's own form,
    :class:`lightning_prune.reparam.TorchFormMasking` (``mask_mode="hook"``); the callback picks one when it is
    built and calls it at these points."""

    mode = "inplace"

    def check(self, model: nn.Module, targets: Iterable[PruningTarget]) -> None:
        """Refuse, before training, what this way cannot mask (nothing here)."""

    def start(self, store: MaskStore, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Training starts: keep pruned entries at zero through every step of ``optimizers``."""
        store.attach(optimizers)

    def before_optimizer_step(self, store: MaskStore, optimizer: torch.optim.Optimizer) -> None:
        """After backward, before ``optimizer`` steps (and before Lightning clips gradients)."""
        store.mask_grads(optimizer)

    def before_prune(self, store: MaskStore) -> None:
        """Before a pruning step reads or changes the weights (the model holds plain parameters then)."""

    def after_prune(self, store: MaskStore) -> None:
        """After a pruning step applied its masks."""

    def end(self, store: MaskStore) -> None:
        """Training ends (or stops): plain parameters, no hooks."""
        store.detach()

    def keep(self, store: MaskStore) -> None:
        """After training, when the masks are kept (``make_permanent=False``): where this way keeps them (the store)."""

    def checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make a checkpoint's ``state_dict`` hold the model's own keys (it does already here)."""

    @contextmanager
    def plain(self, store: MaskStore) -> Iterator[None]:
        """Within the block, the model holds plain parameters (it always does here)."""
        yield
