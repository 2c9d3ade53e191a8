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
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_prune.files.atomic import atomic_write
from lightning_prune.files.codec import (
    SPARSE_DTYPES,
    CpuDecoder,
    SparseParts,
    check_parts,
    dtype_name,
    popcount,
    run_jobs,
    split_sparse,
)
from lightning_prune.files.packing import packed_size

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "SparseFileInfo",
    "TensorFormat",
    "find_aliases",
    "inspect_sparse",
    "load_sparse",
    "load_sparse_into",
    "save_sparse",
]

FORMAT_KEY = "lightning_prune.sparse"
"""The ``__metadata__`` key that marks a sparse file; its value is :data:`FORMAT_VERSION`."""
FORMAT_VERSION = "1"
_TENSORS_KEY = "lightning_prune.tensors"
_RESERVED_PREFIX = "lightning_prune."
_BITMASK, _VALUES, _NEGATIVE_ZEROS = ":bitmask", ":values", ":negative_zeros"

TensorFormat = Literal["dense", "sparse", "alias"]
_FORMATS: tuple[str, ...] = ("dense", "sparse", "alias")

_PathLike = Union[str, "os.PathLike[str]"]


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
        entry: dict[str, Any] = {"name": key, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        if key in aliases:
            entry.update(format="alias", of=aliases[key])
        elif isinstance(part := parts[key], SparseParts):
            negatives = 0 if part.negative_zeros is None else popcount(part.negative_zeros.numpy())
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
        if dtype not in SPARSE_DTYPES or not isinstance(nnz, int) or not isinstance(negatives, int):
            raise corrupt(
                f"a sparse tensor must be of a dtype in {[dtype_name(d) for d in SPARSE_DTYPES]} with int counts"
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
        decoders = dict(zip((e["name"] for e in sparse), run_jobs([partial(_read_sparse, reader, e) for e in sparse])))
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
                run_jobs(decode)
                out[name] = out[name].to(device)
        run_jobs(jobs)  # while the file is open: the values are views of its memory map
        return out


def _read_sparse(reader: _Reader, entry: dict[str, Any]) -> CpuDecoder:
    """The decoder of a sparse tensor of the file, its parts checked."""
    name, dtype = entry["name"], getattr(torch, entry["dtype"])
    bitmask, values = reader.tensor(name + _BITMASK, torch.uint8), reader.tensor(name + _VALUES, dtype)
    negatives = reader.tensor(name + _NEGATIVE_ZEROS, torch.uint8) if entry["negative_zeros"] else None
    try:
        if negatives is not None and popcount(negatives.numpy()) != entry["negative_zeros"]:
            raise ValueError(f"the negative-zeros bitmask does not set {entry['negative_zeros']} bits")
        parts = SparseParts(bitmask, tuple(entry["shape"]), values, negatives)
        check_parts(parts)
        return CpuDecoder(parts)
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
