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
masks (for the next pruning step, or for ``prune.remove`` at the end, which then gives the same model).

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

    Args:
        entries: ``(module, parameter name, mask)`` triples; each parameter must be plain (not
            reparametrized) and already zero wherever its mask is 0.
    """

    def __init__(self, entries: Iterable[tuple[nn.Module, str, Tensor]]) -> None:
        self._entries = [(module, name, mask) for module, name, mask in entries]

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
        """The masks, in the order of the targets they were taken from."""
        return [mask for _, _, mask in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Multiply each parameter's gradient by its mask (before the optimizer step)."""
        for module, name, mask in self._entries:
            grad = getattr(module, name).grad
            if grad is not None:
                grad.mul_(mask)

    @torch.no_grad()
    def zero_weights(self) -> None:
        """Multiply each parameter by its mask (after the optimizer step)."""
        for module, name, mask in self._entries:
            getattr(module, name).mul_(mask)

    def restore(self) -> None:
        """Put torch's reparametrization back with these masks (``weight_orig`` is the same parameter)."""
        for module, name, mask in self._entries:
            prune.custom_from_mask(module, name, mask)
        self._entries = []
