"""One seeding scheme for every random choice of the package: SplitMix64, on Python integers and on tensors.

:func:`derive_seed` mixes integers (the callback's seed, the pruning step, a tensor's index) into one 63-bit
seed, so that nearby inputs give unrelated streams and every process derives the same seed. :func:`uniform`
draws one number in [0, 1) per entry from a seed and each entry's index with the same mixing function, so that
a random score depends on nothing but the seed and where the entry lies in its tensor (any sharding of the
tensor draws the same scores).

Example::

    >>> derive_seed(0, 1) == derive_seed(0, 1), derive_seed(0, 1) != derive_seed(1, 0)
    (True, True)
    >>> generator(derive_seed(0, 2)).initial_seed() == derive_seed(0, 2)
    True
    >>> u = uniform(7, torch.arange(4))
    >>> bool(((u >= 0) & (u < 1)).all()), torch.equal(u[2:], uniform(7, torch.arange(2, 4)))
    (True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["derive_seed", "generator", "uniform"]

_MASK64 = (1 << 64) - 1
_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(x: int) -> int:
    """SplitMix64's finalizer of ``x + golden ratio`` (Python integers, modulo 2**64)."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    """``x`` modulo 2**64 as a signed 64-bit integer (torch's int64 arithmetic wraps the same way)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` determined by ``parts`` (in order)."""
    x = 0
    for part in parts:
        x = _mix(x ^ (int(part) & _MASK64))
    return x >> 1


def uniform(seed: int, index: Tensor) -> Tensor:
    """Float32 numbers in [0, 1), one per entry of ``index`` (int64, consumed in place): SplitMix64 of
    ``seed + index * golden ratio``, the mixing of :func:`derive_seed` on int64 tensors (logical shifts written as
    arithmetic shifts and a mask), its top 24 bits."""
    x = index.mul_(_signed(_GOLDEN)).add_(_signed(seed))
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))).mul_(_signed(_MUL1))
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))).mul_(_signed(_MUL2))
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & ((1 << 24) - 1)).to(torch.float32).mul_(1.0 / (1 << 24))


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
