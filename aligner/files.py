"""Writing files so that a crash or Ctrl-C never leaves one half-written: the one atomic-write routine
of the project (temporary file in the same directory, flushed to disk, then ``os.replace``)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside ``path`` (same directory, so that ``os.replace`` onto it is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def write_temporary(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` and flush it to disk; returns its name.
    The caller renames it onto ``path`` (:func:`os.replace`) or deletes it."""
    # Not tempfile.mkstemp: it creates the file with mode 0600, which the rename would keep.
    # open(..., "x") gives the usual 0666 & ~umask and never reuses an existing name.
    tmp = temporary_name(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def sync_directory(directory: str | os.PathLike) -> None:
    """Make the renames done in ``directory`` durable (POSIX; a no-op elsewhere)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (bytes, or text written as UTF-8) atomically: readers see the
    old file or the new one, never a partial one. The parent directory must exist."""
    path = Path(path)
    tmp = write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    sync_directory(path.parent)
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created if missing) in one write, flushed to disk:
    for logs such as ``metrics.jsonl``, which grow by whole lines and are never rewritten. A last
    line torn by a crash (no newline) is ended first, so that the new line stays whole."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = 0
        while written < len(data):  # os.write may write less than asked
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that take a file name (safetensors' ``save_file``, ...): yields a fresh temporary
    name beside ``path``; once the block has written it, it is flushed to disk, given the usual file
    mode (0666 & ~umask; some writers leave 0600) and renamed onto ``path``. On an error it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    with open(tmp, "xb"):  # reserves the name, with the mode a new file normally gets
        pass
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    sync_directory(path.parent)
