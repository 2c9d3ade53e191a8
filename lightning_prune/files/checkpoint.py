"""Lightning checkpoints whose model weights shrink as the model is pruned.

:class:`SparseCheckpointIO` is a ``CheckpointIO`` plugin (``Trainer(plugins=[SparseCheckpointIO()])``, for the
``pytorch_lightning`` and the ``lightning.pytorch`` Trainer alike). It writes the usual ``.ckpt`` file with
``torch.save``, one file as always, except that each floating tensor of ``checkpoint["state_dict"]`` that holds
enough zeros is pickled in the sparse form of :mod:`lightning_prune.files.sparse_files` (a packed bitmask and the
nonzero values; ``-0.0`` kept), where tensors that do not gain stay as they are. Everything else in the checkpoint
(optimizer states, loops, callbacks, hyperparameters) is written as Lightning writes it.

Reading needs no step of its own: each sparse tensor is pickled as a call of
``lightning_prune.sparse_checkpoint._rebuild_from_bitmask_v1`` (the name files hold since 0.2, kept by a
permanent alias module), so ``torch.load`` hands back plain dense tensors,
bit for bit the ones saved. That makes every reader of the file work as with Lightning's default files: resuming
(``fit(ckpt_path=...)``), ``validate``/``test``/``predict(ckpt_path=...)``, ``LightningModule.load_from_checkpoint``,
with or without the plugin, and ``torch.load``, on one condition: ``lightning_prune`` must be installed. The rebuild
function is an allowed global of ``torch.load(weights_only=True)`` (torch's default) once ``lightning_prune`` has
been imported (importing it registers the function with ``torch.serialization.add_safe_globals``). A process that
has not imported it gets torch's ``UnpicklingError`` naming the function unless it passes ``weights_only=False``
(then pickle imports ``lightning_prune`` by itself). Where ``lightning_prune`` is not installed at all, the file
cannot be read; convert it beforehand with :func:`save_dense_checkpoint`.

Example::

    >>> import os, tempfile, torch
    >>> io = SparseCheckpointIO()
    >>> weight = torch.zeros(256, 256)
    >>> weight[0] = 1.0
    >>> path = os.path.join(tempfile.mkdtemp(), "last.ckpt")
    >>> io.save_checkpoint({"state_dict": {"layer.weight": weight}, "global_step": 7}, path)
    >>> os.path.getsize(path) < weight.numel() * 4 / 20
    True
    >>> checkpoint = torch.load(path)  # plain tensors, no plugin needed
    >>> torch.equal(checkpoint["state_dict"]["layer.weight"], weight), checkpoint["global_step"]
    (True, 7)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_prune._utils.lightning import TorchCheckpointIOBase, register_checkpoint_io
from lightning_prune.files.atomic import save_torch
from lightning_prune.files.codec import SparseParts, join_sparse, split_sparse
from lightning_prune.files.sparse_files import find_aliases

__all__ = ["SparseCheckpointIO", "save_dense_checkpoint", "sparse_state_dict"]


def _rebuild_from_bitmask_v1(
    bitmask: Tensor, values: Tensor, shape: tuple[int, ...], negative_zeros: Tensor | None
) -> Tensor:
    """The dense tensor of one sparse ``state_dict`` entry, called by the unpickler (the name is in the files).

    Raises:
        ValueError: when the arguments are not the parts of one tensor (see :func:`join_sparse`).
    """
    if (
        not isinstance(bitmask, Tensor)
        or not isinstance(values, Tensor)
        or not isinstance(shape, tuple)
        or not all(isinstance(n, int) and n >= 0 for n in shape)
        or not (negative_zeros is None or isinstance(negative_zeros, Tensor))
    ):
        raise ValueError("a sparse tensor in the checkpoint is corrupt: its parts are not tensors and a shape")
    try:
        return join_sparse(SparseParts(bitmask, shape, values, negative_zeros))
    except ValueError as err:
        raise ValueError(f"a sparse tensor in the checkpoint is corrupt: {err}") from err


# the name files hold since 0.2 (pickle records module and name): kept loadable by the alias module
_rebuild_from_bitmask_v1.__module__ = "lightning_prune.sparse_checkpoint"
torch.serialization.add_safe_globals([_rebuild_from_bitmask_v1])


class _Pickled:
    """Stands for one sparse tensor in the pickle: unpickling calls :func:`_rebuild_from_bitmask_v1`."""

    __slots__ = ("parts",)

    def __init__(self, parts: SparseParts) -> None:
        self.parts = parts

    def __reduce__(self) -> tuple[Callable[..., Tensor], tuple[Any, ...]]:
        p = self.parts
        return _rebuild_from_bitmask_v1, (p.bitmask, p.values, tuple(p.shape), p.negative_zeros)


def sparse_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A shallow copy of ``state_dict`` (its type and ``_metadata`` kept) for ``torch.save``, in which each tensor
    that gains from it is pickled in sparse form; tied keys share one pickled object, so that ``torch.load`` returns
    them as one tensor. The tensors of ``state_dict`` are not changed.

    Example::

        >>> import io
        >>> w = torch.zeros(100, 100)
        >>> state = {"w": w, "tied": w, "b": torch.ones(3)}
        >>> buffer = io.BytesIO()
        >>> torch.save(sparse_state_dict(state), buffer)
        >>> loaded = torch.load(io.BytesIO(buffer.getvalue()))
        >>> torch.equal(loaded["w"], w), loaded["tied"] is loaded["w"], loaded["b"].tolist()
        (True, True, [1.0, 1.0, 1.0])
    """
    tensors = {key: t for key, t in state_dict.items() if isinstance(t, Tensor) and t.layout == torch.strided}
    aliases, _ = find_aliases(tensors)
    parts = split_sparse({key: t for key, t in tensors.items() if key not in aliases})
    pickled = {key: _Pickled(part) for key, part in parts.items() if isinstance(part, SparseParts)}
    out = copy.copy(state_dict)
    for key in tensors:
        target = aliases.get(key, key)
        if target in pickled:
            out[key] = pickled[target]  # type: ignore[index]
    return out


