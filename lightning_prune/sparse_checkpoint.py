"""A permanent alias: checkpoints written by :class:`~lightning_prune.SparseCheckpointIO` (0.2 on) name
``lightning_prune.sparse_checkpoint._rebuild_from_bitmask_v1`` in their pickle, so this module keeps that name
loadable. The code lives in :mod:`lightning_prune.files.checkpoint`."""

from lightning_prune.files.checkpoint import _rebuild_from_bitmask_v1

__all__ = ["_rebuild_from_bitmask_v1"]
