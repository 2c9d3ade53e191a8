"""What several processes that each hold a shard of every tensor need to decide as one: a sum across ranks.

Pure arithmetic on tensors (no ``torch.nn``, no module surgery): the callback builds a :class:`Collective` from
the Trainer's strategy (``strategy.reduce`` sums a tensor over every process), and the exact selection of
:mod:`lightning_prune.methods.thresholds` sums its histograms and counts through it, so that a sharded model's
global step prunes exactly what one process holding the whole model would.

Example::

    >>> import torch
    >>> one = Collective(reduce=lambda t: t, rank=0, world_size=1)
    >>> one.gather([3, 4]).tolist()
    [[3, 4]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Collective"]


@dataclass(frozen=True)
class Collective:
    """A sum across processes, and this process's place among them.

    Attributes:
        reduce: sums a tensor over every process, in place, and returns it.
        rank: this process's index.
        world_size: the number of processes.
    """

    reduce: Callable[[Tensor], Tensor]
    rank: int
    world_size: int

    def sum(self, values: Sequence[int]) -> list[int]:
        """Each integer summed over every process."""
        return [int(v) for v in self.reduce(torch.tensor(list(values), dtype=torch.int64)).tolist()]

    def gather(self, values: Sequence[int]) -> Tensor:
        """``(world_size, len(values))``: row ``r`` holds process ``r``'s integers."""
        table = torch.zeros(self.world_size, len(values), dtype=torch.int64)
        table[self.rank] = torch.tensor(list(values), dtype=torch.int64)
        return self.reduce(table)
