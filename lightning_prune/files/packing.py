"""Bit-packed masks: eight entries a byte, the one format of masks in checkpoints and sparse files.

A mask is any tensor whose nonzero entries are kept (1) and whose zeros are pruned (0). :func:`pack_bits`
stores it as ``ceil(numel / 8)`` bytes, most significant bit first (``numpy.packbits`` order), over the
row-major flattening of the tensor; :func:`unpack_bits` needs the shape to undo it. :class:`PackedMask` holds the
two together: the callback's checkpoint state keeps each mask as one, and a tensor in a sparse file
(:class:`~lightning_prune.files.sparse_files.SparseParts`) is one (the mask of its nonzero entries) with its values.

Example::

    >>> import torch
    >>> mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.uint8)
    >>> packed = pack_bits(mask)
    >>> packed.tolist(), packed.dtype
    ([184, 128], torch.uint8)
    >>> torch.equal(unpack_bits(packed, mask.shape), mask)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PackedMask", "pack_bits", "packed_size", "unpack_bits"]

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``numel`` entries."""
    return (numel + 7) // 8


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a mask (nonzero = kept) into a flat ``uint8`` tensor of ``ceil(numel / 8)`` bytes, on the CPU.

    The packing itself is ``numpy.packbits`` (vectorised C, and it releases the GIL, so that threads can pack
    chunks side by side); a mask on another device is compared with zero there and moved as one byte an entry.
    """
    flat = mask.detach().reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat.ne(0)
    return torch.from_numpy(np.packbits(flat.cpu().numpy()))


def unpack_bits(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:
    """The ``uint8`` mask (0/1) of ``shape`` that :func:`pack_bits` packed, on ``packed``'s device.

    Raises:
        ValueError: when ``packed`` is not ``uint8`` or does not hold ``ceil(numel / 8)`` bytes for ``shape``.
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(numel):
        raise ValueError(
            f"A packed mask of shape {tuple(shape)} is {packed_size(numel)} uint8 bytes, "
            f"got {packed.numel()} {packed.dtype} entries."
        )
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.reshape(-1).numpy(), count=numel)).reshape(shape)
    bits = packed.reshape(-1, 1).bitwise_right_shift(_SHIFTS.to(packed.device)).bitwise_and_(1)
    return bits.reshape(-1)[:numel].reshape(shape).contiguous()


@dataclass(frozen=True)
class PackedMask:
    """A mask, bit-packed: ``bits`` (:func:`pack_bits` of it) and the ``shape`` that :func:`unpack_bits` needs.

    Example::

        >>> packed = PackedMask.of(torch.tensor([[1, 0], [0, 1]]))
        >>> packed.to_state()
        {'shape': [2, 2], 'bits': tensor([144], dtype=torch.uint8)}
        >>> PackedMask.from_state(packed.to_state()).unpack().tolist()
        [[1, 0], [0, 1]]
    """

    bits: Tensor
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: Tensor) -> PackedMask:
        return cls(pack_bits(mask), tuple(mask.shape))

    def unpack(self) -> Tensor:
        """The ``uint8`` mask (0/1), on the device of :attr:`bits`."""
        return unpack_bits(self.bits, self.shape)

    def to_state(self) -> dict[str, Any]:
        """``{"shape": [...], "bits": ...}``: the form of a mask in the callback's checkpoint state."""
        return {"shape": list(self.shape), "bits": self.bits}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PackedMask:
        return cls(state["bits"], tuple(state["shape"]))
