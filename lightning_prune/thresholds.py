"""Exact selection of the ``k`` smallest scores across many tensors, without concatenating them.

This is the arithmetic behind every magnitude (and random) pruning step, local or global. Torch's
``global_unstructured`` concatenates every score into one vector and sorts it; here the threshold is found
by a two-pass radix select over the scores' float32 bit patterns, tensor by tensor:

1. a 65,536-bin histogram of the high 16 bits of every live score's key, which finds the bin that holds
   the ``k``-th smallest score;
2. a 65,536-bin histogram of the low 16 bits of the keys inside that bin, which finds the exact key;
3. a counting pass that builds the masks: every live entry below the threshold is pruned, and entries tied
   at the threshold are pruned in a fixed order (tensor order, then flat index) until exactly ``k`` are.

Peak extra memory is a few buffers of the size of the largest single tensor; the scores of all tensors
are never held at once. Entries already pruned (mask 0) are never counted and always stay pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["score_keys", "select_smallest"]

_BINS = 1 << 16


def score_keys(scores: Tensor) -> Tensor:
    """Map scores to int32 keys that sort exactly as the scores do (as float32).

    Args:
        scores: a floating tensor of any shape; it is compared in float32.

    Returns:
        An int32 tensor of the same shape: ``a < b`` if and only if ``key(a) < key(b)``.

    Example::

        >>> k = score_keys(torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0]))
        >>> bool((k[1:] > k[:-1]).all())
        True
    """
    s = scores.to(torch.float32)
    if s.is_floating_point() and torch.isnan(s).any():
        raise ValueError("Pruning scores contain NaN; check the model's weights or the importance function.")
    bits = (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _histogram(values: Tensor) -> Tensor:
    return torch.bincount(values, minlength=_BINS).to(torch.int64)


def _find_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin that holds the ``k``-th smallest (1-based) entry, and how many entries lie below it."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype, device=cum.device)))
    below = int(cum[b - 1]) if b > 0 else 0
    return b, below


def select_smallest(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
) -> list[Tensor]:
    """Prune exactly ``k`` more entries: the live entries with the smallest scores across all tensors.

    Args:
        scores: one zero-argument function per tensor that returns its scores (any floating dtype, the
            tensor's shape). Each is called up to three times, so the scores are computed again rather
            than held in memory.
        masks: the current mask of each tensor (1 = live, 0 = pruned), or ``None`` for all-live (the new
            mask is then float32).
        k: how many live entries to prune, in ``[0, number of live entries]``.

    Returns:
        The new masks, one per tensor, in the dtype and on the device of the given mask (of the scores
        where the mask is ``None``). Every entry pruned before stays pruned.

    Raises:
        ValueError: if ``k`` is negative or larger than the number of live entries.

    Example::

        >>> w = torch.tensor([[0.5, -0.1], [0.3, 2.0]])
        >>> v = torch.tensor([0.2, -0.4, 0.05])
        >>> m1, m2 = select_smallest([w.abs, v.abs], [None, None], k=3)
        >>> m1.tolist(), m2.tolist()
        ([[1.0, 0.0], [1.0, 1.0]], [0.0, 1.0, 0.0])
    """
    if len(scores) != len(masks):
        raise ValueError(f"Expected one mask per score tensor, got {len(masks)} masks for {len(scores)}.")

    def live_keys(i: int) -> tuple[Tensor, Tensor | None]:
        keys = score_keys(scores[i]())
        mask = masks[i]
        alive = None if mask is None else mask.reshape(keys.shape) != 0
        return keys, alive

    def alive_view(keys: Tensor, alive: Tensor | None) -> Tensor:
        return keys.reshape(-1) if alive is None else keys[alive]

    hist = None
    for i in range(len(scores)):
        keys, alive = live_keys(i)
        h = _histogram((alive_view(keys, alive) >> 16) + _BINS // 2)
        hist = h if hist is None else hist + h.to(hist.device)
    n_live = int(hist.sum()) if hist is not None else 0
    if k < 0 or k > n_live:
        raise ValueError(f"`k` must be in [0, {n_live}] (the number of live entries), got {k}.")

    new_masks: list[Tensor] = []
    if k == 0:
        for i in range(len(scores)):
            mask = masks[i]
            new_masks.append(mask.clone() if mask is not None else torch.ones_like(scores[i](), dtype=torch.float32))
        return new_masks

    high, below_high = _find_bin(hist, k)
    hist_low = None
    for i in range(len(scores)):
        keys, alive = live_keys(i)
        flat = alive_view(keys, alive)
        inside = flat[(flat >> 16) == high - _BINS // 2]
        h = _histogram(inside & 0xFFFF)
        hist_low = h if hist_low is None else hist_low + h.to(hist_low.device)
    low, below_low = _find_bin(hist_low, k - below_high)
    threshold = ((high - _BINS // 2) << 16) | low
    ties_left = k - below_high - below_low  # entries equal to the threshold that must go, first come first

    for i in range(len(scores)):
        keys, alive = live_keys(i)
        keep = keys > threshold
        if ties_left > 0:
            tied = keys == threshold
            if alive is not None:
                tied &= alive
            tied_idx = tied.reshape(-1).nonzero().squeeze(1)
            if tied_idx.numel() > ties_left:
                keep.view(-1)[tied_idx[ties_left:]] = True
            ties_left -= min(ties_left, tied_idx.numel())
        mask = masks[i]
        if mask is None:
            new_masks.append(keep.to(torch.float32))
        else:
            new_masks.append(mask * keep.reshape(mask.shape).to(mask.dtype))
    return new_masks
