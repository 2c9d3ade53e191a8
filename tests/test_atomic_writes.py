"""Every file the package writes is written whole or not at all: failed writes keep the old file and name the path."""

from __future__ import annotations

import errno
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

import lightning_prune.files.atomic as atomic
import lightning_prune.files.sparse_files as sparse_files
from lightning_prune import SparseCheckpointIO, load_sparse, save_sparse
from lightning_prune.files.atomic import atomic_write, save_torch, write_text
from lightning_prune.files.checkpoint import save_dense_checkpoint, sparse_state_dict
from lightning_prune.sensitivity import SensitivityTable, plot_sensitivity

TORCH_SAVE = torch.save

TABLE = SensitivityTable(
    names=("a", "b"),
    sparsities=(0.5, 0.9),
    metrics={"a": (0.9, 0.5), "b": (1.0, 0.9)},
    numels={"a": 3, "b": 4},
    baseline=1.0,
)


def weights(seed: int, n: int = 64) -> dict[str, torch.Tensor]:
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    return {"w": w * (w.abs() > 1.5), "b": torch.ones(n)}


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' writer writes a part of the file, then reports a full disk as its own exception type."""

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(sparse_files, "save_file", save_file)


def fail_torch_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save writes a part of the file; the file object's OSError comes out wrapped in a RuntimeError."""

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04" + b"\x00" * 100)
        try:
            raise full_disk()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", save)


