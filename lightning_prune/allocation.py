"""How one global target is shared out across tensors: pure arithmetic on sizes, shapes and outlier ratios.

A global target ``s`` over tensors of ``n_1 .. n_T`` entries asks for ``K = round(s * N)`` zeros in all
(``N = sum n_i``). An *allocation* decides how many of them each tensor takes:

* ``"global"``: one magnitude ranking across all tensors decides (the callback's ``scope="global"``; no
  arithmetic here);
* ``"uniform"``: every tensor the same fraction ``s`` (rounded so that the counts still sum to ``K``);
* ``"erk"``: Erdos-Renyi-Kernel (Evci et al. 2020, RigL): tensor ``i`` keeps a density proportional to
  ``sum(shape_i) / prod(shape_i)``, so small layers (a first convolution, a classifier) stay denser; a tensor
  whose density would pass 1 is kept dense and the rest is shared again among the others (RigL's
  ``sparse_utils.get_sparsities``);
* ``"owl"``: outlier-weighted layerwise sparsity (Yin et al. 2024, OWL): tensors with more activation outliers
  keep more weights; densities spread linearly over ``[d - lam, d + lam]`` by outlier ratio, shifted so that
  the size-weighted total is the global target.

Every function returns exact integer counts whose sum is ``K`` (see :func:`exact_counts`), each within its
tensor's bounds (at least the entries already pruned, at most the tensor's size). Nothing here imports torch.

Example::

    >>> sizes = [54, 864, 48000, 10080, 840]
    >>> counts = uniform_counts(sizes, 0.9)
    >>> sum(counts) == round(0.9 * sum(sizes)), counts
    (True, [48, 778, 43200, 9072, 756])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from lightning_prune._utils.checks import check_fraction, check_number

__all__ = [
    "Allocation",
    "erk_densities",
    "erk_counts",
    "exact_counts",
    "owl_counts",
    "owl_densities",
    "total_count",
    "uniform_counts",
]

Allocation = Literal["global", "uniform", "erk", "owl"]


def total_count(sparsity: float, sizes: Sequence[int]) -> int:
    """``round(sparsity * sum(sizes))``, rounded half up (the same count as a global step's).

    >>> total_count(0.99, [54, 864, 48000, 10080, 840])
    59240
    """
    return min(sum(sizes), int(math.floor(sparsity * sum(sizes) + 0.5)))


def _check_bounds(wanted: Sequence[float], total: int, lower: Sequence[int], upper: Sequence[int]) -> None:
    if not len(wanted) == len(lower) == len(upper):
        raise ValueError(f"Expected as many bounds as tensors, got {len(wanted)}, {len(lower)}, {len(upper)}.")
    if any(lo > hi for lo, hi in zip(lower, upper)):
        raise ValueError("Every lower bound must be at most its upper bound.")
    if not sum(lower) <= total <= sum(upper):
        raise ValueError(f"{total} zeros cannot be shared out within the bounds (from {sum(lower)} to {sum(upper)}).")


def exact_counts(
    wanted: Sequence[float],
    total: int,
    upper: Sequence[int],
    lower: Sequence[int] | None = None,
) -> list[int]:
    """Integer counts near ``wanted`` (real numbers) that sum to ``total`` exactly, each in ``[lower, upper]``.

    Largest remainders: each count starts at ``floor(wanted)`` (within its bounds); the entries still to place go
    one each to the counts furthest below their wish, or evenly to every count with room when they are more
    than the counts (a bound may push many of them elsewhere).

    Raises:
        ValueError: when ``total`` lies outside the sums of the bounds.

    Example::

        >>> exact_counts([1.5, 1.5, 1.0], 4, upper=[10, 10, 10])
        [2, 1, 1]
        >>> exact_counts([5.0, 5.0], 8, upper=[10, 10], lower=[6, 0])
        [6, 2]
    """
    lower = [0] * len(wanted) if lower is None else list(lower)
    _check_bounds(wanted, total, lower, upper)
    counts = [min(hi, max(lo, math.floor(w))) for w, lo, hi in zip(wanted, lower, upper)]
    left = total - sum(counts)
    sign = 1 if left > 0 else -1
    while left:
        room = [i for i, c in enumerate(counts) if (c < upper[i] if sign > 0 else c > lower[i])]
        if len(room) <= abs(left):
            space = min(upper[i] - counts[i] if sign > 0 else counts[i] - lower[i] for i in room)
            step = min(space, abs(left) // len(room))
            for i in room:
                counts[i] += sign * step
            left -= sign * step * len(room)
            continue
        room.sort(key=lambda i: (sign * (counts[i] - wanted[i]), i))  # furthest from its wish first
        for i in room[: abs(left)]:
            counts[i] += sign
        left = 0
    return counts


def _bounds(sizes: Sequence[int], total: int, lower: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """Keep at least one entry of every tensor when the total allows it (an emptied layer's output is constant)."""
    upper = [n - 1 if n > 1 else n for n in sizes]
    if sum(upper) < total:
        upper = list(sizes)
    low = [0] * len(sizes) if lower is None else list(lower)
    return [max(u, lo) for u, lo in zip(upper, low)], low


def uniform_counts(sizes: Sequence[int], sparsity: float, pruned: Sequence[int] | None = None) -> list[int]:
    """Zeros per tensor for ``sparsity`` of each (``round(sparsity * N)`` in all), never below ``pruned``.

    >>> uniform_counts([10, 10, 10], 0.25)
    [3, 3, 2]
    """
    sparsity = check_fraction("sparsity", sparsity)
    total = total_count(sparsity, sizes)
    upper, lower = _bounds(sizes, total, pruned)
    return exact_counts([sparsity * n for n in sizes], total, upper, lower)


def _size(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float, power: float = 1.0) -> list[float]:
    """RigL's Erdos-Renyi-Kernel densities (fractions kept) for an overall ``sparsity`` of the tensors together.

    Density ``d_i = eps * (sum(shape_i) / prod(shape_i)) ** power`` with one ``eps`` for all; a tensor whose
    ``d_i`` would pass 1 is kept dense and ``eps`` is solved again for the others (the dense-layer
    redistribution), until every density is at most 1. Then ``sum(d_i * n_i) = (1 - sparsity) * N``.

    Args:
        shapes: the tensors' shapes (a convolution's ``(out, in, kh, kw)``: the kernel counts, as in RigL's ERK).
        sparsity: the overall fraction of zeros, in [0, 1).
        power: RigL's ``erk_power_scale`` (1.0).

    Example::

        >>> [round(d, 4) for d in erk_densities([(100, 100), (10, 100)], 0.9)]
        [0.071, 0.3903]
    """
    sparsity = check_fraction("sparsity", sparsity)
    power = check_number("power", power, low=0.0)
    sizes = [_size(s) for s in shapes]
    raw = [(sum(int(d) for d in s) / n) ** power if n else 0.0 for s, n in zip(shapes, sizes)]
    dense: set[int] = set()
    while True:
        keep = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)  # entries kept by the sparse tensors
        divisor = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = keep / divisor if divisor > 0 else 0.0
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        top = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == top)  # RigL: the tensor(s) of the largest raw density first


