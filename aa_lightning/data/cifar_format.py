"""The CIFAR-100 "python version" on-disk format: read it safely, write it exactly.

``cifar-100-python/`` holds three pickles (protocol 2, written by Python 2):
``train`` and ``test`` are dicts with keys ``data`` (uint8 [N, 3072]: 1024 red, 1024 green, 1024
blue values per image, rows in raster order), ``fine_labels``, ``coarse_labels`` (lists of int),
``filenames`` (list of str) and ``batch_label`` (str); ``meta`` holds ``fine_label_names`` and
``coarse_label_names``. Python 2 ``str`` objects load as ``bytes`` with
``pickle.load(f, encoding="bytes")`` and as ``str`` with ``encoding="latin1"`` (torchvision).

- :func:`read_cifar_split` unpickles with an allow-list (numpy array reconstruction and nothing
  else), so a tampered file cannot run code, and refuses arrays it would have to cast: pixels that
  are not integers in 0..255, labels that are not integers (a ``ValueError`` naming the file).
- :func:`write_cifar100` writes Python 2 strings and the classic ``numpy.core`` global names, so
  its files load like the official ones with either encoding, in numpy 1 and numpy 2.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aa_lightning.atomic_files import write_bytes_atomic

BASE_FOLDER = "cifar-100-python"
SPLITS = ("train", "test")
IMAGE_SHAPE = (32, 32, 3)

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR file holds only lists, strings and uint8 arrays"
            ) from None


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid CIFAR-100 pickle: {err}") from err
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a valid CIFAR-100 pickle: expected a dict, got {type(entry).__name__}")
    return entry


def _pixels(path: Path, value: object) -> np.ndarray:
    """``data`` as uint8; other integer arrays only when every value is in 0..255 (nothing is cast or wrapped)."""
    try:
        array = np.asarray(value)
    except ValueError as err:  # ragged lists
        raise ValueError(f"{path}: 'data' is not an array ({err}); expected uint8 pixel values 0..255") from None
    if array.dtype == np.uint8:
        return array
    kind = array.dtype.kind
    if kind in "iub" and array.size:
        low, high = array.min(), array.max()
        if kind != "b" and 0 <= low and high <= 255:
            return array.astype(np.uint8)
        found = f"{array.dtype} with values in [{low}, {high}]"
    elif kind == "f" and array.size:
        found = f"{array.dtype} with values in [{np.nanmin(array):g}, {np.nanmax(array):g}]"
    else:
        found = f"{array.dtype} of shape {array.shape}"
    hint = " (scale float images in [0, 1] by 255 and round)" if kind == "f" else ""
    raise ValueError(f"{path}: 'data' is {found}; expected uint8 pixel values 0..255{hint}, as CIFAR-100 stores them")


def _labels(path: Path, value: object) -> np.ndarray:
    """``fine_labels`` (a list of ints, or an integer array) as int64; a float or bool label is refused, not cut."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            odd = np.flatnonzero(value != np.round(value)) if value.dtype.kind == "f" else np.arange(value.size)
            index = int(odd[0]) if odd.size else 0
            example = f" (e.g. {value.reshape(-1)[index].item()!r} of image {index})" if value.size else ""
            raise ValueError(f"{path}: 'fine_labels' is {value.dtype}{example}; expected integer class indices")
        return value.astype(np.int64).reshape(-1)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{path}: 'fine_labels' is a {type(value).__name__}; expected a list of integer class indices")
    for index, label in enumerate(value):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError(
                f"{path}: fine label {label!r} of image {index} is a {type(label).__name__}, not an integer; "
                "expected integer class indices"
            )
    return np.asarray(value, dtype=np.int64)


def read_cifar_split(root: str | Path, split: str, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] (HWC, RGB) and fine labels int64 [N] of ``root/cifar-100-python/<split>``.

    A label outside ``0..num_classes-1`` (given: the meta file's class count) is a ``ValueError``
    naming the file, the label and the image index.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(root) / BASE_FOLDER / split
    entry = _load(path)
    missing = {"data", "fine_labels"} - set(entry)
    if missing:
        raise ValueError(f"{path} is not a valid CIFAR-100 pickle: missing keys {sorted(missing)}")
    data = _pixels(path, entry["data"])
    labels = _labels(path, entry["fine_labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: data must be [N, 3072] with N labels, got {data.shape} and {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes if num_classes is not None else False))
    if len(bad):
        allowed = f"0..{num_classes - 1} (the {num_classes} classes of its meta file)" if num_classes else ">= 0"
        raise ValueError(
            f"{path}: fine label {int(labels[bad[0]])} of image {int(bad[0])} is outside {allowed}; "
            f"{len(bad)} of {len(labels)} labels are"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar_meta(root: str | Path) -> list[str]:
    """The fine label names of ``root/cifar-100-python/meta``."""
    path = Path(root) / BASE_FOLDER / "meta"
    entry = _load(path)
    if "fine_label_names" not in entry:
        raise ValueError(f"{path} is not a valid CIFAR-100 meta file: no 'fine_label_names'")
    return list(entry["fine_label_names"])


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with ``bytes`` written as Python 2 ``str`` and numpy globals under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", n) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", None)
        if module is not None and module.startswith("numpy._core"):
            name = name or obj.__qualname__
            self.write(
                pickle.GLOBAL + module.replace("numpy._core", "numpy.core").encode() + b"\n" + name.encode() + b"\n"
            )
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump(obj: dict, path: Path) -> None:
    """Pickle ``obj`` to ``path`` atomically (temporary file beside it, fsync, os.replace)."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    write_bytes_atomic(path, buffer.getvalue())


def write_cifar100(
    root: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    fine_label_names: Sequence[str],
    coarse_of_fine: Sequence[int] | None = None,
    coarse_label_names: Sequence[str] = ("all",),
    filename_prefix: str = "image",
) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` in the official format; returns that folder.

    ``splits``: ``{"train": (images uint8 [N, 32, 32, 3], labels [N]), "test": (...)}``.
    ``coarse_of_fine``: the coarse label of each fine label (default: all 0).
    Existing files are never overwritten: a ``train``, ``test`` or ``meta`` already in the folder
    is a ``ValueError`` naming it (and nothing is written).
    """
    folder = Path(root) / BASE_FOLDER
    existing = [str(folder / name) for name in (*splits, "meta") if (folder / name).exists()]
    if existing:
        raise ValueError(
            f"refusing to overwrite {', '.join(existing)}: write_cifar100 writes only new files; "
            "choose another folder or remove them yourself"
        )
    folder.mkdir(parents=True, exist_ok=True)
    coarse_of_fine = list(coarse_of_fine) if coarse_of_fine is not None else [0] * len(fine_label_names)
    for split, (images, labels) in splits.items():
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        images = np.asarray(images, dtype=np.uint8)
        if images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images must be [N, 32, 32, 3], got {images.shape}")
        fine = [int(label) for label in labels]
        entry = {
            b"filenames": [f"{filename_prefix}_{split}_{i:06d}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [int(coarse_of_fine[label]) for label in fine],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1)),
        }
        _dump(entry, folder / split)
    meta = {
        b"fine_label_names": [name.encode() for name in fine_label_names],
        b"coarse_label_names": [name.encode() for name in coarse_label_names],
    }
    _dump(meta, folder / "meta")
    return folder
