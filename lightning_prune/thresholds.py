"""Exact selection of the ``k`` smallest scores across many tensors, without concatenating them.

This is the arithmetic behind every magnitude (and random) pruning step, local or global. Torch's
``global_unstructured`` concatenates every score into one vector and sorts it; here the threshold is found
by a two-pass radix select over int32 keys that sort as the float32 scores do, tensor by tensor:

1. a 65,536-bin histogram of the high 16 bits of every live key, which finds the bin that holds the
   ``k``-th smallest score;
2. a 65,536-bin histogram of the low 16 bits of the keys inside that bin, which finds the exact key;
3. a counting pass that builds the masks: every live entry below the threshold is pruned, and entries tied
   at the threshold are pruned in a fixed order (tensor order, then flat index) until exactly ``k`` are.

Memory is bounded by the largest single tensor, not by the model (tensor by tensor, no chunking of a
tensor): each pass computes one tensor's scores, turns them into keys and reduces them to a histogram (two
int64 vectors of 65,536 bins) before the next tensor's scores are computed. The working set is the scores
the score function returns for one tensor plus three reused work buffers as large as the largest tensor
(two int32/float32, one bool), whatever the number of tensors; reusing them also spares a fresh
allocation and its page faults for every temporary. The scores of all tensors are never held at once
(the score functions are called again in each pass instead), and :func:`iter_smallest` hands out each
new mask as soon as it is built, so that a caller that installs it at once never holds all new masks.

Entries already pruned (mask 0) are never counted and always stay pruned, without boolean-index copies.
In the histogram passes on the fast path (scores finite and >= 0, as magnitudes are) one multiplication
by the mask puts them at key 0, and the histogram bins of key 0 are corrected by their number (counted
once); otherwise (negative or infinite scores) their keys are set to -2**31, below every key of a float.
The mask pass compares the unmasked keys with the threshold and multiplies by the old mask, which keeps
pruned entries pruned whatever their scores; only when ties must be broken does it compare the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["iter_smallest", "iter_smallest_each", "score_keys", "select_smallest"]

_BINS = 1 << 16
_HALF = _BINS // 2  # high 16 bits of key 0 fall in bin _HALF: bins are offset so that negative keys fit
_INF_BITS = 0x7F800000  # bits of float32 +inf; larger magnitudes are NaN


_INT32_MIN = -(1 << 31)  # key of pruned entries on the general path: below every key of a non-NaN float


class _Keys:
    """The int32 keys of one tensor's scores, with its pruned entries out of the way (see the docstring)."""

    __slots__ = ("alive", "flat", "nonneg", "pruned_at_zero", "shape")

    def __init__(self, flat: Tensor, nonneg: bool, alive: Tensor | None, pruned_at_zero: bool, shape: torch.Size):
        self.flat = flat  # 1-d int32; may be a view of the scores: never modified in place
        self.nonneg = nonneg  # every key >= 0
        self.alive = alive  # the flat mask, or None when nothing is pruned
        self.pruned_at_zero = pruned_at_zero  # fast path: pruned entries have key 0 (else key -2**31)
        self.shape = shape


def _float32_bits(scores: Tensor) -> Tensor:
    s = scores.detach()
    if s.dtype != torch.float32:
        if not s.is_floating_point():
            raise ValueError(f"Pruning scores must be a floating tensor, got {s.dtype}.")
        s = s.to(torch.float32)
    return s.reshape(-1).view(torch.int32)


def _signed_keys(bits: Tensor) -> Tensor:
    """Keys of float32 bit patterns of any sign: minus the magnitude bits for negative floats (-0.0 -> 0)."""
    sign = bits >> 31  # -1 for negative floats, else 0
    return (bits & 0x7FFFFFFF).bitwise_xor_(sign).sub_(sign)


