"""Files written atomically: a temporary file beside the target, flushed and fsynced, then renamed over it.

A reader, or a run resumed after a kill at any moment, sees the old file or the new one, never a partial
one; a failed write removes its temporary file. The temporary file lives in the target's folder (never
``$TMPDIR``), so the rename never crosses file systems.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _file_mode() -> int:
    """0o666 less the process umask: what ``open()`` would give a new file (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0o666 less it): for files that a library
    writes with its own mode (safetensors: 0o600) before they are published."""
    return _file_mode()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, made atomic: the handle writes a temporary file beside ``path``,
    which replaces ``path`` (``os.replace``, then an fsync of the folder) when the block ends without error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def publish_folder(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``staged`` (a sibling of ``target``) to ``target`` by renames, so that ``target``
    is never a half-written folder: a missing or empty ``target`` is replaced; a non-empty one (the caller's own
    earlier output, which it has checked) is renamed aside, replaced, then removed. The parent is fsynced."""
    staged, target = Path(staged), Path(target)
    if target.is_dir() and any(target.iterdir()):
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, aside / target.name)
        os.replace(staged, target)
        shutil.rmtree(aside)
    else:
        os.replace(staged, target)  # rename replaces a missing or an empty folder
    fsync_dir(target.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (a rename into it) durable; best effort where folders cannot be opened."""
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


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder`` (and ``folder`` itself)."""
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
