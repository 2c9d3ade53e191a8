"""One seeding scheme for every random choice of the package: seeds derived from the callback's ``seed``.

:func:`derive_seed` mixes integers (the callback's seed, the pruning step, a tensor's index) into one 63-bit
seed with SplitMix64, so that nearby inputs give unrelated streams and every process derives the same seed.

Example::

    >>> derive_seed(0, 1) == derive_seed(0, 1), derive_seed(0, 1) != derive_seed(1, 0)
    (True, True)
    >>> generator(derive_seed(0, 2)).initial_seed() == derive_seed(0, 2)
    True
"""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "generator"]

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` determined by ``parts`` (in order)."""
    x = 0
    for part in parts:
        x = _mix(x ^ (int(part) & _MASK64))
    return x >> 1


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
