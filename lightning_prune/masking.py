"""Putting masks on tensors with torch's own reparametrization, and taking them off.

The first mask of a tensor goes through :meth:`torch.nn.utils.prune.BasePruningMethod.apply`, so the
module gets exactly torch's ``<name>_orig`` parameter, ``<name>_mask`` buffer and forward pre-hook. Later
steps of a schedule narrow that mask buffer in place: no new hook, no container of per-step mask copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.utils.prune as prune
from torch import Tensor

from lightning_prune.selection import PruningTarget

__all__ = ["apply_mask", "count_for", "make_permanent", "pruned_count", "refresh_weight"]


class _ScheduledMask(prune.BasePruningMethod):
    """Installs a precomputed mask through torch's machinery (the mask is dropped once installed)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: Tensor) -> None:
        self.mask: Tensor | None = mask

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        assert self.mask is not None  # internal: only called from apply()
        return default_mask * self.mask.to(dtype=default_mask.dtype, device=default_mask.device)


def apply_mask(target: PruningTarget, mask: Tensor) -> None:
    """Make ``mask`` (same shape, 1 = keep) the tensor's mask, composing with any mask already there."""
    module, name = target.module, target.param
    current = target.mask
    if current is None:
        method = _ScheduledMask.apply(module, name, mask=mask)
        method.mask = None
        return
    with torch.no_grad():
        current.mul_(mask.to(dtype=current.dtype, device=current.device))
    refresh_weight(target)


def refresh_weight(target: PruningTarget) -> None:
    """Recompute torch's cached ``<param>`` attribute (``orig * mask``) of a masked tensor now, rather than at
    the next forward, after its original values or its mask changed in place. No-op for an unmasked tensor."""
    mask = target.mask
    if mask is not None:
        setattr(target.module, target.param, target.original * mask)


def pruned_count(target: PruningTarget) -> int:
    """Entries pruned by the mask (0 before the first step)."""
    mask = target.mask
    # counting a bool tensor is several times faster than counting a float one on CPU
    return 0 if mask is None else int(mask.numel() - torch.count_nonzero(mask != 0))


def count_for(sparsity: float, total: int) -> int:
    """The number of zeros that realises ``sparsity`` of ``total`` entries, rounded half up.

    Example::

        >>> count_for(0.3, 10), count_for(0.25, 6), count_for(0.0, 7)
        (3, 2, 0)
    """
    return min(total, int(math.floor(sparsity * total + 0.5)))


def make_permanent(targets: Iterable[PruningTarget]) -> list[str]:
    """``prune.remove`` every masked tensor: plain parameters with the zeros baked in. Returns their names."""
    removed = []
    for t in targets:
        if t.is_masked:
            prune.remove(t.module, t.param)
            removed.append(t.name)
    return removed