def _check_bits(bits: Tensor) -> bool:
    """Raise on NaN; return whether the fast path applies (all scores finite and >= +0.0).

    Non-negative floats sort as their bit patterns, so their bits are the keys as they are, and
    ``scores * mask`` puts every pruned entry at +0.0 (key 0) in one pass.
    """
    lo, hi = (int(v) for v in torch.aminmax(bits))
    if lo >= 0:
        if hi > _INF_BITS:
            raise ValueError("Pruning scores contain NaN; check the model's weights or the importance function.")
        return hi < _INF_BITS
    keys = _signed_keys(bits)
    klo, khi = (int(v) for v in torch.aminmax(keys))
    if khi > _INF_BITS or klo < -_INF_BITS:
        raise ValueError("Pruning scores contain NaN; check the model's weights or the importance function.")
    return False


def score_keys(scores: Tensor) -> Tensor:
    """Map scores to int32 keys that sort exactly as the scores do (as float32).

    Args:
        scores: a floating tensor of any shape; it is compared in float32 (``-0.0`` equals ``+0.0``).

    Returns:
        An int32 tensor of the same shape: ``a < b`` if and only if ``key(a) < key(b)``. It may share
        memory with ``scores`` (float32 scores that are all ``>= +0.0``): do not modify it in place.

    Raises:
        ValueError: if the scores contain NaN.

    Example::

        >>> k = score_keys(torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.25, 3.0]))
        >>> bool((k[1:] >= k[:-1]).all()), int(k[2]) == int(k[3])
        (True, True)
    """
    bits = _float32_bits(scores)
    fast = _check_bits(bits)
    keys = bits if fast or int(bits.amin()) >= 0 else _signed_keys(bits)
    return keys.view(scores.shape)


class _Scratch:
    """Work buffers reused from tensor to tensor (each as large as the largest tensor seen): no fresh
    allocation, and so no page faults, for every temporary of every tensor."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, slot: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[slot] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]


def _live_keys(
    score: Callable[[], Tensor], mask: Tensor | None, fast: bool | None, scratch: _Scratch
) -> tuple[_Keys, bool]:
    """Keys of one tensor's scores with its pruned entries out of the way; ``fast=None``: check (first pass)."""
    scores = score()
    shape, bits = scores.shape, _float32_bits(scores)
    del scores
    if fast is None:
        fast = _check_bits(bits)
    if mask is None:
        return _Keys(bits if fast else _signed_keys(bits), fast, None, False, shape), fast
    alive = mask.detach().reshape(-1)
    if alive.device != bits.device or alive.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        alive = alive.to(device=bits.device, dtype=torch.float32)
    if fast:  # live: s * 1 = s; pruned: s * 0 = +0.0 (s is finite and >= 0)
        product = scratch.get("keys", bits.numel(), torch.float32, bits.device)
        torch.mul(bits.view(torch.float32), alive, out=product)
        return _Keys(product.view(torch.int32), True, alive, True, shape), fast
    keys = torch.where(alive != 0, _signed_keys(bits), _INT32_MIN)
    return _Keys(keys, False, alive, False, shape), fast


def _add_high_histogram(hist: Tensor, keys: _Keys, scratch: _Scratch) -> None:
    """Add the keys' high 16 bits to ``hist``."""
    high = scratch.get("bins", keys.flat.numel(), torch.int32, keys.flat.device)
    torch.bitwise_right_shift(keys.flat, 16, out=high)
    if keys.nonneg:  # all in the upper half: no offset pass
        hist[_HALF:] += torch.bincount(high, minlength=_HALF).to(hist.device)
    else:
        hist += torch.bincount(high.add_(_HALF), minlength=_BINS).to(hist.device)


def _count_pruned(keys: _Keys) -> int:
    if keys.alive is None:
        return 0
    return keys.flat.numel() - int(torch.count_nonzero(keys.alive != 0))  # a bool count is the fast one


