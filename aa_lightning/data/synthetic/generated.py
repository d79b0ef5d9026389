"""Writing a generated data set safely: never over data the generator did not write, never half a set.

:func:`write_generated_set` is the one way the synthetic generators (:mod:`.synthetic`,
:mod:`.synthetic_coco`) put files on disk:

- the target folder must be missing, empty, or carry the generator's own stamp file (a JSON
  object that the generator recognizes); anything else is a ``ValueError`` naming the folder
  and what it holds. A stamped folder is regenerated (replaced whole) only when it holds
  nothing but the files the generator wrote: those its ``files`` function lists for the stamp's
  parameters, their folders and the stamp. Anything else, at any depth (a note in a generated
  sub-folder, an extra image), is a ``ValueError`` naming it, and nothing is touched.
- the set is written into a fresh temporary sibling ``.<name>.partial-<pid>-<hex>``
  (:func:`aa_lightning.atomic_files.staged_folder`, which the shard converter uses too), every file
  fsync'ed, the stamp written last, and the folder renamed into place; a killed generation
  leaves at most that hidden sibling (never a half set under the real name).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aa_lightning.atomic_files import PARTIAL_MARKER, staged_folder

__all__ = ["write_generated_set", "read_stamp"]


def read_stamp(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _not_listed(root: Path, own: set[str]) -> list[str]:
    """The files, folders and links under ``root`` (links not followed) that are not in ``own``, as sorted
    ``/``-separated relative paths; a foreign folder is named, not its contents."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        for name in (*dirnames, *filenames):
            path = (base / name).as_posix()
            if path not in own:
                found.append(path)
        dirnames[:] = [name for name in dirnames if (base / name).as_posix() in own]  # not into foreign ones
    return sorted(found)


def _with_folders(files: Sequence[str], stamp_name: str) -> set[str]:
    """``files``, every folder above them and the stamp: what a generator's own set holds."""
    own = {stamp_name}
    for path in files:
        parts = Path(path).parts
        own.update(Path(*parts[: i + 1]).as_posix() for i in range(len(parts)))
    return own


def write_generated_set(
    root: str | os.PathLike,
    stamp_name: str,
    spec: dict[str, Any],
    files: Callable[[dict[str, Any]], Sequence[str]],
    write: Callable[[Path], None],
    is_own_stamp: Callable[[dict[str, Any]], bool],
    what: str = "the synthetic data set",
) -> bool:
    """Make ``root`` hold the set described by ``spec``; returns False when it already does.

    Args:
        root: the data set folder.
        stamp_name: the stamp file in ``root``; it holds ``spec`` as JSON and is written last.
        spec: the generation parameters (the stamp's content).
        files: the files (paths relative to ``root``, ``/``-separated, not the stamp) that
            ``write`` writes for a stamp's parameters: for ``spec`` what a complete set holds, for
            an older stamp what may be removed when the set is regenerated.
        write: writes the set's files (not the stamp) into the folder it is given; exactly
            ``files(spec)`` (anything else is a ``RuntimeError``: the list and the writer disagree).
        is_own_stamp: whether a stamp's JSON object was written by this generator.
        what: how errors name the set.

    Raises:
        ValueError: ``root`` is a file, or a non-empty folder without this generator's stamp, or a
            stamped folder that also holds files or folders the generator did not write.
    """
    given = Path(root)
    # the real folder: a symlinked data folder is written where it points (the temporary sibling on its file system)
    root = Path(os.path.realpath(given))
    stamp = root / stamp_name
    if root.exists() and not root.is_dir():
        raise ValueError(f"cannot write {what} into {given}: it is a file, not a folder")
    existing = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    found = read_stamp(stamp) if existing else None
    if existing:
        if found is None or not is_own_stamp(found):
            raise ValueError(
                f"refusing to write {what} into {given}: the folder is not empty ({_listing(existing)}) and has no "
                f"{stamp_name} stamp of this generator, so its files may be someone's data; the generator writes only "
                "into a missing or empty folder or one it generated itself. Choose another folder (or empty this one)"
            )
        if found == spec and all((root / path).is_file() for path in files(spec)):
            return False
        foreign = _not_listed(root, _with_folders(files(found), stamp_name))
        if foreign:
            raise ValueError(
                f"refusing to regenerate {what} in {given}: besides its own files the folder holds "
                f"{_listing(foreign)}, which the generator did not write; move them elsewhere or choose another folder"
            )
    try:
        with staged_folder(root, what) as partial:  # published by renames: our own stale set (checked) swapped out
            write(partial)
            unlisted = _not_listed(partial, _with_folders(files(spec), stamp_name) | {PARTIAL_MARKER})
            if unlisted:
                raise RuntimeError(f"{what}: the generator wrote {_listing(unlisted)}, which its file list lacks")
            tmp_stamp = partial / stamp_name
            tmp_stamp.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")  # last: marks a complete set
    except OSError:
        if not existing and read_stamp(stamp) == spec:  # another process generated the same set meanwhile
            return False
        raise
    return True
