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
tensor): each pass computes one tensor's scores, turns them into keys and reduces them to a histogram
(two int64 vectors of 65,536 bins) before the next tensor's scores are computed. For one tensor alone
(local scope), its keys are computed once and kept for the three passes. The working set is the scores
the score function returns for one tensor plus three reused work buffers as large as the largest tensor
(two int32/float32, one bool), whatever the number of tensors; reusing them also spares a fresh
allocation and its page faults for every temporary. The scores of all tensors are never held at once
(the score functions are called again in each pass instead), and :func:`iter_smallest` hands out each
new mask as soon as it is built, so that a caller that installs it at once never holds all new masks.

Entries already pruned (mask 0) are never counted and always stay pruned, without boolean-index copies.
In the first histogram pass on the fast path (scores finite and >= 0, as magnitudes are) the float32
mask weighs each key in ``bincount`` (on the CPU, for tensors of up to 2**24 entries, where float32 counts
are exact): pruned entries count 0 and keep their own keys, so that they do not pile into one bin, which
slows ``bincount`` down (by about half at 60% sparsity). Otherwise (the second pass, larger tensors,
other devices or mask dtypes) one multiplication by the mask puts them at key 0, and the histogram bins
of key 0 are corrected by their number (counted once); on the general path (negative or infinite scores)
their keys are set to -2**31, below every key of a float. Masks are binary (1 = live, 0 = pruned), as
torch's are. With ``zero_where_pruned`` (scores already +0.0 there) the masks are not read at all.
The mask pass compares the unmasked keys with the threshold and multiplies by the old mask, which keeps
pruned entries pruned whatever their scores; only when ties must be broken does it compare the mask.
Where no tie is broken (the common case) and the keys are non-negative, the comparison and the
multiplication are one sign-bit trick on int32 (see ``_mask_by_arithmetic``), and with ``inplace=True``
the old mask is narrowed where it lies, so that a schedule's later steps allocate no new mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune.collective import Collective
from lightning_prune.counting import EXACT_FLOAT32, mask_zeros

__all__ = ["iter_smallest", "iter_smallest_each", "score_keys", "select_smallest"]

_BINS = 1 << 16
_HALF = _BINS // 2  # high 16 bits of key 0 fall in bin _HALF: bins are offset so that negative keys fit
_INF_BITS = 0x7F800000  # bits of float32 +inf; larger magnitudes are NaN
_ONE_BITS = 0x3F800000  # bits of float32 1.0


_INT32_MIN = -(1 << 31)  # key of pruned entries on the general path: below every key of a non-NaN float


class _Keys:
    """The int32 keys of one tensor's scores, with its pruned entries out of the way (see the docstring)."""

    __slots__ = ("flat", "nonneg", "pruned_at", "shape", "weights")

    def __init__(
        self,
        flat: Tensor,
        nonneg: bool,
        pruned_at: str | None,
        shape: torch.Size,
        weights: Tensor | None = None,
    ):
        self.flat = flat  # 1-d int32; may be a view of the scores: never modified in place
        self.nonneg = nonneg  # every key >= 0
        # where the histograms count the pruned entries: "zero" (key 0, fast path), "bottom" (key -2**31,
        # general path) or None (nowhere: nothing is pruned, or the histograms are weighted by the mask)
        self.pruned_at = pruned_at
        self.shape = shape
        self.weights = weights  # the float32 mask as bincount weights, or None


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
    if bits.numel() == 0:  # an empty shard (a tensor with fewer rows than processes)
        return True
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


def _raw_keys(score: Callable[[], Tensor], fast: bool | None) -> tuple[_Keys, bool]:
    """Keys of one tensor's scores, pruned entries included; ``fast=None``: check the scores (first pass)."""
    scores = score()
    shape, bits = scores.shape, _float32_bits(scores)
    del scores
    if fast is None:
        fast = _check_bits(bits)
    return _Keys(bits if fast else _signed_keys(bits), fast, None, shape), fast


