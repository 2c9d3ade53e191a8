"""Training with masks kept beside plain parameters: the ``"inplace"`` mask mode.

Torch's reparametrization (``weight_orig`` + ``weight_mask`` + a forward pre-hook) recomputes
``weight = weight_orig * mask`` at every forward pass and multiplies the gradient by the mask again in
backward. :class:`InplaceMasks` keeps the same masks but leaves each parameter plain, with its pruned
entries at zero, and keeps them at zero around every optimizer step:

* :meth:`InplaceMasks.zero_grads` before the step: the optimizer (and gradient clipping, which Lightning
  runs after ``on_before_optimizer_step``) sees exactly the gradients the reparametrization gives
  ``weight_orig`` (zero at pruned entries);
* :meth:`InplaceMasks.zero_weights` after the step: momentum, weight decay or Adam's running moments cannot
  move a pruned entry away from zero.

The live entries therefore follow the same arithmetic as with the hook, the pruned ones are zero after
every optimizer step, and :meth:`InplaceMasks.restore` puts torch's reparametrization back with the same
masks (for ``prune.remove`` at the end, which then gives the same model).

Pruning steps of the score methods (L1, random, importance functions) work on these masks directly:
:meth:`InplaceMasks.install` narrows a mask and zeros the newly pruned weights in place, so a step
allocates neither torch's float32 mask nor its ``weight`` copy (2 x the model's size in all), only
``uint8`` masks (a quarter of it) the first time. Other methods (torch's ``BasePruningMethod`` classes,
``NeuronPruning``) and rewinding put torch's reparametrization back for their step.

Example::

    >>> import torch.nn as nn, torch.nn.utils.prune as prune
    >>> from lightning_prune.selection import select_parameters
    >>> net = nn.Linear(4, 2)
    >>> _ = prune.l1_unstructured(net, "weight", amount=4)
    >>> masks = InplaceMasks.from_targets(select_parameters(net))
    >>> "weight_orig" in dict(net.named_parameters()), int((net.weight == 0).sum())
    (False, 4)
    >>> masks.restore()
    >>> int((net.weight_mask == 0).sum())
    4
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn

from lightning_prune.selection import PruningTarget

__all__ = ["InplaceMasks"]


class InplaceMasks:
    """The masks of some tensors, with torch's reparametrization taken off (see the module docstring).

    The masks are kept as ``uint8`` (1 = live, 0 = pruned): a quarter of torch's float32 masks, and on
    the CPU a multiplication by a ``uint8`` mask costs about 1.4 times one by a float32 mask (one by a
    ``bool`` mask, about 3.4 times).

    Args:
        entries: ``(module, parameter name, mask)`` triples; each parameter must be plain (not
            reparametrized) and already zero wherever its mask is 0.
    """

    def __init__(self, entries: Iterable[tuple[nn.Module, str, Tensor]] = ()) -> None:
        self._entries: dict[tuple[int, str], tuple[nn.Module, str, Tensor]] = {}
        for module, name, mask in entries:
            self._entries[(id(module), name)] = (module, name, _as_uint8(mask))

    @classmethod
    def from_targets(cls, targets: Iterable[PruningTarget]) -> InplaceMasks:
        """Take torch's reparametrization off every masked target, keeping its mask.

        Each parameter keeps its identity (the optimizer's reference stays valid) and becomes
        ``weight_orig * mask``: zero at every pruned entry.
        """
        entries = []
        for t in targets:
            if not t.is_masked:
                continue
            mask = t.mask
            assert mask is not None  # is_masked
            prune.remove(t.module, t.param)
            entries.append((t.module, t.param, mask))
        return cls(entries)

    @property
    def masks(self) -> list[Tensor]:
        """The masks (``uint8``), in the order they were taken or installed."""
        return [mask for _, _, mask in self._entries.values()]

    def parameters_and_masks(self) -> list[tuple[Tensor, Tensor]]:
        """``(plain parameter, its mask)`` pairs, in the order of :attr:`masks`."""
        return [(getattr(module, name), mask) for module, name, mask in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    def mask_of(self, target: PruningTarget) -> Tensor | None:
        """The mask kept for ``target`` (``uint8``), or ``None`` if it has none."""
        entry = self._entries.get((id(target.module), target.param))
        return None if entry is None else entry[2]

    @torch.no_grad()
    def install(self, target: PruningTarget, mask: Tensor) -> None:
        """Narrow ``target``'s mask to ``mask`` (1 = keep; composed with the mask kept already, or its first
        mask) and zero the newly pruned entries of the plain parameter: a pruning step without torch's
        reparametrization, so without its float32 mask and ``weight`` copy. ``mask`` may be the kept mask
        itself, already narrowed in place."""
        module, name = target.module, target.param
        current = self.mask_of(target)
        if current is None:
            current = _as_uint8(mask.to(getattr(module, name).device))
            self._entries[(id(module), name)] = (module, name, current)
        elif mask is not current:
            current.mul_(_as_uint8(mask.to(current.device)))
        getattr(module, name).mul_(current)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Multiply each parameter's gradient by its mask (before the optimizer step)."""
        for module, name, mask in self._entries.values():
            grad = getattr(module, name).grad
            if grad is not None:
                grad.mul_(mask)

    @torch.no_grad()
    def zero_weights(self) -> None:
        """Multiply each parameter by its mask (after the optimizer step)."""
        for module, name, mask in self._entries.values():
            getattr(module, name).mul_(mask)

    def restore(self) -> None:
        """Put torch's reparametrization back with these masks (``weight_orig`` is the same parameter)."""
        for module, name, mask in self._entries.values():
            prune.custom_from_mask(module, name, mask)
        self._entries = {}


def _as_uint8(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.uint8 else (mask.detach() != 0).to(torch.uint8)
