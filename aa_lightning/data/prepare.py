"""Converters from image folders to streamed shards.

``python -m aa_lightning.data.prepare imagenet --src data/imagenet --out data/imagenet_litdata``

writes ``--out/train`` and ``--out/val`` as litdata data sets (``litdata.optimize``): chunks of
samples ``{"image": <the encoded file's bytes>, "label": int, "path": "<split>/<class>/<file>"}``
(the JPEG bytes as they are, not decoded pixels; the path relative to ``--src`` names a file that
cannot be decoded when training). Labels are the sorted class folders, exactly as the folder
reader (torchvision's ``ImageFolder``) numbers them. ``--out/aa_lightning_shards.json`` (the
stamp) records the classes, the sample counts, the source and the seed; it is written last.

Order: the samples of each split are written in a random order drawn from ``--seed`` (default 0), not
class by class, so every chunk (a ``--chunk-bytes`` file, ~600 ImageNet JPEGs at 64 MB) holds a mix of
the classes. litdata's shuffle permutes the chunks and the samples inside a chunk but reads one chunk
at a time per worker: on shards written class by class, a batch held one or two classes.

Safety: ``--src`` is only read. The shards are written into a temporary sibling of ``--out``
(``.<name>.partial-*``) and renamed to ``--out`` when both splits are complete, so a killed
conversion leaves nothing that passes for a finished one (the next run removes such leftovers).
A non-empty ``--out`` without the stamp is refused; a finished conversion of the same ``--src`` is
left as it is, one of another ``--src`` is refused (the message says the sources differ), unless
``--overwrite`` is given. The published folder and files get the permissions of the user's umask, as
any other output. The litdata worker processes end with the converter, even when it is killed
(Linux: the parent-death signal). Shards for remote training (s3:// etc.) are converted locally and
then copied, e.g. ``aws s3 sync data/imagenet_litdata s3://bucket/imagenet_litdata``; an ``--out``
URI is refused.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aa_lightning.atomic_files import remove_stale_partials, staged_folder, write_text_atomic

STAMP = "aa_lightning_shards.json"
FORMAT = "aa_lightning.imagenet.v1"
SPLITS = ("train", "val")


class ConversionError(RuntimeError):
    """Bad ``--src`` / ``--out`` for a conversion."""


def read_stamp(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The stamp of a finished conversion in ``folder`` (a local path), or None."""
    path = Path(folder) / STAMP
    if not path.is_file():
        return None
    stamp = json.loads(path.read_text())
    return stamp if stamp.get("format") == FORMAT else None


