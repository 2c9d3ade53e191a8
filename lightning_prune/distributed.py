"""Several processes: identical masks on every rank, and the strategies pruning cannot work under.

Masks are decided on every rank from the same weights (DDP keeps them identical) with random scores drawn
from generators seeded by the callback's ``seed`` and step index, so ranks agree by construction.
:func:`broadcast_masks` then copies rank 0's masks to every rank after each pruning step, so that they
agree even where that construction would not hold (a custom method that reads the global RNG, weights
that drifted through nondeterministic kernels).

Sharded strategies (FSDP, DeepSpeed, ``ModelParallelStrategy``) flatten or shard the parameters, which
torch's pruning reparametrization (``<name>_orig``, ``<name>_mask``, a forward pre-hook on the module)
cannot wrap as they are: :func:`check_strategy` refuses them before training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_prune.inplace import InplaceMasks
from lightning_prune.masking import refresh_weight
from lightning_prune.selection import PruningTarget

__all__ = ["broadcast_inplace_masks", "broadcast_masks", "check_strategy"]


def _sharded_strategies() -> tuple[type, ...]:
    classes: list[type] = []
    for package in ("pytorch_lightning.strategies", "lightning.pytorch.strategies"):
        try:
            module = __import__(package, fromlist=["FSDPStrategy"])
        except ImportError:  # pragma: no cover - depends on the environment
            continue
        for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                classes.append(cls)
    return tuple(classes)


def check_strategy(strategy: Any) -> None:
    """Raise before training under a sharded strategy, whose parameters torch's pruning cannot wrap.

    Raises:
        ValueError: for FSDP, DeepSpeed and ``ModelParallelStrategy``; the message names the strategy and
            the ones that work (single device, ``ddp``, ``ddp_spawn``, ``ddp_notebook``).

    Example::

        >>> from pytorch_lightning.strategies import DDPStrategy
        >>> check_strategy(DDPStrategy())  # fine: nothing raised
    """
    sharded = _sharded_strategies()
    if sharded and isinstance(strategy, sharded):
        raise ValueError(
            f"PruningScheduleCallback does not support `strategy={type(strategy).__name__}`: it shards or flattens "
            "the parameters, which torch's pruning reparametrization (`<name>_orig`, `<name>_mask`, a forward "
            "pre-hook) cannot wrap. Use a single device or a data-parallel strategy ('ddp', 'ddp_spawn', "
            "'ddp_notebook')."
        )


def broadcast_masks(targets: Sequence[PruningTarget], src: int = 0) -> bool:
    """Copy rank ``src``'s masks to every rank, in place, and refresh the masked attributes.

    Does nothing (and returns ``False``) unless ``torch.distributed`` is initialized with more than one
    process. Every rank must call it at the same point, with the same targets in the same order.
    """
    if not _several_processes():
        return False
    for t in targets:
        mask = t.mask
        if mask is None:
            continue
        dist.broadcast(mask, src=src)
        refresh_weight(t)
    return True


def broadcast_inplace_masks(masks: InplaceMasks, src: int = 0) -> bool:
    """:func:`broadcast_masks` for the masks that ``mask_mode="inplace"`` keeps beside plain parameters:
    copy rank ``src``'s masks and the parameters they mask to every rank. The parameters travel too: a
    rank whose own step pruned other entries has zeroed them in place, and only rank ``src`` still holds
    the values of the entries that its masks keep (the ranks of a data-parallel run hold equal values)."""
    if not _several_processes():
        return False
    with torch.no_grad():
        for param, mask in masks.parameters_and_masks():
            dist.broadcast(mask, src=src)
            dist.broadcast(param.data, src=src)
    return True


def _several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
