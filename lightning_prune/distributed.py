"""Several processes: identical masks on every rank, through the Trainer's strategy.

Masks are decided on every rank from the same weights (data-parallel strategies keep them identical) with
random scores drawn from generators seeded by the callback's ``seed`` and the step index, so ranks agree by
construction. :func:`agree_masks` checks that they do after each pruning step, before any weight changes,
with one small broadcast of per-mask checksums through ``trainer.strategy`` (as Lightning's own callbacks
talk across processes); where a rank disagrees (a custom method that reads each rank's own RNG, weights that
drifted through nondeterministic kernels) every rank takes rank 0's masks.

Strategies that shard or flatten parameters (DeepSpeed, FSDP1's ``FSDPStrategy``, ``ModelParallelStrategy``)
are refused before training by :func:`check_strategy`.
"""

from __future__ import annotations

import zlib
from typing import Any

from lightning_prune.packing import pack_bits, unpack_bits
from lightning_prune.selection import PruningTarget
from lightning_prune.store import MaskStore

__all__ = ["agree_masks", "check_strategy", "world_size"]

_REFUSED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(strategy: Any) -> None:
    """Raise before training under a strategy that shards or flattens the parameters.

    Raises:
        ValueError: for FSDP, DeepSpeed and ``ModelParallelStrategy``; the message names the strategy and
            the ones that work (single device, ``ddp``, ``ddp_spawn``, ``ddp_notebook``).

    Example::

        >>> from pytorch_lightning.strategies import DDPStrategy
        >>> check_strategy(DDPStrategy())  # fine: nothing raised
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    refused = [n for n in _REFUSED if n in names]
    if refused:
        raise ValueError(
            f"PruningScheduleCallback does not support `strategy={type(strategy).__name__}`: it shards or flattens "
            "the parameters. Use a single device or a data-parallel strategy ('ddp', 'ddp_spawn', 'ddp_notebook')."
        )


def world_size(strategy: Any) -> int:
    """The number of processes of ``strategy`` (1 for a single device)."""
    return int(getattr(strategy, "world_size", 1) or 1)


def _checksum(mask: Any) -> int:
    return zlib.crc32(pack_bits(mask).numpy().tobytes())


def agree_masks(store: MaskStore, targets: list[PruningTarget], strategy: Any) -> bool:
    """Make the masks set since the last :meth:`MaskStore.apply` equal on every rank (rank 0's where any
    differs). Every rank must call it at the same point. Returns whether masks were replaced."""
    if world_size(strategy) <= 1:
        return False
    names = store.pending
    by_name = {t.name: t for t in targets}
    mine = [_checksum(store.mask(by_name[n])) for n in names]
    same = strategy.broadcast(mine, src=0) == mine
    if strategy.reduce_boolean_decision(same, all=True):
        return False
    ours = {n: pack_bits(store.mask(by_name[n])) for n in names}
    theirs = strategy.broadcast(ours, src=0)
    for n in names:
        mask = store.mask(by_name[n])
        store.replace(by_name[n], unpack_bits(theirs[n], mask.shape).to(mask.device))
    return True
