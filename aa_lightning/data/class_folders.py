"""The scan of an image-classification folder ``<folder>/<class>/**/<image>``, shared by the ImageNet folder reader
(:mod:`.imagenet`) and the shard converter (:mod:`.prepare`), so both see the same images with the same labels.

Classes are the sorted sub-folders and samples come in torchvision's ``ImageFolder`` order (sorted folder paths,
then sorted file names; files whose extension is one of ``ImageFolder``'s image extensions), so labels and sample
indices are ``ImageFolder``'s. Symbolic links are followed as ``ImageFolder`` follows them, with two refusals, each
an :class:`ImageTreeError` naming the link:

- a link to a folder inside the scanned folder, or to one that holds it (``train/n01/loop -> ..``): following it
  loops, or reads another class's images a second time under this class;
- a link to a folder that the scan has already read through another path (two classes linking to one folder).

Links to folders elsewhere (class folders on another disk) and links to files are followed. A class folder
without one image is an :class:`ImageTreeError` naming it.
"""

from __future__ import annotations

import os

from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = ["ImageTreeError", "scan_class_folders"]


class ImageTreeError(ValueError):
    """A class-folder tree that cannot be read as it is (a link back into it, an empty class folder)."""


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_class_folders(
    folder: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS
) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and ``(image path, label)`` pairs of ``folder`` (paths start with ``folder`` as given).

    Raises:
        ImageTreeError: a folder link that leads back into ``folder`` (or contains it), a folder reached twice
            through links, or a class folder without an image; the message names the link or the folder.
    """
    top = os.path.expanduser(os.fspath(folder))
    top_real = os.path.realpath(top)
    read: dict[str, str] = {}  # real path of every folder read -> the path it was read as

    def enter(path: str, real: str, is_link: bool) -> None:
        if is_link and (_inside(real, top_real) or _inside(top_real, real)):
            raise ImageTreeError(
                f"{path} is a symbolic link to {real}, which is inside the image folder {top} (or holds it): "
                "following it would loop or read images twice under two classes; remove the link "
                f"(links to folders outside {top} are followed)"
            )
        if real in read:
            raise ImageTreeError(
                f"{path} is a symbolic link to {real}, a folder already read as {read[real]}: its images would be "
                "read twice; remove one of the links"
            )
        read[real] = path

    def walk(path: str, real: str, listing: list[tuple[str, list[str]]]) -> None:
        """``(folder, sorted image names)`` of ``path`` and the folders below it, as ``os.walk`` lists them."""
        names, folders = [], []
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir():  # follows links, as os.walk(followlinks=True)
                    folders.append(entry)
                elif entry.name.lower().endswith(extensions):
                    names.append(entry.name)
        listing.append((path, sorted(names)))
        for entry in folders:
            is_link = entry.is_symlink()
            sub_real = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
            enter(entry.path, sub_real, is_link)
            walk(entry.path, sub_real, listing)

    with os.scandir(top) as entries:
        class_entries = sorted((entry for entry in entries if entry.is_dir()), key=lambda entry: entry.name)
    classes = [entry.name for entry in class_entries]
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, entry in enumerate(class_entries):
        class_dir = os.path.join(top, entry.name)
        is_link = entry.is_symlink()
        real = os.path.realpath(class_dir) if is_link else os.path.join(top_real, entry.name)
        enter(class_dir, real, is_link)
        listing: list[tuple[str, list[str]]] = []
        walk(class_dir, real, listing)
        before = len(samples)
        for dirpath, names in sorted(listing):  # ImageFolder: sorted(os.walk(...)), then sorted file names
            samples += [(os.path.join(dirpath, name), label) for name in names]
        if len(samples) == before:
            empty.append(class_dir)
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ImageTreeError(
            f"class folder {empty[0]}{more} holds no image (no {', '.join(extensions)} file); every class folder "
            f"under {top} needs at least one: add its images or remove the folder"
        )
    return classes, samples