def _live_keys(raw: _Keys, mask: Tensor | None, weighted: bool, scratch: _Scratch, zeroed: bool = False) -> _Keys:
    """``raw`` with its pruned entries out of the way of the histograms (see the module docstring);
    ``zeroed``: the scores are already +0.0 at every pruned entry."""
    if mask is None:
        return raw
    bits = raw.flat
    if zeroed and raw.nonneg:  # already at key 0: nothing to read but the count
        return _Keys(bits, True, "zero", raw.shape)
    alive = mask.detach().reshape(-1)
    if alive.device != bits.device or alive.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        alive = alive.to(device=bits.device, dtype=torch.float32)
    if not raw.nonneg:  # general path
        return _Keys(torch.where(alive != 0, bits, _INT32_MIN), False, "bottom", raw.shape)
    if weighted and alive.dtype == torch.float32 and alive.numel() <= EXACT_FLOAT32 and bits.device.type == "cpu":
        # the mask weighs each key in the histogram (0: not counted); the keys keep the magnitudes of the
        # pruned entries, so that they do not all pile into one bin, which slows bincount down on the CPU
        # (a weighted bincount on CUDA counts with float atomics: torch refuses it in deterministic mode)
        return _Keys(bits, True, None, raw.shape, weights=alive)
    # live: s * 1 = s; pruned: s * 0 = +0.0 (s is finite and >= 0)
    product = scratch.get("keys", bits.numel(), torch.float32, bits.device)
    torch.mul(bits.view(torch.float32), alive, out=product)
    return _Keys(product.view(torch.int32), True, "zero", raw.shape)


def _bincount(values: Tensor, keys: _Keys, minlength: int) -> Tensor:
    """Histogram of ``values`` (int64), each weighted by the mask where ``keys`` carries it."""
    if keys.weights is None:
        return torch.bincount(values, minlength=minlength)
    # float32 counts are exact integers: no bin can exceed the tensor's size, at most 2**24 here
    return torch.bincount(values, weights=keys.weights, minlength=minlength).to(torch.int64)


def _add_high_histogram(hist: Tensor, keys: _Keys, scratch: _Scratch) -> None:
    """Add the keys' high 16 bits to ``hist``."""
    high = scratch.get("bins", keys.flat.numel(), torch.int32, keys.flat.device)
    torch.bitwise_right_shift(keys.flat, 16, out=high)
    if keys.nonneg:  # all in the upper half: no offset pass
        hist[_HALF:] += _bincount(high, keys, _HALF).to(hist.device)
    else:
        hist += _bincount(high.add_(_HALF), keys, _BINS).to(hist.device)


def _add_low_histogram(hist: Tensor, keys: _Keys, high: int, scratch: _Scratch) -> None:
    """Add the low 16 bits of the keys whose histogram bin is ``high`` to ``hist``."""
    base = (high - _HALF) << 16
    # key - base + 1 is in [1, 65536] inside the bin; clamping sends the others to bins 0 and 65537
    shifted = scratch.get("bins", keys.flat.numel(), torch.int32, keys.flat.device)
    torch.sub(keys.flat, base - 1, out=shifted).clamp_(0, _BINS + 1)
    hist += _bincount(shifted, keys, _BINS + 2)[1 : _BINS + 1].to(hist.device)


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
    *,
    inplace: bool = False,
    zero_where_pruned: bool = False,
    group: Collective | None = None,
) -> Iterator[Tensor]:
    """Like :func:`select_smallest`, but yield each new mask as soon as it is built, in tensor order.

    The two histogram passes run at the first ``next()``; each later mask is built only when asked for.
    Installing each mask as it comes (as :class:`~lightning_prune.methods.ScoreMethod` does) keeps the
    step's peak memory at the masks being installed plus one tensor's temporaries. A given ``masks``
    entry must not change before its own new mask has been yielded. ``pruned``, the number of zeros of
    each mask when the caller knows it already, saves counting them again. With ``inplace=True``, each
    given mask (not ``None``) is narrowed in place and yielded itself, rather than a new tensor: a
    schedule's later steps then allocate no mask at all. ``zero_where_pruned=True`` promises that every
    score is +0.0 where its mask is 0 (the magnitudes of weights zeroed in place, as ``mask_mode="inplace"``
    keeps them): the histogram passes then take the pruned entries off key 0 by their number, without
    reading the masks.

    ``group``: every process holds one shard of each tensor (FSDP2's row shards, in rank order) and calls
    this with its own shards and the same global ``k``: the histograms and counts are summed across the
    processes, so that together they prune exactly ``k`` entries, with ties broken in the order of one
    process holding the whole tensors (tensor order, then flat index), without gathering any scores.
    ``pruned`` then holds this process's counts.

    Example::

        >>> w, v = torch.tensor([0.5, -0.1, 0.3]), torch.tensor([0.2, -0.4])
        >>> [m.tolist() for m in iter_smallest([w.abs, v.abs], [None, None], k=2)]
        [[1.0, 0.0, 1.0], [0.0, 1.0]]
    """
    if len(scores) != len(masks):
        raise ValueError(f"Expected one mask per score tensor, got {len(masks)} masks for {len(scores)}.")
    yield from _iter_smallest(scores, masks, k, pruned, _Scratch(), inplace, zero_where_pruned, group)


