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


def new_folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the process umask (0o777 less it; ``mkdtemp`` gives 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0o666 less it): for files that a library
    writes with its own mode (safetensors and ``mkstemp``: 0o600) before they are published."""
    return new_folder_mode() & 0o666


def give_umask_modes(folder: str | os.PathLike) -> None:
    """Give ``folder``, the folders in it and its files the modes ``mkdir`` / ``open`` would under the umask."""
    dir_mode, file_mode = new_folder_mode(), new_file_mode()
    for dirpath, _dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, made atomic: the handle writes a temporary file beside ``path``,
    which replaces ``path`` (``os.replace``, then an fsync of the folder) when the block ends without error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
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


#: the file that marks a staged sibling as this project's unfinished output (:func:`staged_folder`)
PARTIAL_MARKER = ".aa_lightning_partial"


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """The one way a whole output folder is written (synthetic sets, shard conversions): the block fills a fresh
    hidden sibling ``.<name>.partial-<pid>-<hex>`` of ``target`` (marked with :data:`PARTIAL_MARKER`, naming
    ``what``); when it ends without error the marker goes, the tree gets the umask's modes, is fsynced and replaces
    ``target`` by renames (:func:`publish_folder`: the caller has checked that ``target`` is missing, empty or its
    own). On any error the sibling is removed; a killed writer leaves only the marked sibling, which
    :func:`remove_stale_partials` recognizes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{os.getpid()}-"))
    try:
        (staged / PARTIAL_MARKER).write_text(f"unfinished: {what} (pid {os.getpid()})\n")
        yield staged
        (staged / PARTIAL_MARKER).unlink()
        give_umask_modes(staged)
        fsync_tree(staged)
        publish_folder(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def remove_stale_partials(target: str | os.PathLike) -> list[Path]:
    """Remove the siblings of ``target`` that a killed :func:`staged_folder` left (only marked ones); returns them."""
    target = Path(target)
    removed = []
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        if stale.is_dir() and not stale.is_symlink() and (stale / PARTIAL_MARKER).is_file():
            shutil.rmtree(stale)
            removed.append(stale)
    return removed
