"""Sparse weight files: a pruned model's ``state_dict`` in a safetensors file that is really smaller.

:func:`save_sparse` writes a `safetensors <https://github.com/huggingface/safetensors>`_ file (never pickle, so it is
safe to download and open). Each floating tensor that holds zeros is stored as a bitmask of its nonzero entries
(packed eight a byte by :func:`~lightning_prune.files.packing.pack_bits`) plus its nonzero values, in order, as a 1-d
tensor of its own dtype. A tensor keeps that form only where it is smaller than the dense one (bitmask and values
bytes below the dense bytes; for float32 above about 3% zeros, for bfloat16 and float16 above about 6%); every
other tensor (integer and bool buffers, tensors without zeros, 0-d tensors) is stored as it is. Tensors that share
storage (tied weights) are stored once.

:func:`load_sparse` returns a plain ``state_dict``, bit for bit the one saved (``-0.0``, NaN payloads and
infinities included: the bitmask marks the entries whose bit pattern is not that of ``+0.0``), in the order saved,
with tied keys as one tensor object, so that ``model.load_state_dict(load_sparse(path), strict=True)`` works on a
freshly built model. :func:`load_sparse_into` does that and names the file when the model does not fit.

The file's header records the layout in its ``__metadata__``: ``"lightning_prune.sparse": "1"`` marks the format, and
``"lightning_prune.tensors"`` is a JSON list with one entry a tensor, in ``state_dict`` order: ``name``, ``format``
(``"dense"``, ``"sparse"`` or ``"alias"``), ``dtype``, ``shape``, ``nnz`` (sparse) or ``of`` (alias). A dense tensor
is stored under its name, a sparse one as ``<name>:bitmask`` (uint8) and ``<name>:values``. Any safetensors reader
can open the file; :func:`load_sparse` also loads a plain safetensors file (one without the marker) as it is.

Example::

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(100, 100), nn.BatchNorm1d(100))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(torch.rand(100, 100) > 0.95)  # 95% zeros, about half of them -0.0
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> info = save_sparse(model, path, metadata={"run": "demo"})
    >>> info.formats["0.weight"], info.formats["0.bias"], info.formats["1.num_batches_tracked"]
    ('sparse', 'dense', 'dense')
    >>> info.file_bytes < 0.2 * info.dense_bytes
    True
    >>> fresh = nn.Sequential(nn.Linear(100, 100), nn.BatchNorm1d(100))
    >>> load_sparse_into(fresh, path)
    <All keys matched successfully>
    >>> torch.equal(fresh[0].weight, model[0].weight)
    True
"""

from __future__ import annotations

import json
import mmap
import os
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_prune.files.atomic import atomic_write
from lightning_prune.files.packing import PackedMask, pack_bits, packed_size, unpack_bits

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "SparseFileInfo",
    "SparseParts",
    "TensorFormat",
    "find_aliases",
    "inspect_sparse",
    "join_sparse",
    "load_sparse",
    "load_sparse_into",
    "save_sparse",
    "split_sparse",
]

FORMAT_KEY = "lightning_prune.sparse"
"""The ``__metadata__`` key that marks a sparse file; its value is :data:`FORMAT_VERSION`."""
FORMAT_VERSION = "1"
_TENSORS_KEY = "lightning_prune.tensors"
_RESERVED_PREFIX = "lightning_prune."
_BITMASK, _VALUES, _NEGATIVE_ZEROS = ":bitmask", ":values", ":negative_zeros"

TensorFormat = Literal["dense", "sparse", "alias"]
_FORMATS: tuple[str, ...] = ("dense", "sparse", "alias")