def iter_smallest_each(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    ks: Sequence[int],
    pruned: Sequence[int] | None = None,
    *,
    inplace: bool = False,
    zero_where_pruned: bool = False,
    group: Collective | None = None,
) -> Iterator[Tensor]:
    """Local selection: for each tensor alone, prune its ``ks[i]`` live entries with the smallest scores.

    The same as ``iter_smallest([scores[i]], [masks[i]], ks[i])`` for each ``i`` in turn, but the work
    buffers are allocated once for all tensors. Yields one new mask per tensor, in order (``inplace``,
    ``zero_where_pruned`` and ``group``: as in :func:`iter_smallest`).

    Example::

        >>> w, v = torch.tensor([0.5, -0.1, 0.3]), torch.tensor([0.2, -0.4])
        >>> [m.tolist() for m in iter_smallest_each([w.abs, v.abs], [None, None], ks=[2, 1])]
        [[1.0, 0.0, 0.0], [0.0, 1.0]]
    """
    if not len(scores) == len(masks) == len(ks):
        raise ValueError(f"Expected one mask and one k per score tensor, got {len(masks)} masks and {len(ks)} ks.")
    scratch = _Scratch()
    for i, (score, mask, k) in enumerate(zip(scores, masks, ks)):
        if group is None and k > 0 and (mask is None or mask.numel() <= _SORTED):
            values = score()
            if values.numel() <= _SORTED:  # a small tensor: one stable sort costs less than two histograms
                yield _sorted_smallest(values, mask, k, inplace)
                continue
            score = _returning(values)
        pruned_i = None if pruned is None else [pruned[i]]
        yield from _iter_smallest([score], [mask], k, pruned_i, scratch, inplace, zero_where_pruned, group)


_SORTED = _BINS  # tensors up to this size are selected by sorting their keys


def _returning(values: Tensor) -> Callable[[], Tensor]:
    return lambda: values


def _sorted_smallest(scores: Tensor, mask: Tensor | None, k: int, inplace: bool) -> Tensor:
    """What :func:`_iter_smallest` gives for one tensor, from one stable sort of its keys: the ``k`` smallest
    live keys are pruned, ties in flat-index order (the order the histogram path breaks them in)."""
    keys = score_keys(scores).reshape(-1).to(torch.int64)
    alive = None if mask is None else mask.detach().reshape(-1).to(keys.device) != 0
    n_pruned = 0
    if alive is not None:
        n_pruned = int((~alive).sum())
        keys = keys.masked_fill(~alive, _INT32_MIN - 1)  # pruned entries first, below every key
    if k > keys.numel() - n_pruned:
        raise ValueError(f"`k` must be in [0, {keys.numel() - n_pruned}] (the number of live entries), got {k}.")
    order = torch.sort(keys, stable=True).indices[n_pruned : n_pruned + k]
    if mask is None:
        out = torch.ones(keys.numel(), dtype=torch.float32, device=keys.device)
        out[order] = 0.0
        return out.view(scores.shape)
    target = mask if inplace else mask.clone()
    target.view(-1)[order.to(target.device)] = 0
    return target