def list_split(src: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(path relative to src, label)`` of ``src/split``, numbered as ``ImageFolder`` does."""
    from aa_lightning.data.class_folders import ImageTreeError, scan_class_folders  # the folder reader's scan

    folder = src / split
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise ConversionError(
            f"--src {src}: no class folders in {folder} (expected {folder}/<class, e.g. n01440764>/<image>.JPEG; "
            "see data/README.md)"
        )
    try:
        classes, samples = scan_class_folders(folder)
    except ImageTreeError as err:  # a folder link back into the tree, an empty class folder
        raise ConversionError(str(err)) from None
    return classes, [(os.path.relpath(path, src), label) for path, label in samples]


def _read_sample(item: tuple[str, int], src: str) -> dict[str, Any]:
    """One optimize() step: the file's bytes, its label and its path relative to ``src`` (never decoded here)."""
    relpath, label = item
    with open(os.path.join(src, relpath), "rb") as f:
        return {"image": f.read(), "label": label, "path": relpath}


def _check_out(src: Path, out: Path, overwrite: bool) -> bool:
    """Whether to convert into ``out``; raises for a foreign non-empty ``out`` or one inside / around ``src``."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise ConversionError(
            f"--out {out} must be outside --src {src} (the source is only read) and must not contain it"
        )
    if not out.exists():
        return True
    if not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return True
    if read_stamp(out) is None:
        raise ConversionError(
            f"--out {out} is not empty and is not a conversion by this tool (no {STAMP} in it); "
            "refusing to write there. Pass an empty or new folder."
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (*SPLITS, STAMP))
    if overwrite and foreign:
        raise ConversionError(
            f"--overwrite: {out} also holds files this tool did not write: {foreign[:5]}; move them first"
        )
    source = read_stamp(out).get("source")
    if not overwrite and source != str(src_r):
        raise ConversionError(
            f"--out {out} holds a finished conversion of another source ({source}); the sources differ from "
            f"--src {src_r}. Pass another --out, or --overwrite to replace it"
        )
    return overwrite


_STOP_WITH_PARENT = False


def _die_with_parent() -> None:
    """In a process forked during a conversion (litdata's workers): ask Linux for SIGKILL when the parent dies,
    so that a killed conversion leaves no worker behind (``prctl(PR_SET_PDEATHSIG)``)."""
    if not _STOP_WITH_PARENT:
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request: nobody would stop this process
        os._exit(1)


if sys.platform == "linux":
    os.register_at_fork(after_in_child=_die_with_parent)


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary siblings of ``out`` that a killed conversion left (only those carrying our marker)."""
    for stale in remove_stale_partials(out):
        print(f"removed {stale}, left by an interrupted conversion", file=sys.stderr)


def convert_imagenet(
    src: str | os.PathLike,
    out: str | os.PathLike,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
    overwrite: bool = False,
    verbose: bool = True,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Convert ``src/{train,val}/<class>/<image>`` into litdata shards in ``out``, each split's samples in the
    random order of ``seed``; returns the stamp written, or None when ``out`` already holds a finished
    conversion of ``src`` (and ``overwrite`` is False)."""
    if "://" in str(out):  # before Path(), which folds "s3://bucket" into "s3:/bucket"
        raise ConversionError(
            f"--out {out}: a URI; convert to a local folder, then copy it to the object store "
            f"(e.g. aws s3 sync data/imagenet_litdata {out})"
        )
    src, out = Path(src), Path(out)
    if not _check_out(src, out, overwrite):
        print(f"{out} already holds a finished conversion ({STAMP}); nothing to do (--overwrite to redo it)")
        return None
    classes, samples = {}, {}
    for split in SPLITS:
        classes[split], samples[split] = list_split(src, split)  # one line naming an empty class folder
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:5]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:5]
        raise ConversionError(
            f"{src}/train and {src}/val must have the same class folders; "
            f"only in train: {only_train}, only in val: {only_val}"
        )
    for split in SPLITS:
        if not samples[split]:
            raise ConversionError(f"--src {src}: no images in {src / split}")
        # a seeded random order, not class by class: every chunk holds a mix of the classes
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(samples[split]))
        samples[split] = [samples[split][i] for i in order]

    _remove_stale_partials(out)
    workers = max(1, num_workers or os.cpu_count() or 1)
    global _STOP_WITH_PARENT
    saved_env: dict[str, str | None] = {}
    try:
        with staged_folder(out, f"a conversion of {src.resolve()}") as tmp:
            # litdata stages chunks in DATA_OPTIMIZER_*CACHE_FOLDER (default: a shared /tmp/chunks): keep them in tmp
            cache_env = {
                "DATA_OPTIMIZER_CACHE_FOLDER": str(tmp / ".cache" / "chunks"),
                "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(tmp / ".cache" / "data"),
            }
            saved_env = {key: os.environ.get(key) for key in cache_env}
            os.environ.update(cache_env)
            _STOP_WITH_PARENT = True  # the processes forked from here on end when this one does
            import litdata

            start = time.perf_counter()
            for split in SPLITS:
                if verbose:
                    print(f"{split}: {len(samples[split])} images, {workers} workers -> {out / split}")
                litdata.optimize(
                    fn=functools.partial(_read_sample, src=str(src.resolve())),
                    inputs=samples[split],
                    output_dir=str(tmp / split),
                    chunk_bytes=chunk_bytes,
                    num_workers=min(workers, len(samples[split])),
                    reorder_files=False,
                    keep_data_ordered=True,  # each worker writes its slice in the given (shuffled) order: reproducible
                    # fork: the workers inherit the imported modules (spawn re-imports torch & co. in each one)
                    start_method="fork" if sys.platform == "linux" else None,
                    verbose=verbose,
                )
            shutil.rmtree(tmp / ".cache", ignore_errors=True)
            stamp = {
                "format": FORMAT,
                "source": str(src.resolve()),
                "classes": classes["train"],
                "num_samples": {split: len(samples[split]) for split in SPLITS},
                "chunk_bytes": chunk_bytes,
                "seed": seed,
                "seconds": round(time.perf_counter() - start, 1),
            }
            write_text_atomic(tmp / STAMP, json.dumps(stamp, indent=2) + "\n")
        # published: umask modes, fsync, renamed onto out (our own earlier conversion, --overwrite, swapped out)
    finally:
        _STOP_WITH_PARENT = False
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if verbose:
        print(f"wrote {out}: {stamp['num_samples']} images of {len(stamp['classes'])} classes in {stamp['seconds']} s")
    return stamp


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m aa_lightning.data.prepare imagenet --src ... --out ...``."""
    parser = argparse.ArgumentParser(prog="python -m aa_lightning.data.prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imagenet = commands.add_parser("imagenet", help="ImageNet class folders -> litdata shards of the encoded JPEGs")
    imagenet.add_argument("--src", required=True, help="folder with train/<class>/ and val/<class>/ (only read)")
    imagenet.add_argument("--out", required=True, help="new or empty local folder for the shards")
    imagenet.add_argument("--workers", type=int, default=None, help="parallel reader processes (default: all cores)")
    imagenet.add_argument("--chunk-bytes", default="64MB", help="size of one shard file (default: 64MB)")
    imagenet.add_argument("--seed", type=int, default=0, help="seed of the order the samples are written in")
    imagenet.add_argument("--overwrite", action="store_true", help="redo a finished conversion in --out")
    imagenet.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        convert_imagenet(
            args.src, args.out, args.workers, args.chunk_bytes, args.overwrite, verbose=not args.quiet, seed=args.seed
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # run the package module's main so that the worker processes unpickle aa_lightning.data.prepare._read_sample
    from aa_lightning.data.prepare import main as _main

    sys.exit(_main())
