"""The part of a tensor this process holds: FSDP2 shards a parameter's rows (dim 0) across processes as
``DTensor``s; every other tensor is whole here."""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["local_view", "shard_offset"]


def shard_offset(tensor: Tensor) -> int:
    """Where this process's part of ``tensor`` starts in its row-major flattening: 0 for a plain tensor; for a
    ``DTensor`` sharded on dim 0 (FSDP2), the first local row times the row size (FSDP2 splits rows as
    ``torch.chunk`` does)."""
    if not isinstance(tensor, DTensor):
        return 0
    mesh = tensor.device_mesh
    rows = tensor.shape[0]
    per_rank = -(-rows // mesh.size())
    first = min(mesh.get_local_rank() * per_rank, rows)
    return first * (tensor.numel() // max(rows, 1))


def local_view(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: the local shard of a ``DTensor`` (FSDP2), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
