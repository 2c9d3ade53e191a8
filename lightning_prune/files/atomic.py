"""Files written whole or not at all: a temporary file beside the target, renamed over it once it is on disk.

:func:`atomic_write` hands a writer the path of a new temporary file in the target's folder
(``.<name>.<random>.tmp``), then flushes that file to disk (``fsync``), gives it the permissions of the file it
replaces (a new file gets those that the umask leaves), renames it over the target (``os.replace``, atomic on POSIX
and Windows) and syncs the folder. Until the rename the target is untouched, so a writer that fails, a full disk or
an interrupt leaves the previous file as it was, and the temporary file is removed. (A process killed outright may
leave the hidden temporary file behind, never a broken target.) Every package function that writes a file goes
through it.

A failure to write raises ``OSError`` naming the target, of the subclass that its ``errno`` selects
(``PermissionError``, ``FileNotFoundError``, ...); writers that report I/O errors in their own exception types
(safetensors' ``SafetensorError``, torch's ``RuntimeError`` around an ``OSError``) are translated.

Example::

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
    >>> write_text(path, "first\\n")
    >>> def full_disk(tmp):
    ...     with open(tmp, "w") as f:
    ...         f.write("half a file")
    ...     raise OSError(28, "No space left on device")
    >>> try:
    ...     atomic_write(path, full_disk)
    ... except OSError as err:
    ...     print(err.errno, err.filename == path)
    28 True
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('first\\n', ['note.txt'])
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import re
import secrets
import stat
from collections.abc import Callable
from typing import Any, Union

import torch

__all__ = ["atomic_write", "save_torch", "write_text"]

_PathLike = Union[str, "os.PathLike[str]"]
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How Rust's ``std::io::Error`` (safetensors) shows an errno."""


def atomic_write(path: _PathLike, write: Callable[[str], Any], *, errors: tuple[type[BaseException], ...] = ()) -> None:
    """Write a file through ``write(temporary_path)``, then rename the temporary file over ``path``.

    Args:
        path: the file to write; its folder must exist. A symbolic link is followed: the file it points to is
            replaced.
        write: writes the whole file at the path it is given (which exists, empty); it may open it as it likes.
        errors: exception types besides ``OSError`` that ``write`` raises for a failed write (translated to
            ``OSError`` naming ``path``); other exceptions pass through as they are, after the cleanup.

    Raises:
        OSError: naming ``path``, when the file cannot be written, synced or renamed into place.
    """
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None  # a new file: the mode that the umask gives
    try:
        tmp = _create_beside(folder, name)
    except OSError as err:
        raise _named(err, path) from err
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(err, errors) if isinstance(err, Exception) else None
        if cause is None:
            raise
        raise _named(cause, path) from err
    _sync_folder(folder)


def write_text(path: _PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def save_torch(obj: Any, path: _PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`.

    The file is written through a Python file object: torch's own file writer reports a full disk as a bare
    ``RuntimeError`` without the ``OSError`` behind it.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def _create_beside(folder: str, name: str) -> str:
    """A new empty file ``folder/.<name>.<random>.tmp`` (the name cut to 200 characters)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errnos.EEXIST, "no free temporary file name", os.path.join(folder, f".{name}.*.tmp"))


def _os_error(err: BaseException, errors: tuple[type[BaseException], ...]) -> OSError | None:
    """The ``OSError`` that ``err`` is or stands for, or ``None`` where it is not an I/O error."""
    if isinstance(err, OSError):
        return err
    if isinstance(err, RuntimeError):  # torch's writer wraps the OSError of a file object's write
        seen = err.__cause__ or err.__context__
        while seen is not None:
            if isinstance(seen, OSError):
                return seen
            seen = seen.__cause__ or seen.__context__
    if isinstance(err, errors):
        match = _OS_ERROR.search(str(err))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        return OSError(str(err))
    return None


def _named(err: OSError, path: _PathLike) -> OSError:
    """``err`` as an ``OSError`` of the same errno (and so subclass) naming ``path``."""
    if err.errno is None:
        return OSError(f"could not write {os.fspath(path)}: {err}")
    return OSError(err.errno, err.strerror or os.strerror(err.errno), os.fspath(path))


def _sync_folder(folder: str) -> None:
    """Flush the folder's entry of the renamed file to disk, where the system can (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