def _add_low_histogram(hist: Tensor, keys: _Keys, high: int, scratch: _Scratch) -> None:
    """Add the low 16 bits of the keys whose histogram bin is ``high`` to ``hist``."""
    base = (high - _HALF) << 16
    # key - base + 1 is in [1, 65536] inside the bin; clamping sends the others to bins 0 and 65537
    shifted = scratch.get("bins", keys.flat.numel(), torch.int32, keys.flat.device)
    torch.sub(keys.flat, base - 1, out=shifted).clamp_(0, _BINS + 1)
    hist += torch.bincount(shifted, minlength=_BINS + 2)[1 : _BINS + 1].to(hist.device)


def _find_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin that holds the ``k``-th smallest (1-based) entry, and how many entries lie below it."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype, device=cum.device)))
    below = int(cum[b - 1]) if b > 0 else 0
    return b, below


def iter_smallest(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
    pruned: Sequence[int] | None = None,
) -> Iterator[Tensor]:
    """Like :func:`select_smallest`, but yield each new mask as soon as it is built, in tensor order.

    The two histogram passes run at the first ``next()``; each later mask is built only when asked for.
    Installing each mask as it comes (as :class:`~lightning_prune.methods.ScoreMethod` does) keeps the
    step's peak memory at the masks being installed plus one tensor's temporaries. A given ``masks``
    entry must not change before its own new mask has been yielded. ``pruned``, the number of zeros of
    each mask when the caller knows it already, saves counting them again.

    Example::

        >>> w, v = torch.tensor([0.5, -0.1, 0.3]), torch.tensor([0.2, -0.4])
        >>> [m.tolist() for m in iter_smallest([w.abs, v.abs], [None, None], k=2)]
        [[1.0, 0.0, 1.0], [0.0, 1.0]]
    """
    if len(scores) != len(masks):
        raise ValueError(f"Expected one mask per score tensor, got {len(masks)} masks for {len(scores)}.")
    yield from _iter_smallest(scores, masks, k, pruned, _Scratch())


def iter_smallest_each(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    ks: Sequence[int],
    pruned: Sequence[int] | None = None,
) -> Iterator[Tensor]:
    """Local selection: for each tensor alone, prune its ``ks[i]`` live entries with the smallest scores.

    The same as ``iter_smallest([scores[i]], [masks[i]], ks[i])`` for each ``i`` in turn, but the work
    buffers are allocated once for all tensors. Yields one new mask per tensor, in order.

    Example::

        >>> w, v = torch.tensor([0.5, -0.1, 0.3]), torch.tensor([0.2, -0.4])
        >>> [m.tolist() for m in iter_smallest_each([w.abs, v.abs], [None, None], ks=[2, 1])]
        [[1.0, 0.0, 0.0], [0.0, 1.0]]
    """
    if not len(scores) == len(masks) == len(ks):
        raise ValueError(f"Expected one mask and one k per score tensor, got {len(masks)} masks and {len(ks)} ks.")
    scratch = _Scratch()
    for i, (score, mask, k) in enumerate(zip(scores, masks, ks)):
        yield from _iter_smallest([score], [mask], k, None if pruned is None else [pruned[i]], scratch)