@dataclass
class _HighPass:
    """What the first pass leaves: the high-bit histogram, per tensor whether its keys take the fast path, the one
    tensor's raw keys kept for the next passes (local scope), and the pruned entries counted at key 0 / below."""

    hist: Tensor
    fast: list[bool]
    held: _Keys | None
    n_zero_low: int
    n_below: int


@dataclass
class _Threshold:
    """The k-th smallest live key (``value``), how many entries equal to it must go (``ties_left``), whether that is
    all of them, and each process's per-tensor tie quotas where the tie is broken across processes."""

    value: int
    ties_left: int
    prune_all_ties: bool
    quotas: list[tuple[int, int]] | None


def _iter_smallest(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
    pruned: Sequence[int] | None,
    scratch: _Scratch,
    inplace: bool,
    zeroed: bool,
    group: Collective | None = None,
) -> Iterator[Tensor]:
    """Radix selection in three passes over the keys: the high 16 bits, the low 16 bits inside the bin that holds
    the k-th smallest, then the masks."""
    if k < 0:
        raise ValueError(f"`k` must be >= 0 (how many live entries to prune), got {k}.")
    if k == 0:
        for score, mask in zip(scores, masks):
            if mask is None:
                yield torch.ones_like(score(), dtype=torch.float32)
            else:
                yield mask if inplace else mask.clone()
        return
    high = _high_pass(scores, masks, pruned, scratch, zeroed, group)
    threshold = _low_pass(scores, masks, k, high, scratch, zeroed, group)
    yield from _mask_pass(scores, masks, high, threshold, scratch, inplace)


def _high_pass(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    pruned: Sequence[int] | None,
    scratch: _Scratch,
    zeroed: bool,
    group: Collective | None,
) -> _HighPass:
    """Pass 1: high 16 bits of every key; pruned entries weigh 0 (fast path, float32 masks), or lie at key 0 (fast
    path) or below every live key (general path)."""
    hist: Tensor | None = None
    fast: list[bool] = []
    n_at_zero = n_below = 0  # pruned entries counted at key 0 / at key -2**31
    n_zero_low = 0  # pruned entries at key 0 in pass 2, where the fast path multiplies by the mask
    held: _Keys | None = None  # one tensor (local scope): its raw keys serve all three passes
    for i, (score, mask) in enumerate(zip(scores, masks)):
        raw, is_fast = _raw_keys(score, None)
        if len(scores) == 1:
            held = raw
        keys = _live_keys(raw, mask, True, scratch, zeroed)
        del raw
        if hist is None:
            hist = torch.zeros(_BINS, dtype=torch.int64, device=keys.flat.device)
        _add_high_histogram(hist, keys, scratch)
        if mask is not None:
            n = mask_zeros(mask) if pruned is None else pruned[i]
            n_at_zero += n if keys.pruned_at == "zero" else 0
            n_below += n if keys.pruned_at == "bottom" else 0
            n_zero_low += n if is_fast else 0
        fast.append(is_fast)
        del keys
    if hist is None:
        raise ValueError("`k` must be in [0, 0] (the number of live entries): no tensor was given.")
    if group is not None:  # every process's shards, summed
        hist = group.reduce(hist)
        n_at_zero, n_below, n_zero_low = group.sum([n_at_zero, n_below, n_zero_low])
    hist[_HALF] -= n_at_zero  # key 0 is in bin _HALF: count live entries only there
    return _HighPass(hist, fast, held, n_zero_low, n_below)