def fail_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text file's write stops half way with a full disk."""

    class HalfFile(io.StringIO):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def write(self, text: str) -> int:
            Path(self.path).write_text(text[: len(text) // 2])
            raise full_disk()

    monkeypatch.setattr(atomic, "open", lambda path, *a, **k: HalfFile(path), raising=False)


def fail_savefig(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib writes a part of the image, then the disk is full."""
    from matplotlib.figure import Figure

    def savefig(self: Any, fname: str, **kwargs: Any) -> None:
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n")
        raise full_disk()

    monkeypatch.setattr(Figure, "savefig", savefig)


def write_sparse(path: Path, seed: int) -> None:
    save_sparse(weights(seed), path)


def write_checkpoint(path: Path, seed: int) -> None:
    SparseCheckpointIO().save_checkpoint({"state_dict": weights(seed), "global_step": seed}, path)


def write_dense_checkpoint(path: Path, seed: int) -> None:
    source = path.parent / "sources" / f"{seed}.ckpt"  # written before any failure is injected
    source.parent.mkdir(exist_ok=True)
    TORCH_SAVE(sparse_state_dict(weights(seed)), source)
    save_dense_checkpoint(source, path)


def write_csv(path: Path, seed: int) -> None:
    SensitivityTable(("a",), (0.5,), {"a": (0.5 + seed / 100,)}, {"a": 4}, 1.0).to_csv(path)


def write_plot(path: Path, seed: int) -> None:
    plot_sensitivity(TABLE, path, title=f"run {seed}")


def write_torch(path: Path, seed: int) -> None:
    """As examples/lenet_mnist.py writes its plain model file (and its summary.json with ``write_text``)."""
    save_torch(weights(seed), path)


WRITERS: dict[str, tuple[str, Callable[[Path, int], None], Callable[[pytest.MonkeyPatch], None]]] = {
    "save_sparse": ("model.safetensors", write_sparse, fail_safetensors),
    "SparseCheckpointIO": ("last.ckpt", write_checkpoint, fail_torch_save),
    "save_dense_checkpoint": ("dense.ckpt", write_dense_checkpoint, fail_torch_save),
    "to_csv": ("table.csv", write_csv, fail_text),
    "plot_sensitivity": ("sensitivity.png", write_plot, fail_savefig),
    "save_torch": ("lenet_pruned.pt", write_torch, fail_torch_save),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_atomic_write_failed_write_keeps_the_old_file_and_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    if writer == "plot_sensitivity":
        pytest.importorskip("matplotlib")
    name, write, fail = WRITERS[writer]
    path = tmp_path / name
    write(path, 1)
    before, listing = path.read_bytes(), sorted(os.listdir(tmp_path))
    fail(monkeypatch)
    with pytest.raises(OSError) as raised:
        write(path, 2)
    assert raised.value.errno == errno.ENOSPC
    assert str(path) in str(raised.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("writer", list(WRITERS))
def test_atomic_write_failed_fsync_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The data is written but cannot be flushed to the disk (an I/O error): the old file stays."""
    if writer == "plot_sensitivity":
        pytest.importorskip("matplotlib")
    name, write, _ = WRITERS[writer]
    path = tmp_path / name
    write(path, 1)
    before, listing = path.read_bytes(), sorted(os.listdir(tmp_path))

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match=re.escape(str(path))) as raised:
        write(path, 2)
    assert raised.value.errno == errno.EIO
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("writer", list(WRITERS))
def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path, writer: str) -> None:
    if writer == "plot_sensitivity":
        pytest.importorskip("matplotlib")
    name, write, _ = WRITERS[writer]
    path = tmp_path / name
    write(path, 1)
    first, listing = path.read_bytes(), sorted(os.listdir(tmp_path))
    write(path, 2)
    assert path.read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == listing


def test_save_sparse_rewrites_a_file_that_is_open(tmp_path: Path) -> None:
    """The old file is replaced, not truncated: tensors read from it before stay intact."""
    path = tmp_path / "model.safetensors"
    save_sparse(weights(1), path)
    first = load_sparse(path)
    save_sparse(weights(2), path)
    assert torch.equal(first["w"], weights(1)["w"]) and torch.equal(load_sparse(path)["w"], weights(2)["w"])


def test_atomic_write_other_errors_pass_through_and_clean_up(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    write_text(path, "old")

    def bad(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise ValueError("not an I/O error")

    with pytest.raises(ValueError, match="not an I/O error"):
        atomic_write(path, bad)

    def interrupted(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_missing_folder_and_permissions_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        save_sparse(weights(1), missing)
    target = tmp_path / "is_a_folder"
    target.mkdir()
    with pytest.raises(OSError, match=re.escape(str(target))):
        write_text(target, "x")
    assert target.is_dir() and os.listdir(tmp_path) == ["is_a_folder"]


def test_atomic_write_keeps_the_mode_and_follows_links(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    write_text(path, "old")
    path.chmod(0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(path)
    write_text(link, "new")
    assert link.is_symlink() and path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.csv"
    write_text(fresh, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask


def test_sparse_checkpoint_io_creates_folders_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "last.ckpt"
    SparseCheckpointIO().save_checkpoint({"state_dict": weights(3), "global_step": 3}, path)
    loaded = SparseCheckpointIO().load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], weights(3)["w"]) and loaded["global_step"] == 3
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_plot_sensitivity_format_follows_the_suffix(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plot_sensitivity(TABLE, tmp_path / "plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in plot_sensitivity(TABLE, tmp_path / "plot.svg").read_bytes()[:500]
    assert sorted(os.listdir(tmp_path)) == ["plot", "plot.svg"]


# ---------------------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (Linux, as root; skipped where mounting is not permitted)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs is Linux's")
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True, text=True
        )
    except OSError as err:
        pytest.skip(f"cannot run mount: {err}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def big_model() -> nn.Module:
    return nn.Linear(1024, 1024)  # 4 MiB of float32 weights, no zeros: stored dense


@pytest.mark.parametrize("writer", ["save_sparse", "SparseCheckpointIO"])
def test_full_disk_keeps_the_old_file_and_names_the_path(small_disk: Path, writer: str) -> None:
    path = small_disk / ("model.safetensors" if writer == "save_sparse" else "last.ckpt")

    def write(model: nn.Module) -> None:
        if writer == "save_sparse":
            save_sparse(model, path)
        else:
            SparseCheckpointIO().save_checkpoint({"state_dict": model.state_dict()}, path)

    write(nn.Linear(16, 16))
    before = path.read_bytes()
    with pytest.raises(OSError) as raised:
        write(big_model())
    assert raised.value.errno == errno.ENOSPC
    assert str(path) in str(raised.value)
    assert path.read_bytes() == before
    assert os.listdir(small_disk) == [path.name]
