"""Putting masks on tensors with torch's own reparametrization, and taking them off.

The first mask of a tensor goes through :meth:`torch.nn.utils.prune.BasePruningMethod.apply`, so the
module gets exactly torch's ``<name>_orig`` parameter, ``<name>_mask`` buffer and forward pre-hook. Later
steps of a schedule narrow that mask buffer in place: no new hook, no container of per-step mask copies.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
import torch.nn.utils.prune as prune
from torch import Tensor, nn

from lightning_prune.selection import PruningTarget

__all__ = [
    "apply_mask",
    "count_for",
    "count_zeros",
    "make_permanent",
    "mask_zeros",
    "pruned_count",
    "refresh_weight",
    "remember_pruned_count",
]


class _ScheduledMask(prune.BasePruningMethod):
    """Installs a precomputed mask through torch's machinery (the mask is dropped once installed)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: Tensor) -> None:
        self.mask: Tensor | None = mask

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        assert self.mask is not None  # internal: only called from apply()
        return default_mask * self.mask.to(dtype=default_mask.dtype, device=default_mask.device)


def apply_mask(target: PruningTarget, mask: Tensor) -> None:
    """Make ``mask`` (same shape, 1 = keep) the tensor's mask, composing with any mask already there.

    ``mask`` may be the tensor's own mask buffer, already narrowed in place: only torch's cached
    ``<param>`` attribute is then recomputed.
    """
    module, name = target.module, target.param
    current = target.mask
    if current is None:
        method = _ScheduledMask.apply(module, name, mask=mask)
        method.mask = None
        return
    if mask is not current:
        with torch.no_grad():
            current.mul_(mask.to(dtype=current.dtype, device=current.device))
    refresh_weight(target)


def refresh_weight(target: PruningTarget) -> None:
    """Recompute torch's cached ``<param>`` attribute (``orig * mask``) of a masked tensor now, rather than at
    the next forward, after its original values or its mask changed in place. No-op for an unmasked tensor.

    The product is written into the cached tensor itself where it can be (a plain tensor of the same shape,
    dtype and device, not created under ``torch.inference_mode``), which spares an allocation of the
    tensor's size; torch's forward pre-hook replaces that attribute at every forward pass anyway.
    """
    mask = target.mask
    if mask is None:
        return
    original = target.original
    with torch.no_grad():
        cached = target.module.__dict__.get(target.param)
        if (
            isinstance(cached, Tensor)
            and not isinstance(cached, nn.Parameter)
            and not cached.is_inference()
            and cached._base is None
            and cached.shape == original.shape
            and cached.dtype == torch.result_type(original, mask)
            and cached.device == original.device
            and cached.data_ptr() not in (original.data_ptr(), mask.data_ptr())
        ):
            torch.mul(original, mask, out=cached)
            return
    setattr(target.module, target.param, original * mask)


def count_zeros(tensor: Tensor) -> int:
    """The number of entries equal to zero (``+0.0`` or ``-0.0``).

    A float32 tensor is counted on its bit patterns shifted past the sign bit: no bool copy, several times
    faster on the CPU than ``count_nonzero(t)`` or ``(t == 0).sum()``.

    Example::

        >>> count_zeros(torch.tensor([0.0, -0.0, 1.5, -2.0])), count_zeros(torch.tensor([0, 3]))
        (2, 1)
    """
    t = tensor.detach()
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.numel() - int(torch.count_nonzero(t.view(torch.int32) << 1))
    return t.numel() - int(torch.count_nonzero(t != 0))


# id(mask) -> (weak reference to the mask, its version counter, its number of zeros): a schedule's next
# step reads the count instead of the mask, as long as the mask has not changed in place since
EXACT_FLOAT32 = 1 << 24  # float32 sums of 0/1 entries are exact up to here
_ZEROS: dict[int, tuple[weakref.ref[Tensor], int, int]] = {}


def _forget(key: int, ref: weakref.ref[Tensor]) -> None:
    if key in _ZEROS and _ZEROS[key][0] is ref:
        del _ZEROS[key]


def remember_pruned_count(mask: Tensor, count: int) -> None:
    """Record that ``mask`` holds ``count`` zeros now: :func:`pruned_count` returns it until the mask changes
    (any in-place change bumps torch's version counter of the tensor, which invalidates the record)."""
    if mask.is_inference():  # no version counter to tell a change: not remembered
        return
    key = id(mask)
    _ZEROS[key] = (weakref.ref(mask, lambda ref: _forget(key, ref)), mask._version, count)


def pruned_count(target: PruningTarget) -> int:
    """Entries pruned by the (binary) mask of a tensor, 0 before the first step (see :func:`mask_zeros`)."""
    return mask_zeros(target.mask)


def mask_zeros(mask: Tensor | None) -> int:
    """Entries pruned by a binary mask (0 for ``None``): counted once, then remembered until the mask changes
    in place."""
    if mask is None:
        return 0
    record = None if mask.is_inference() else _ZEROS.get(id(mask))
    if record is not None and record[0]() is mask and record[1] == mask._version:
        return record[2]
    m = mask.detach()
    # a binary mask's sum is exact (float32 up to 2**24 entries; uint8 sums in int64) and faster than a count
    exact_sum = m.dtype == torch.uint8 or (m.dtype == torch.float32 and m.numel() <= EXACT_FLOAT32)
    count = m.numel() - int(m.sum()) if exact_sum else count_zeros(m)
    remember_pruned_count(mask, count)
    return count


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
