"""Several processes: identical masks on every rank, through the Trainer's strategy.

Masks are decided on every rank from the same weights (data-parallel strategies keep them identical) with
random scores drawn from generators seeded by the callback's ``seed`` and the step index, so ranks agree by
construction. :func:`agree_masks` checks that they do after each pruning step, before any weight changes,
with one small broadcast of per-mask checksums through ``trainer.strategy`` (as Lightning's own callbacks
talk across processes); where a rank disagrees (a custom method that reads each rank's own RNG, weights that
drifted through nondeterministic kernels) every rank takes rank 0's masks.

Under FSDP2 (Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size=1``, whose ``configure_model``
calls ``fully_shard``), each process holds row shards of every parameter. The masks are kept per local shard,
and :func:`collective_for` gives the methods a :class:`~lightning_prune.collective.Collective` that sums
histograms and counts through ``strategy.reduce``: no step gathers a tensor. Strategies that flatten or
split parameters otherwise (DeepSpeed, FSDP1's ``FSDPStrategy``, tensor parallelism) are refused before
training by :func:`check_strategy`.
"""

from __future__ import annotations

import zlib
from typing import Any

from lightning_prune.collective import Collective
from lightning_prune.files.packing import pack_bits, unpack_bits
from lightning_prune.selection import PruningTarget
from lightning_prune.store import MaskStore

__all__ = ["agree_masks", "check_sharding", "check_strategy", "collective_for", "is_sharded", "world_size"]

_REFUSED = ("FSDPStrategy", "DeepSpeedStrategy")
_SHARDED = "ModelParallelStrategy"


def check_strategy(strategy: Any) -> None:
    """Raise before training under a strategy that shards or flattens the parameters.

    Raises:
        ValueError: for DeepSpeed, FSDP1 (``FSDPStrategy``) and ``ModelParallelStrategy`` with tensor
            parallelism; the message names the strategy and what works (single device, ``ddp``, ``ddp_spawn``,
            ``ddp_notebook``, FSDP2 through ``ModelParallelStrategy(tensor_parallel_size=1)``).

    Example::

        >>> from pytorch_lightning.strategies import DDPStrategy
        >>> check_strategy(DDPStrategy())  # fine: nothing raised
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    refused = [n for n in _REFUSED if n in names]
    if refused:
        raise ValueError(
            f"PruningScheduleCallback does not support `strategy={type(strategy).__name__}`: it flattens the "
            "parameters. Use a single device, a data-parallel strategy ('ddp', 'ddp_spawn', 'ddp_notebook') or "
            "FSDP2 through `ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1)`."
        )
    if _SHARDED in names:
        mesh = getattr(strategy, "device_mesh", None)
        names_ = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        tp = mesh["tensor_parallel"].size() if mesh is not None and "tensor_parallel" in names_ else 1
        if tp > 1:
            raise ValueError(
                "PruningScheduleCallback supports `ModelParallelStrategy` with `tensor_parallel_size=1` (FSDP2) only, "
                f"got tensor_parallel_size={tp}: tensor parallelism splits parameters along other dimensions."
            )


def check_sharding(method: Any, mask_mode: str, rewinds: bool) -> None:
    """Under FSDP2, refuse before training what cannot work on row shards.

    Raises:
        ValueError: for a method that needs whole tensors, ``mask_mode="hook"`` or rewinding.
    """
    why = None
    if not method.supports_sharding:
        why = (
            f"`method={method.name}` needs whole tensors (structured, neuron and torch's own methods "
            "do); L1, random and importance-function methods work on shards"
        )
    elif mask_mode == "hook":
        why = "`mask_mode='hook'` (torch's reparametrization) cannot wrap sharded DTensor parameters"
    elif rewinds:
        why = "`rewind` would keep each process's shard of the rewind point, which a full checkpoint cannot hold"
    if why:
        raise ValueError(f"PruningScheduleCallback under FSDP2 (ModelParallelStrategy): {why}.")


def is_sharded(strategy: Any) -> bool:
    """Whether each process holds only shards of the parameters (FSDP2 through ``ModelParallelStrategy``)."""
    return _SHARDED in {cls.__name__ for cls in type(strategy).__mro__} and world_size(strategy) > 1


def collective_for(strategy: Any) -> Collective | None:
    """A :class:`~lightning_prune.collective.Collective` over the strategy's processes when they hold shards
    (sums go through ``strategy.reduce``), else ``None``."""
    if not is_sharded(strategy):
        return None
    return Collective(
        reduce=lambda t: strategy.reduce(t, reduce_op="sum"),
        rank=int(strategy.global_rank),
        world_size=world_size(strategy),
    )


def world_size(strategy: Any) -> int:
    """The number of processes of ``strategy`` (1 for a single device)."""
    return int(getattr(strategy, "world_size", 1) or 1)


def _checksum(mask: Any) -> int:
    return zlib.crc32(pack_bits(mask).numpy().tobytes())


def agree_masks(store: MaskStore, targets: list[PruningTarget], strategy: Any) -> bool:
    """Make the masks set since the last :meth:`MaskStore.apply` equal on every rank (rank 0's where any
    differs). Every rank must call it at the same point. Returns whether masks were replaced."""
    if world_size(strategy) <= 1 or store.group is not None:  # shards are decided together, not each alone
        return False
    names = store.pending
    by_name = {t.name: t for t in targets}
    mine = [_checksum(store.mask(by_name[n])) for n in names]
    same = strategy.broadcast(mine, src=0) == mine
    if strategy.reduce_boolean_decision(same, all=True):
        return False
    held = {n: store.mask(by_name[n]) for n in names}
    ours = {n: pack_bits(mask) for n, mask in held.items() if mask is not None}
    theirs = strategy.broadcast(ours, src=0)
    for n, mask in held.items():
        if mask is None:
            continue
        store.replace(by_name[n], unpack_bits(theirs[n], mask.shape).to(mask.device))
    return True