class SparseCheckpointIO(TorchCheckpointIOBase):
    """``TorchCheckpointIO`` that writes the model weights of every checkpoint in sparse form.

    Use it as ``Trainer(plugins=[SparseCheckpointIO()])``. A checkpoint stays one ``torch.save`` file; each tensor of
    ``checkpoint["state_dict"]`` for which a bitmask and its nonzero values are smaller than the dense tensor (for
    float32, above about 3% zeros; 6% for float16 and bfloat16, twice that where pruning left ``-0.0`` entries) is
    stored that way, bit for bit. ``torch.load`` of the file gives plain tensors again where ``lightning_prune`` is
    installed (see the module's notes on ``weights_only``), so that resuming and ``load_from_checkpoint`` work with
    or without the plugin.

    Raises:
        TypeError: from ``save_checkpoint`` when given ``storage_options`` (as Lightning's ``TorchCheckpointIO``).
        ValueError: from ``load_checkpoint``, naming the file, when a sparse tensor in it is corrupt.

    Example::

        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(plugins=[SparseCheckpointIO()], logger=False, enable_progress_bar=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'SparseCheckpointIO'
    """

    def __init__(self) -> None:
        register_checkpoint_io(type(self))  # accepted by the Trainer of either Lightning package
        super().__init__()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` with ``torch.save``, its ``state_dict`` in sparse form.

        A local file is written beside ``path`` (whose folders are created) and renamed over it once it is complete
        and on disk, so that a failed write leaves the previous checkpoint as it was, and no temporary file; a
        remote path (``s3://...``) goes through Lightning's ``TorchCheckpointIO`` as it is.

        Raises:
            OSError: naming ``path``, when a local file cannot be written (no permission, a full disk).
        """
        state = checkpoint.get("state_dict")
        if isinstance(state, Mapping):
            checkpoint = {**checkpoint, "state_dict": sparse_state_dict(state)}
        local = _local_path(path)
        if local is None or storage_options is not None:  # Lightning's TypeError for storage_options
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        try:
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        save_torch(checkpoint, local)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` with plain tensors, as ``TorchCheckpointIO`` loads it."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: {err}") from err


def save_dense_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rewrite a checkpoint written by :class:`SparseCheckpointIO` as a plain Lightning checkpoint, for
    environments without ``lightning_prune``.

    Example::

        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> SparseCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(64, 64)}}, f"{folder}/s.ckpt")
        >>> save_dense_checkpoint(f"{folder}/s.ckpt", f"{folder}/d.ckpt")
        >>> os.path.getsize(f"{folder}/d.ckpt") > 64 * 64 * 4 > os.path.getsize(f"{folder}/s.ckpt")
        True
    """
    save_torch(torch.load(src, map_location="cpu", weights_only=True), dst)


def _local_path(path: Any) -> str | None:
    """The local file that ``path`` names (a path or a ``file://`` URL), or ``None`` for a URL of another file system
    (which Lightning writes through fsspec)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return text.removeprefix("file://")
    return None if "://" in text or "::" in text else text