_CHUNK = 1 << 20
"""Entries a task packs or unpacks: a multiple of 8 (whole bitmask bytes), small enough to stay in cache."""
_BITS_DTYPE = {
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

_PathLike = Union[str, "os.PathLike[str]"]
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


@dataclass(frozen=True)
class SparseFileInfo:
    """What :func:`save_sparse` wrote (or :func:`inspect_sparse` read): sizes and each tensor's format.

    Args:
        path: the file.
        file_bytes: the file's size.
        dense_bytes: the bytes of the tensors' data stored dense (tied tensors once).
        formats: each ``state_dict`` key's format, in order.
        metadata: the caller's metadata (without the format's own keys).
    """

    path: str
    file_bytes: int
    dense_bytes: int
    formats: dict[str, TensorFormat]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``file_bytes / dense_bytes`` (``inf`` when there is no tensor data)."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else float("inf")


# ---------------------------------------------------------------------------------------------------- threads


def _run(jobs: list[Callable[[], _T]]) -> list[_T]:
    """Run ``jobs`` on ``torch.get_num_threads()`` threads (numpy's packing, comparing and copying release the GIL)."""
    workers = min(len(jobs), torch.get_num_threads())
    if workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def _chunks(numel: int) -> list[tuple[int, int]]:
    return [(start, min(start + _CHUNK, numel)) for start in range(0, numel, _CHUNK)]


def _bits(t: Tensor) -> np.ndarray:
    """The entries of a contiguous CPU tensor of a dtype in ``_BITS_DTYPE`` as integer bit patterns, flat (a view)."""
    return t.reshape(-1).view(_BITS_DTYPE[t.dtype]).numpy()


def _negative_zero(bits: np.ndarray) -> Any:
    return np.iinfo(bits.dtype).min


def _popcount(packed: np.ndarray) -> int:
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
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items() if t.dtype in _BITS_DTYPE and t.numel()}
    bits = {name: _bits(t) for name, t in cpu.items()}
    tasks = [(name, start, stop) for name, b in bits.items() for start, stop in _chunks(b.size)]
    counts = _run([partial(_count, bits[name][start:stop]) for name, start, stop in tasks])

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
    _run([partial(fill, *args) for args in fills])

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


def _check_parts(parts: SparseParts) -> None:
    """Raise ``ValueError`` where the bitmasks, values and shape do not fit together (sizes, dtypes, padding)."""
    values, shape = parts.values, parts.shape
    numel = torch.Size(shape).numel()
    if values.dtype not in _BITS_DTYPE or values.dim() != 1 or values.numel() > numel:
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
    """A flat tensor for a decoded one (of the integer dtype in ``_BITS_DTYPE``), and whether it is zeroed."""
    nbytes = numel * dtype.itemsize
    if nbytes < _POPULATED_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return torch.empty(numel, dtype=dtype), False
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return torch.from_numpy(np.frombuffer(pages, dtype=_dtype_name(dtype))), True