def erk_counts(
    shapes: Sequence[Sequence[int]], sparsity: float, pruned: Sequence[int] | None = None, power: float = 1.0
) -> list[int]:
    """Zeros per tensor from :func:`erk_densities`, summing to ``round(sparsity * N)``, never below ``pruned``.

    >>> erk_counts([(100, 100), (10, 100)], 0.9)
    [9290, 610]
    """
    sizes = [_size(s) for s in shapes]
    total = total_count(sparsity, sizes)
    upper, lower = _bounds(sizes, total, pruned)
    densities = erk_densities(shapes, sparsity, power)
    return exact_counts([n * (1.0 - d) for n, d in zip(sizes, densities)], total, upper, lower)


def owl_densities(sizes: Sequence[int], ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL's densities: spread linearly over a width of ``2 * lam`` by outlier ratio (the most outliers, the
    densest), shifted so that the size-weighted mean density is ``1 - sparsity`` (clipped to [0, 1], the shift
    found by bisection). Equal ratios give every tensor ``1 - sparsity``.

    Args:
        sizes: the tensors' numbers of entries.
        ratios: each tensor's outlier ratio (the fraction of its scores above ``M`` times their mean).
        sparsity: the overall fraction of zeros, in [0, 1).
        lam: OWL's ``Lamda``: half the spread of the densities (0.08 in the paper for LLaMA at 70%).

    Example::

        >>> [round(d, 3) for d in owl_densities([100, 100, 100], [0.01, 0.02, 0.03], 0.7)]
        [0.22, 0.3, 0.38]
    """
    sparsity = check_fraction("sparsity", sparsity)
    lam = check_number("lam", lam, low=0.0)
    if len(sizes) != len(ratios):
        raise ValueError(f"Expected one outlier ratio per tensor, got {len(ratios)} for {len(sizes)} tensors.")
    lo, hi = min(ratios), max(ratios)
    base = [0.0 if hi == lo else (r - lo) / (hi - lo) * 2.0 * lam for r in ratios]
    goal = (1.0 - sparsity) * sum(sizes)

    def kept(shift: float) -> float:
        return sum(n * min(1.0, max(0.0, b + shift)) for n, b in zip(sizes, base))

    left, right = -2.0 * lam - 1.0, 1.0
    for _ in range(200):
        mid = (left + right) / 2.0
        left, right = (mid, right) if kept(mid) < goal else (left, mid)
    return [min(1.0, max(0.0, b + right)) for b in base]


def owl_counts(
    sizes: Sequence[int],
    ratios: Sequence[float],
    sparsity: float,
    pruned: Sequence[int] | None = None,
    lam: float = 0.08,
) -> list[int]:
    """Zeros per tensor from :func:`owl_densities`, summing to ``round(sparsity * N)``, never below ``pruned``.

    >>> owl_counts([100, 100, 100], [0.01, 0.02, 0.03], 0.7)
    [78, 70, 62]
    """
    total = total_count(sparsity, sizes)
    upper, lower = _bounds(sizes, total, pruned)
    densities = owl_densities(sizes, ratios, sparsity, lam)
    return exact_counts([n * (1.0 - d) for n, d in zip(sizes, densities)], total, upper, lower)