def _low_pass(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
    high: _HighPass,
    scratch: _Scratch,
    zeroed: bool,
    group: Collective | None,
) -> _Threshold:
    """Pass 2: low 16 bits of the keys inside the bin of the k-th smallest (never the bin of key -2**31). No
    weights here: most keys fall outside the bin and pile into two bins anyway, where a weighted bincount is
    slower than a multiplication by the mask followed by a plain one. With several processes, each tensor's own
    low histogram too: its count at the threshold is its number of live ties, which the tie quotas need."""
    n_live = int(high.hist.sum()) - high.n_below
    if k > n_live:
        raise ValueError(f"`k` must be in [0, {n_live}] (the number of live entries), got {k}.")
    rank = high.n_below + k  # the k-th smallest live key is the rank-th smallest key counted
    bin_high, below_high = _find_bin(high.hist, rank)
    hist_low = torch.zeros(_BINS, dtype=torch.int64, device=high.hist.device)
    own_low: list[Tensor] = []
    for i, (score, mask) in enumerate(zip(scores, masks)):
        raw = high.held if high.held is not None else _raw_keys(score, high.fast[i])[0]
        keys = _live_keys(raw, mask, False, scratch, zeroed)
        if group is None:
            _add_low_histogram(hist_low, keys, bin_high, scratch)
        else:
            own_low.append(torch.zeros_like(hist_low))
            _add_low_histogram(own_low[-1], keys, bin_high, scratch)
            hist_low += own_low[-1]
        del raw, keys
    if group is not None:
        hist_low = group.reduce(hist_low)
    if bin_high == _HALF:
        hist_low[0] -= high.n_zero_low
    low, below_low = _find_bin(hist_low, rank - below_high)
    value = ((bin_high - _HALF) << 16) | low
    ties_left = rank - below_high - below_low  # entries equal to the threshold that must go, first come first
    prune_all_ties = ties_left == int(hist_low[low])  # the common case: no tie to break
    quotas = None
    if not prune_all_ties and group is not None:
        # which tied entries go, per tensor: the first ones in the order of one process holding whole tensors
        # (tensor order, then flat index; shards follow each other in rank order), counted in an extra pass; the
        # low histograms count pruned entries at key 0 on the fast path: count ties again there
        counts = None if value == 0 else [int(h[low]) for h in own_low]
        quotas = _tie_quotas(scores, masks, high.fast, high.held, value, ties_left, group, counts)
    return _Threshold(value, ties_left, prune_all_ties, quotas)


def _mask_pass(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    high: _HighPass,
    threshold: _Threshold,
    scratch: _Scratch,
    inplace: bool,
) -> Iterator[Tensor]:
    """Pass 3: masks from the unmasked keys: keys above the threshold stay (and the ties not taken), times the
    old mask, so that pruned entries stay pruned whatever their scores."""
    held, ties_left, value = high.held, threshold.ties_left, threshold.value
    for i, (score, mask) in enumerate(zip(scores, masks)):
        keys = held if held is not None else _raw_keys(score, high.fast[i])[0]
        held = None
        if threshold.prune_all_ties:
            quota, n_tied = None, None
        elif threshold.quotas is not None:
            quota, n_tied = threshold.quotas[i]
        elif ties_left == 0:
            quota, n_tied = 0, -1
        else:  # one process counts the ties as it goes
            n_tied = int(torch.count_nonzero(_tied(keys, mask, value)))
            quota = min(ties_left, n_tied)
            ties_left -= quota
        all_ties = quota is None or quota == n_tied
        if high.fast[i] and value >= 0 and (all_ties or quota == 0):  # no tie to break here
            yield _mask_by_arithmetic(keys, value + 1 if all_ties else value, mask, inplace, scratch)
            continue
        yield _mask_by_comparison(keys, mask, value, quota if not all_ties else None, scratch, inplace)


def _mask_by_comparison(
    keys: _Keys, mask: Tensor | None, value: int, quota: int | None, scratch: _Scratch, inplace: bool
) -> Tensor:
    """Keep keys above ``value``; with a ``quota``, keep those equal to it too but the first ``quota`` live ones."""
    keep = scratch.get("keep", keys.flat.numel(), torch.bool, keys.flat.device)
    if quota is None:
        torch.gt(keys.flat, value, out=keep)
    else:
        torch.ge(keys.flat, value, out=keep)
        if quota:
            tied = _tied(keys, mask, value)
            keep[tied.nonzero().squeeze(1)[:quota]] = False
            del tied
    shape = keys.shape
    if mask is None:
        return keep.view(shape).to(torch.float32)
    if inplace:
        mask.mul_(keep.view(mask.shape).to(device=mask.device, dtype=mask.dtype))
        return mask
    return mask * keep.view(mask.shape).to(mask.device)