def _iter_smallest(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
    pruned: Sequence[int] | None,
    scratch: _Scratch,
) -> Iterator[Tensor]:
    if k < 0:
        raise ValueError(f"`k` must be >= 0 (how many live entries to prune), got {k}.")
    if k == 0:
        for score, mask in zip(scores, masks):
            yield mask.clone() if mask is not None else torch.ones_like(score(), dtype=torch.float32)
        return

    # pass 1: high 16 bits of every key; pruned entries at key 0 (fast path) or below every live key
    hist: Tensor | None = None
    fast: list[bool] = []
    n_at_zero = n_below = 0  # pruned entries counted at key 0 / at key -2**31
    for i, (score, mask) in enumerate(zip(scores, masks)):
        keys, is_fast = _live_keys(score, mask, None, scratch)
        if hist is None:
            hist = torch.zeros(_BINS, dtype=torch.int64, device=keys.flat.device)
        _add_high_histogram(hist, keys, scratch)
        n = _count_pruned(keys) if pruned is None else pruned[i]
        if keys.pruned_at_zero:
            n_at_zero += n
        else:
            n_below += n
        fast.append(is_fast)
        del keys
    if hist is not None:
        hist[_HALF] -= n_at_zero  # key 0 is in bin _HALF: count live entries only there
    n_live = int(hist.sum()) - n_below if hist is not None else 0
    if hist is None or k > n_live:
        raise ValueError(f"`k` must be in [0, {n_live}] (the number of live entries), got {k}.")
    rank = n_below + k  # the k-th smallest live key is the rank-th smallest key counted
    high, below_high = _find_bin(hist, rank)

    # pass 2: low 16 bits of the keys inside that bin (never the bin of key -2**31)
    hist_low = torch.zeros(_BINS, dtype=torch.int64, device=hist.device)
    for i, (score, mask) in enumerate(zip(scores, masks)):
        _add_low_histogram(hist_low, _live_keys(score, mask, fast[i], scratch)[0], high, scratch)
    if high == _HALF:
        hist_low[0] -= n_at_zero
    low, below_low = _find_bin(hist_low, rank - below_high)
    threshold = ((high - _HALF) << 16) | low
    ties_left = rank - below_high - below_low  # entries equal to the threshold that must go, first come first
    prune_all_ties = ties_left == int(hist_low[low])  # the common case: no tie to break

    # pass 3: masks from the unmasked keys: keys above the threshold stay (and the ties not taken), times
    # the old mask, so that pruned entries stay pruned whatever their scores
    for i, (score, mask) in enumerate(zip(scores, masks)):
        keys, _ = _live_keys(score, None, fast[i], scratch)
        keep = scratch.get("keep", keys.flat.numel(), torch.bool, keys.flat.device)
        if prune_all_ties or ties_left > 0:
            torch.gt(keys.flat, threshold, out=keep)
        else:  # no tie left to prune: every later tie is kept
            torch.ge(keys.flat, threshold, out=keep)
        if ties_left > 0 and not prune_all_ties:
            tied = keys.flat == threshold
            if mask is not None:
                tied &= mask.reshape(-1).to(tied.device) != 0
            n_tied = int(torch.count_nonzero(tied))
            if n_tied > ties_left:
                keep[tied.nonzero().squeeze(1)[ties_left:]] = True
            ties_left -= min(ties_left, n_tied)
            del tied
        shape = keys.shape
        del keys
        if mask is None:
            yield keep.view(shape).to(torch.float32)
        else:
            yield mask * keep.view(mask.shape).to(mask.device)


def select_smallest(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
) -> list[Tensor]:
    """Prune exactly ``k`` more entries: the live entries with the smallest scores across all tensors.

    Args:
        scores: one zero-argument function per tensor that returns its scores (any floating dtype, the
            tensor's shape, compared in float32). Each is called up to three times (once per pass), so the
            scores are computed again rather than held in memory; it must return the same scores each
            time. The scores of pruned entries are ignored (they may be anything but NaN).
        masks: the current mask of each tensor (nonzero = live, 0 = pruned), or ``None`` for all-live
            (the new mask is then float32).
        k: how many live entries to prune, in ``[0, number of live entries]``.

    Returns:
        The new masks, one per tensor, in the dtype and on the device of the given mask (float32, on the
        scores' device, where the mask is ``None``). Every entry pruned before stays pruned. Use
        :func:`iter_smallest` to receive them one at a time instead of all at once.

    Raises:
        ValueError: if ``k`` is negative or larger than the number of live entries, or a score is NaN.

    Example::

        >>> w = torch.tensor([[0.5, -0.1], [0.3, 2.0]])
        >>> v = torch.tensor([0.2, -0.4, 0.05])
        >>> m1, m2 = select_smallest([w.abs, v.abs], [None, None], k=3)
        >>> m1.tolist(), m2.tolist()
        ([[1.0, 0.0], [1.0, 1.0]], [0.0, 1.0, 0.0])
    """
    return list(iter_smallest(scores, masks, k))