class _CpuDecoder:
    """Decodes the :class:`SparseParts` of one tensor on the CPU in two steps.

    Creating it checks the parts (which makes temporary arrays); :meth:`start` then allocates the dense tensor and
    returns it with the jobs (one a chunk, for :func:`_run`) that fill it, each zeroing its chunk and scattering the
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
        out, zeroed = _allocate(numel, _BITS_DTYPE[values.dtype])
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
        bits = out.view(_BITS_DTYPE[out.dtype])
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
    _check_parts(parts)
    device = parts.values.device
    bitmask = parts.bitmask.reshape(-1).to(device)
    negatives = None if parts.negative_zeros is None else parts.negative_zeros.reshape(-1).to(device)
    parts = SparseParts(bitmask, tuple(parts.shape), parts.values, negatives)
    if device.type != "cpu":
        return _decode_torch(parts)
    out, jobs = _CpuDecoder(parts).start()
    _run(jobs)
    return out


# ---------------------------------------------------------------------------------------------------- state dicts


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"`metadata` must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"`metadata` must be a dict of str to str, got {key!r}: {value!r}")
        if key.startswith(_RESERVED_PREFIX):
            raise ValueError(f"`metadata` keys starting with {_RESERVED_PREFIX!r} are reserved, got {key!r}")
    return dict(metadata)


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if not isinstance(model_or_state_dict, Mapping):
        raise ValueError(
            f"`model_or_state_dict` must be an nn.Module or a mapping of str to Tensor, "
            f"got {type(model_or_state_dict).__name__}"
        )
    for key, t in model_or_state_dict.items():
        if not isinstance(key, str) or not isinstance(t, Tensor):
            raise ValueError(f"`model_or_state_dict` must map str to Tensor, got {key!r}: {type(t).__name__}")
        if t.layout != torch.strided or t.is_meta:
            raise ValueError(f"`model_or_state_dict`[{key!r}] must be a dense tensor with data, got {t.layout} {t}")
    return dict(model_or_state_dict)


def _view_key(t: Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def find_aliases(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, str], set[str]]:
    """Tied tensors: ``{key: first key that is the same view of the same storage}``, and the keys that share storage
    with an earlier key in another way (overlapping or not), which must be copied to be stored on their own."""
    first: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    aliases, shared = {}, set()
    for key, t in state_dict.items():
        if not t.numel():
            continue
        view, storage = _view_key(t), (t.device, t.untyped_storage().data_ptr())
        if view in first:
            aliases[key] = first[view]
            continue
        first[view] = key
        if storage in storages:
            shared.add(key)
        storages.add(storage)
    return aliases, shared


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_sparse(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: _PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    signed_zeros: bool = True,
) -> SparseFileInfo:
    """Write a model's ``state_dict`` (or a ``state_dict``) to a safetensors file, each tensor dense or sparse.

    The file is written beside ``path`` and renamed over it once it is complete and on disk: a failed write leaves
    the previous file at ``path`` as it was, and no temporary file.

    Args:
        model_or_state_dict: an ``nn.Module`` (its ``state_dict()`` is saved) or a mapping of str to dense tensors
            on any device.
        path: the file to write (its folder must exist).
        metadata: str to str pairs for the file's header (keys starting with ``"lightning_prune."`` are reserved).
        signed_zeros: keep ``-0.0`` entries bit for bit (default). Pruning by multiplication (``weight * mask``, as
            torch's pruning does) leaves ``-0.0`` wherever the pruned weight was negative, and keeping their signs
            costs one more bit an entry in those tensors; ``False`` writes them as ``+0.0`` (equal as numbers and
            under ``torch.equal``, not bit for bit).

    Returns:
        The file's size and each tensor's format.

    Raises:
        ValueError: for a value that is not a dense tensor, metadata that is not str to str or uses a reserved key,
            or a key that clashes with the stored name of another tensor's parts (``<key>:bitmask``).
        OSError: naming ``path``, when the file cannot be written (a missing folder, no permission, a full disk).

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> w = torch.zeros(64, 64)
        >>> w[0, :8] = 1.0
        >>> info = save_sparse({"w": w, "tied": w, "step": torch.tensor(7)}, path)
        >>> info.formats
        {'w': 'sparse', 'tied': 'alias', 'step': 'dense'}
        >>> loaded = load_sparse(path)
        >>> list(loaded), loaded["w"] is loaded["tied"], int(loaded["w"].count_nonzero())
        (['w', 'tied', 'step'], True, 8)
    """
    user_metadata = _check_metadata(metadata)
    state = _state_dict(model_or_state_dict)
    if "__metadata__" in state:
        raise ValueError("`model_or_state_dict` may not have the key '__metadata__' (safetensors reserves it)")
    aliases, shared = find_aliases(state)
    own = {key: t.detach().clone() if key in shared else t.detach() for key, t in state.items() if key not in aliases}
    parts = split_sparse(own, signed_zeros=signed_zeros)
    stored = {key: _stored(key, part) for key, part in parts.items()}
    names = Counter(name for tensors in stored.values() for name in tensors)
    clashes = sorted(name for name, count in names.items() if count > 1)
    if clashes:
        raise ValueError(f"`model_or_state_dict` has keys that clash with the stored parts of others: {clashes}")

    entries: list[dict[str, Any]] = []
    for key, t in state.items():
        entry: dict[str, Any] = {"name": key, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if key in aliases:
            entry.update(format="alias", of=aliases[key])
        elif isinstance(part := parts[key], SparseParts):
            negatives = 0 if part.negative_zeros is None else _popcount(part.negative_zeros.numpy())
            entry.update(format="sparse", nnz=part.values.numel(), negative_zeros=negatives)
        else:
            entry.update(format="dense")
        entries.append(entry)

    header = {**user_metadata, FORMAT_KEY: FORMAT_VERSION, _TENSORS_KEY: json.dumps(entries)}
    tensors = {n: t for tensors in stored.values() for n, t in tensors.items()}
    atomic_write(path, partial(save_file, tensors, metadata=header), errors=(SafetensorError,))
    return _info(path, entries, user_metadata)


def _stored(key: str, part: Tensor | SparseParts) -> dict[str, Tensor]:
    """The tensors that the file holds for ``key``, by their names in the file (on the CPU, contiguous)."""
    if not isinstance(part, SparseParts):
        return {key: part.cpu().contiguous()}
    stored = {key + _BITMASK: part.bitmask.cpu(), key + _VALUES: part.values.cpu()}
    if part.negative_zeros is not None:
        stored[key + _NEGATIVE_ZEROS] = part.negative_zeros.cpu()
    return stored


def _info(path: _PathLike, entries: list[dict[str, Any]], metadata: dict[str, str]) -> SparseFileInfo:
    dense = sum(
        torch.Size(e["shape"]).numel() * getattr(torch, e["dtype"]).itemsize for e in entries if e["format"] != "alias"
    )
    formats = {e["name"]: e["format"] for e in entries}
    return SparseFileInfo(os.fspath(path), os.path.getsize(path), dense, formats, metadata)


# ---------------------------------------------------------------------------------------------------- reading


class _Reader:
    """An open safetensors file (a context manager) whose errors name the file (``ValueError``).

    Its tensors are views of the file's memory map: copy those that are kept (:meth:`tensor` with ``device``).
    """

    def __init__(self, path: _PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No sparse file at {self.path}")
        try:
            self.file = safe_open(self.path, framework="pt", device="cpu")
        except SafetensorError as err:
            raise self.error(f"is not a readable safetensors file ({err})") from err
        self.metadata: dict[str, str] = self.file.metadata() or {}
        self.keys: list[str] = list(self.file.keys())

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.__exit__(None, None, None)

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.path} {what}")

    def shape(self, name: str) -> list[int]:
        if name not in self.keys:
            raise self.error(f"lacks the tensor {name!r} that its metadata lists")
        return list(self.file.get_slice(name).get_shape())

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Tensor:
        """The stored tensor ``name``; with ``dtype``, check that it is stored with that dtype; with ``device``, a copy
        there (else a view of the memory map, valid while the file is open and unchanged)."""
        t = self.file.get_tensor(name)
        if dtype is not None and t.dtype != dtype:
            raise self.error(f"has corrupt metadata: {name!r} is stored as {t.dtype}, its metadata says {dtype}")
        return t if device is None else t.to(device, copy=True)


def _entries(reader: _Reader) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The checked entries of a sparse file, and the caller's metadata."""
    metadata = reader.metadata
    if metadata[FORMAT_KEY] != FORMAT_VERSION:
        raise reader.error(f"is sparse format version {metadata[FORMAT_KEY]!r}; this version reads {FORMAT_VERSION!r}")
    try:
        entries = json.loads(metadata[_TENSORS_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise reader.error(f"has corrupt metadata: {_TENSORS_KEY!r} is missing or not JSON ({err})") from err
    if not isinstance(entries, list):
        raise reader.error(f"has corrupt metadata: {_TENSORS_KEY!r} must be a list, got {type(entries).__name__}")
    seen: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for entry in entries:
        _check_entry(reader, entry, seen)
        seen[entry["name"]] = entry
        used.update(_file_names(entry))
    extra = sorted(set(reader.keys) - used)
    if extra:
        raise reader.error(f"has corrupt metadata: tensors {extra} are in the file but not in its metadata")
    user = {k: v for k, v in metadata.items() if not k.startswith(_RESERVED_PREFIX)}
    return entries, user


def _file_names(entry: dict[str, Any]) -> list[str]:
    """The names in the file of the tensors that hold a checked entry."""
    name = entry["name"]
    if entry["format"] == "dense":
        return [name]
    if entry["format"] == "alias":
        return []
    return [name + _BITMASK, name + _VALUES] + ([name + _NEGATIVE_ZEROS] if entry["negative_zeros"] else [])


def _check_entry(reader: _Reader, entry: Any, seen: dict[str, dict[str, Any]]) -> None:
    def corrupt(what: str) -> ValueError:
        return reader.error(f"has corrupt metadata: {what} (entry {entry!r})")

    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or entry.get("format") not in _FORMATS:
        raise corrupt(f"each entry needs a str 'name' and a 'format' in {list(_FORMATS)}")
    name, shape, dtype = entry["name"], entry.get("shape"), getattr(torch, str(entry.get("dtype")), None)
    if name in seen:
        raise corrupt(f"{name!r} is listed twice")
    if not isinstance(dtype, torch.dtype):
        raise corrupt(f"{entry.get('dtype')!r} is not a torch dtype")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise corrupt("'shape' must be a list of non-negative ints")
    numel = torch.Size(shape).numel()
    if entry["format"] == "alias":
        target = seen.get(entry.get("of"))  # type: ignore[arg-type]
        if (
            target is None
            or target["format"] == "alias"
            or (target["dtype"], target["shape"]) != (entry["dtype"], shape)
        ):
            raise corrupt("an alias must name an earlier stored tensor of the same dtype and shape")
    elif entry["format"] == "dense":
        if reader.shape(name) != shape:
            raise corrupt(f"the stored tensor has shape {reader.shape(name)}")
    else:
        nnz, negatives = entry.get("nnz"), entry.get("negative_zeros")
        if dtype not in _BITS_DTYPE or not isinstance(nnz, int) or not isinstance(negatives, int):
            raise corrupt(
                f"a sparse tensor must be of a dtype in {[_dtype_name(d) for d in _BITS_DTYPE]} with int counts"
            )
        if not (0 <= nnz <= numel and 0 <= negatives <= numel - nnz):
            raise corrupt(f"'nnz' and 'negative_zeros' must be in [0, {numel}] with a sum of at most {numel}")
        if reader.shape(name + _VALUES) != [nnz]:
            raise corrupt(f"the values have shape {reader.shape(name + _VALUES)}, not [{nnz}]")
        for mask in _file_names(entry)[::2]:
            if reader.shape(mask) != [packed_size(numel)]:
                raise corrupt(f"{mask!r} has shape {reader.shape(mask)}, not [{packed_size(numel)}]")


def inspect_sparse(path: _PathLike) -> SparseFileInfo:
    """The sizes and tensor formats of a file that :func:`save_sparse` wrote, from its header alone.

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        ValueError: when the file is not a readable safetensors file, not a sparse file (no
            ``"lightning_prune.sparse"`` marker), or its metadata is corrupt; the message names the file.
    """
    with _Reader(path) as reader:
        if FORMAT_KEY not in reader.metadata:
            raise reader.error(f"is a safetensors file without the {FORMAT_KEY!r} marker, not a sparse file")
        entries, user = _entries(reader)
    return _info(path, entries, user)


def load_sparse(path: _PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The ``state_dict`` that :func:`save_sparse` wrote: plain tensors, bit for bit, in the order saved.

    Tied keys come back as one tensor object. A safetensors file without the ``"lightning_prune.sparse"`` marker
    (any plain safetensors file) is loaded as it is, in the file's key order.

    Args:
        path: the file.
        device: where the tensors go (they are decoded on the CPU).

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        ValueError: naming the file, when it is not a safetensors file, is truncated, or its metadata or parts are
            inconsistent (a shape or dtype that does not match the stored tensor, a values count that is not the
            bitmask's number of set bits, an unknown format version).

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> w = torch.tensor([[0.0, -0.0, 1.0, float("inf")]] * 8, dtype=torch.float16)
        >>> _ = save_sparse({"w": w}, path)
        >>> torch.equal(load_sparse(path)["w"].view(torch.int16), w.view(torch.int16))
        True
    """
    with _Reader(path) as reader:
        if FORMAT_KEY not in reader.metadata:
            return {key: reader.tensor(key, device=device) for key in reader.keys}
        entries, _ = _entries(reader)
        sparse = [e for e in entries if e["format"] == "sparse"]
        decoders = dict(zip((e["name"] for e in sparse), _run([partial(_read_sparse, reader, e) for e in sparse])))
        out: dict[str, Tensor] = {}
        on_cpu, jobs = torch.device(device).type == "cpu", []
        for entry in entries:
            name = entry["name"]
            if entry["format"] == "alias":
                out[name] = out[entry["of"]]
            elif entry["format"] == "dense":
                out[name] = reader.tensor(name, getattr(torch, entry["dtype"]), device)
            elif on_cpu:  # decoded below, the chunks of all tensors on one set of threads
                out[name], decode = decoders[name].start()
                jobs += decode
            else:  # one at a time, so that at most one dense tensor waits on the CPU
                out[name], decode = decoders[name].start()
                _run(decode)
                out[name] = out[name].to(device)
        _run(jobs)  # while the file is open: the values are views of its memory map
        return out


def _read_sparse(reader: _Reader, entry: dict[str, Any]) -> _CpuDecoder:
    """The decoder of a sparse tensor of the file, its parts checked."""
    name, dtype = entry["name"], getattr(torch, entry["dtype"])
    bitmask, values = reader.tensor(name + _BITMASK, torch.uint8), reader.tensor(name + _VALUES, dtype)
    negatives = reader.tensor(name + _NEGATIVE_ZEROS, torch.uint8) if entry["negative_zeros"] else None
    try:
        if negatives is not None and _popcount(negatives.numpy()) != entry["negative_zeros"]:
            raise ValueError(f"the negative-zeros bitmask does not set {entry['negative_zeros']} bits")
        parts = SparseParts(bitmask, tuple(entry["shape"]), values, negatives)
        _check_parts(parts)
        return _CpuDecoder(parts)
    except ValueError as err:
        raise reader.error(f"has a corrupt sparse tensor {name!r}: {err}") from err


def load_sparse_into(model: nn.Module, path: _PathLike, *, strict: bool = True) -> Any:
    """``model.load_state_dict(load_sparse(path), strict=strict)``, on the device of the model's first tensor.

    Returns:
        What ``load_state_dict`` returns (the missing and unexpected keys).

    Raises:
        ValueError: naming the file, when :func:`load_sparse` does, or when the file's tensors do not fit ``model``
            (missing or unexpected keys with ``strict=True``, other shapes); torch's message follows.
    """
    first = next(iter(model.state_dict().values()), None)
    state = load_sparse(path, device=first.device if first is not None else "cpu")
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ValueError(f"{os.fspath(path)} does not fit {type(model).__name__}: {err}") from err