def _tied(keys: _Keys, mask: Tensor | None, threshold: int) -> Tensor:
    """Live entries whose key equals the threshold (bool, flat)."""
    tied = keys.flat == threshold
    if mask is not None:
        tied &= mask.reshape(-1).to(tied.device) != 0
    return tied


def _tie_quotas(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    fast: Sequence[bool],
    held: _Keys | None,
    threshold: int,
    ties_left: int,
    group: Collective,
    counts: list[int] | None = None,
) -> list[tuple[int, int]]:
    """``(ties to prune, live ties)`` of each tensor of this process: the first ``ties_left`` live entries at
    the threshold, counted over every process's shards in tensor order, then rank order, then flat index.
    ``counts``: this process's live ties per tensor when known (else counted here, in one more pass)."""
    if counts is None:
        counts = []
        for i, (score, mask) in enumerate(zip(scores, masks)):
            keys = held if held is not None else _raw_keys(score, fast[i])[0]
            counts.append(int(torch.count_nonzero(_tied(keys, mask, threshold))))
    table = group.gather(counts)
    rank = group.rank
    before = 0
    quotas = []
    for i, mine in enumerate(counts):
        ahead = before + int(table[:rank, i].sum())  # earlier tensors on every rank, this tensor on lower ranks
        quotas.append((max(0, min(mine, ties_left - ahead)), mine))
        before += int(table[:, i].sum())
    return quotas


def _mask_by_arithmetic(keys: _Keys, lowest_kept: int, mask: Tensor | None, inplace: bool, scratch: _Scratch) -> Tensor:
    """The mask "key >= lowest_kept" (times ``mask``) from non-negative keys, by int32 arithmetic: on the CPU
    this is about twice as fast as a comparison to bool followed by a conversion and a multiplication.

    ``(key - lowest_kept) >> 31`` is -1 (all bits set) where the entry is pruned and 0 where it stays (no
    overflow: both are in [0, 2**31)); its complement ANDed with the bits of a float32 mask keeps each kept
    entry's bits and gives +0.0 at each pruned one; ANDed with the bits of 1.0 it is a new 0/1 mask.
    """
    flat = keys.flat
    if mask is None:  # a fresh tensor: the work buffer is reused for the next tensor
        fresh = torch.sub(flat, lowest_kept).bitwise_right_shift_(31).bitwise_not_().bitwise_and_(_ONE_BITS)
        return fresh.view(torch.float32).view(keys.shape)
    same_layout = mask.device == flat.device and mask.is_contiguous()
    if mask.dtype in (torch.uint8, torch.bool) and same_layout:  # byte masks: one comparison is cheaper
        keep = scratch.get("keep", flat.numel(), torch.bool, flat.device)
        torch.ge(flat, lowest_kept, out=keep)
        target = mask if inplace else mask.clone()
        target.view(-1).bitwise_and_(keep.view(mask.dtype))  # True is byte 1
        return target
    keep_bits = scratch.get("bins", flat.numel(), torch.int32, flat.device)
    torch.sub(flat, lowest_kept, out=keep_bits).bitwise_right_shift_(31).bitwise_not_()  # -1: kept, 0: pruned
    if mask.dtype == torch.float32 and same_layout:
        target = mask if inplace else mask.clone()
        target.view(-1).view(torch.int32).bitwise_and_(keep_bits)
        return target
    keep = keep_bits.bitwise_and_(_ONE_BITS).view(torch.float32).view(mask.shape).to(mask.device, mask.dtype)
    return mask.mul_(keep) if inplace else mask * keep


def select_smallest(
    scores: Sequence[Callable[[], Tensor]],
    masks: Sequence[Tensor | None],
    k: int,
) -> list[Tensor]:
    """Prune exactly ``k`` more entries: the live entries with the smallest scores across all tensors.

    Args:
        scores: one zero-argument function per tensor that returns its scores (any floating dtype, the
            tensor's shape, compared in float32). With several tensors, each is called up to three times
            (once per pass), so the scores are computed again rather than all held in memory; it must
            return the same scores each time. A single tensor's keys are kept for all passes instead.
            The scores of pruned entries are ignored (they may be anything but NaN).
        masks: the current binary mask of each tensor (1 = live, 0 = pruned), or ``None`` for all-live
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
