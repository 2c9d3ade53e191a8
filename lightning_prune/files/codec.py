"""The sparse form of one tensor in memory: a packed bitmask of its nonzero entries and those entries
(:class:`SparseParts`), encoded and decoded on several threads with numpy (:func:`split_sparse`,
:func:`join_sparse`). :mod:`lightning_prune.files.sparse_files` writes it to safetensors files and
:mod:`lightning_prune.files.checkpoint` pickles it in checkpoints; both read it back through here.

Example::

    >>> import torch
    >>> parts = split_sparse({"w": torch.tensor([0.0, 2.0, 0.0, -1.0])})["w"]
    >>> parts.values.tolist(), join_sparse(parts).tolist()
    ([2.0, -1.0], [0.0, 2.0, 0.0, -1.0])
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from lightning_prune.files.packing import PackedMask, pack_bits, packed_size, unpack_bits

__all__ = ["SparseParts", "join_sparse", "split_sparse"]

_CHUNK = 1 << 20
"""Entries a task packs or unpacks: a multiple of 8 (whole bitmask bytes), small enough to stay in cache."""
SPARSE_DTYPES = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
"""The dtypes that take the sparse form, and the integer dtype that shows their entries' bit patterns; the
pattern of ``-0.0`` is that integer dtype's minimum (the sign bit alone)."""
_POPULATED_BYTES = 32 << 20
"""Dense tensors of this size and above are decoded into fresh memory mapped with ``MAP_POPULATE`` (where the
system has it): glibc's ``malloc`` maps memory afresh for every block this large, whose 4 KiB pages would each cost a
page fault (1.5-1.8 us on the 2-CPU development VM, more than decoding the page's entries), where one ``mmap`` call
that populates them costs 1.3-1.5 us a page there. Smaller tensors come from torch's allocator, which may reuse
freed memory. Never numpy's ``zeros``: it asks for transparent huge pages, which a virtual machine that returns free
memory to its host can take a second to hand out (``benchmarks/results/sparse_files.md``)."""
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

_T = TypeVar("_T")


@dataclass(frozen=True)
class SparseParts(PackedMask):
    """One tensor in sparse form: the packed mask of its nonzero entries (a
    :class:`~lightning_prune.files.packing.PackedMask`, as the callback's checkpoints hold pruning masks) and those
    entries.

    Args:
        bits: ``uint8``, ``ceil(numel / 8)`` bytes (:func:`~lightning_prune.files.packing.pack_bits` order), a bit set
            for each entry that is not zero (NaN counts as not zero).
        shape: the tensor's shape.
        values: 1-d, the tensor's dtype: the entries whose bit is set, in row-major order.
        negative_zeros: ``None`` where the tensor has no ``-0.0`` entry (or their sign is dropped), else a second
            bitmask like ``bits``, of the ``-0.0`` entries (so that the tensor comes back bit for bit).
    """

    values: Tensor
    negative_zeros: Tensor | None = None

    @property
    def bitmask(self) -> Tensor:
        """:attr:`bits`: the packed mask of the stored entries."""
        return self.bits

    @property
    def nbytes(self) -> int:
        """Bytes of the bitmasks and the values."""
        extra = 0 if self.negative_zeros is None else self.negative_zeros.numel()
        return self.bitmask.numel() + extra + self.values.numel() * self.values.element_size()


# ---------------------------------------------------------------------------------------------------- threads


def run_jobs(jobs: list[Callable[[], _T]]) -> list[_T]:
    """Run ``jobs`` on ``torch.get_num_threads()`` threads (numpy's packing, comparing and copying release the GIL)."""
    workers = min(len(jobs), torch.get_num_threads())
    if workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def _chunks(numel: int) -> list[tuple[int, int]]:
    return [(start, min(start + _CHUNK, numel)) for start in range(0, numel, _CHUNK)]


def _bits(t: Tensor) -> np.ndarray:
    """The entries of a contiguous CPU tensor of a dtype in ``SPARSE_DTYPES`` as integer bit patterns, flat (a view)."""
    return t.reshape(-1).view(SPARSE_DTYPES[t.dtype]).numpy()


def _negative_zero(bits: np.ndarray) -> Any:
    return np.iinfo(bits.dtype).min


def popcount(packed: np.ndarray) -> int:
    """The number of bits set in a ``uint8`` array (``numpy.bitwise_count`` where numpy has it, numpy >= 2)."""
    counts = np.bitwise_count(packed) if hasattr(np, "bitwise_count") else _POPCOUNT[packed]
    return int(counts.sum(dtype=np.int64))


# ---------------------------------------------------------------------------------------------------- encoding


def _count(bits: np.ndarray) -> tuple[int, int]:
    """(entries that are not zero, ``-0.0`` entries) of a chunk of bit patterns."""
    negative = int(np.count_nonzero(bits == _negative_zero(bits)))
    return int(np.count_nonzero(bits)) - negative, negative


def split_sparse(tensors: Mapping[str, Tensor], *, signed_zeros: bool = True) -> dict[str, Tensor | SparseParts]:
    """Each tensor as :class:`SparseParts` where that is smaller than the tensor, else the tensor itself.

    Only float16, bfloat16, float32 and float64 tensors take the sparse form. The work runs in chunks on
    ``torch.get_num_threads()`` threads: a first pass counts the nonzero and ``-0.0`` entries, a second packs the
    bitmasks and copies the values straight into their final arrays. The parts are computed on the CPU and put on
    the tensor's device.

    Args:
        tensors: the tensors, by name.
        signed_zeros: keep the sign of zeros (a second bitmask where a tensor has ``-0.0`` entries). ``False``
            turns ``-0.0`` into ``+0.0``: equal as numbers, but not bit for bit.

    Example::

        >>> parts = split_sparse({"w": torch.tensor([0.0, 1.5, 0.0, -0.0] * 16), "n": torch.tensor(3)})
        >>> parts["w"].values.tolist()[:2], parts["w"].bitmask.tolist()[:2], parts["w"].negative_zeros.tolist()[:2]
        ([1.5, 1.5], [68, 68], [17, 17])
        >>> parts["n"]
        tensor(3)
    """
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items() if t.dtype in SPARSE_DTYPES and t.numel()}
    bits = {name: _bits(t) for name, t in cpu.items()}
    tasks = [(name, start, stop) for name, b in bits.items() for start, stop in _chunks(b.size)]
    counts = run_jobs([partial(_count, bits[name][start:stop]) for name, start, stop in tasks])

    nnz: dict[str, int] = dict.fromkeys(bits, 0)
    negative: dict[str, int] = dict.fromkeys(bits, 0)
    offsets = []
    for (name, _, _), (count, negative_count) in zip(tasks, counts):
        offsets.append(nnz[name])
        nnz[name] += count
        negative[name] += negative_count
    signs = {name for name in bits if negative[name] and signed_zeros}
    sparse = {
        name
        for name, b in bits.items()
        if packed_size(b.size) * (1 + (name in signs)) + nnz[name] * b.itemsize < b.size * b.itemsize
    }
    bitmasks = {name: np.empty(packed_size(bits[name].size), dtype=np.uint8) for name in sparse}
    negative_zeros = {name: np.empty(packed_size(bits[name].size), dtype=np.uint8) for name in sparse & signs}
    values = {name: np.empty(nnz[name], dtype=bits[name].dtype) for name in sparse}

    def fill(name: str, start: int, stop: int, offset: int, count: int) -> None:
        chunk, packed = bits[name][start:stop], slice(start // 8, packed_size(stop))
        keep = chunk != 0
        if negative[name]:
            is_negative_zero = chunk == _negative_zero(chunk)
            keep ^= is_negative_zero
            if name in negative_zeros:
                negative_zeros[name][packed] = pack_bits(torch.from_numpy(is_negative_zero)).numpy()
        bitmasks[name][packed] = pack_bits(torch.from_numpy(keep)).numpy()
        np.compress(keep, chunk, out=values[name][offset : offset + count])

    fills = [(*task, offset, count) for task, offset, (count, _) in zip(tasks, offsets, counts) if task[0] in sparse]
    run_jobs([partial(fill, *args) for args in fills])

    out: dict[str, Tensor | SparseParts] = {}
    for name, t in tensors.items():
        if name not in sparse:
            out[name] = t
            continue
        negatives = negative_zeros.get(name)
        out[name] = SparseParts(
            torch.from_numpy(bitmasks[name]).to(t.device),
            tuple(t.shape),
            torch.from_numpy(values[name]).view(t.dtype).to(t.device),
            None if negatives is None else torch.from_numpy(negatives).to(t.device),
        )
    return out


# ---------------------------------------------------------------------------------------------------- decoding


def check_parts(parts: SparseParts) -> None:
    """Raise ``ValueError`` where the bitmasks, values and shape do not fit together (sizes, dtypes, padding)."""
    values, shape = parts.values, parts.shape
    numel = torch.Size(shape).numel()
    if values.dtype not in SPARSE_DTYPES or values.dim() != 1 or values.numel() > numel:
        raise ValueError(
            f"the values must be a 1-d float16, bfloat16, float32 or float64 tensor of at most {numel} entries, "
            f"got {values.dtype} of shape {tuple(values.shape)}"
        )
    pad = -numel % 8
    for what, mask in (("bitmask", parts.bitmask), ("negative-zeros bitmask", parts.negative_zeros)):
        if mask is None:
            continue
        if mask.dtype != torch.uint8 or mask.shape != (packed_size(numel),):
            raise ValueError(
                f"the {what} of shape {tuple(shape)} must be {packed_size(numel)} uint8 bytes, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        if pad and int(mask[-1]) & ((1 << pad) - 1):
            raise ValueError(f"the {what} has bits set past the tensor's last entry")


def _set_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """The positions of the ``count`` bits set in ``packed`` (:func:`~lightning_prune.files.packing.pack_bits` order),
    ascending, as int64.

    Where at most one bit in ten is set, only the bytes that hold a set bit are unpacked (a third of the bytes at 95%
    zeros): numpy's ``flatnonzero`` then scans fewer entries, with more ones among them (below 10% ones it takes a
    slower loop that branches on every entry). Denser bitmasks are unpacked whole.
    """
    if count * 10 > packed.size * 8:
        return np.flatnonzero(np.unpackbits(packed).view(np.bool_))
    nonzero = np.flatnonzero(packed != 0)
    bits = np.flatnonzero(np.unpackbits(packed[nonzero]).view(np.bool_))
    positions = nonzero[bits >> 3]
    positions <<= 3
    bits &= 7
    positions |= bits
    return positions


def _chunk_counts(packed: np.ndarray) -> list[int]:
    """The bits set in each chunk's bytes of a bitmask (chunks as :func:`_chunks` makes them)."""
    if not packed.size:
        return []
    counts = np.bitwise_count(packed) if hasattr(np, "bitwise_count") else _POPCOUNT[packed]
    return np.add.reduceat(counts, np.arange(0, packed.size, _CHUNK // 8), dtype=np.int64).tolist()


def _allocate(numel: int, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """A flat tensor for a decoded one (of the integer dtype in ``SPARSE_DTYPES``), and whether it is zeroed."""
    nbytes = numel * dtype.itemsize
    if nbytes < _POPULATED_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return torch.empty(numel, dtype=dtype), False
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return torch.from_numpy(np.frombuffer(pages, dtype=dtype_name(dtype))), True


class CpuDecoder:
    """Decodes the :class:`SparseParts` of one tensor on the CPU in two steps.

    Creating it checks the parts (which makes temporary arrays); :meth:`start` then allocates the dense tensor and
    returns it with the jobs (one a chunk, for :func:`run_jobs`) that fill it, each zeroing its chunk and scattering the
    values into it. :func:`load_sparse` checks every tensor before it allocates any, so that the allocations follow
    one another as ``torch.load``'s do (temporary arrays between them keep glibc's ``malloc`` from reusing memory
    that an earlier load freed).

    Raises:
        ValueError: when the bitmask's bits and the values do not match, or the bitmasks overlap.
    """

    def __init__(self, parts: SparseParts) -> None:
        self.parts = parts
        self.packed = parts.bitmask.numpy()
        self.counts = _chunk_counts(self.packed)
        if sum(self.counts) != parts.values.numel():
            raise ValueError(f"the bitmask has {sum(self.counts)} bits set but there are {parts.values.numel()} values")
        self.negatives = None if parts.negative_zeros is None else parts.negative_zeros.numpy()
        if self.negatives is not None and np.bitwise_and(self.packed, self.negatives).any():
            raise ValueError("the negative-zeros bitmask marks entries that the bitmask marks as not zero")

    def start(self) -> tuple[Tensor, list[Callable[[], None]]]:
        """The dense tensor (its contents undefined until the jobs have run) and the jobs."""
        values, shape, packed, negatives = self.parts.values, self.parts.shape, self.packed, self.negatives
        numel = torch.Size(shape).numel()
        out, zeroed = _allocate(numel, SPARSE_DTYPES[values.dtype])
        bits, src = out.numpy(), _bits(values)

        def fill(start: int, stop: int, offset: int, count: int) -> None:
            packed_slice, target = slice(start // 8, packed_size(stop)), bits[start:stop]
            if negatives is not None and negatives[packed_slice].any():  # -0.0 where set, +0.0 elsewhere
                sign = np.unpackbits(negatives[packed_slice], count=stop - start)
                np.multiply(sign, bits.dtype.type(_negative_zero(bits)), out=target, casting="unsafe")
            elif not zeroed:
                target.fill(0)
            if count:  # indices, not a boolean mask: numpy's boolean assignment branches on every entry
                target[_set_bits(packed[packed_slice], count)] = src[offset : offset + count]

        offsets = np.cumsum([0, *self.counts[:-1]]).tolist()
        jobs: list[Callable[[], None]] = [
            partial(fill, *chunk, o, c) for chunk, o, c in zip(_chunks(numel), offsets, self.counts)
        ]
        return out.view(values.dtype).reshape(shape), jobs


def _decode_torch(parts: SparseParts) -> Tensor:
    """The device-agnostic decoder (``masked_scatter_``), for parts that are not on the CPU."""
    keep = unpack_bits(parts.bitmask, parts.shape).view(torch.bool)
    count = int(keep.sum())
    if count != parts.values.numel():
        raise ValueError(f"the bitmask has {count} bits set but there are {parts.values.numel()} values")
    out = torch.zeros(parts.shape, dtype=parts.values.dtype, device=parts.values.device)
    out.masked_scatter_(keep, parts.values)
    if parts.negative_zeros is not None:
        if parts.bitmask.bitwise_and(parts.negative_zeros).any():
            raise ValueError("the negative-zeros bitmask marks entries that the bitmask marks as not zero")
        bits = out.view(SPARSE_DTYPES[out.dtype])
        bits.masked_fill_(unpack_bits(parts.negative_zeros, parts.shape).view(torch.bool), torch.iinfo(bits.dtype).min)
    return out


def join_sparse(parts: SparseParts) -> Tensor:
    """The dense tensor of :class:`SparseParts`, bit for bit, on the values' device.

    Raises:
        ValueError: when the parts do not fit together: a bitmask's size or padding, or the number of bits the
            bitmask sets, does not match the shape and the values; the values are not a 1-d tensor of a dtype that
            :func:`split_sparse` writes; the two bitmasks overlap.

    Example::

        >>> t = torch.tensor([[0.0, -0.0], [float("nan"), 2.0]], dtype=torch.bfloat16)
        >>> parts = split_sparse({"t": t.repeat(8, 8)})["t"]
        >>> parts.values.numel(), parts.negative_zeros is not None
        (128, True)
        >>> torch.equal(join_sparse(parts).view(torch.int16), t.repeat(8, 8).view(torch.int16))
        True
    """
    check_parts(parts)
    device = parts.values.device
    bitmask = parts.bitmask.reshape(-1).to(device)
    negatives = None if parts.negative_zeros is None else parts.negative_zeros.reshape(-1).to(device)
    parts = SparseParts(bitmask, tuple(parts.shape), parts.values, negatives)
    if device.type != "cpu":
        return _decode_torch(parts)
    out, jobs = CpuDecoder(parts).start()
    run_jobs(jobs)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
