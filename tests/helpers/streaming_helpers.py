"""Small ImageNet-style class folders and their litdata shards, for the streaming tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from helpers.cli_helpers import REPO, run_python


def write_tree(root: Path, per_class: dict[str, int], classes: list[str], size: int = 20) -> None:
    """``root/<split>/<class>/*.JPEG``: ``per_class[split]`` small random JPEGs per class (each image distinct,
    so that its pixels identify it)."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)


def convert(src: Path, out: Path, chunk_bytes: str = "4KB") -> None:
    """``python -m aa_lightning.data.prepare imagenet`` (1 worker) from ``src`` into ``out``."""
    result = run_python(
        "-m",
        "aa_lightning.data.prepare",
        "imagenet",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
        "--chunk-bytes",
        chunk_bytes,
        "--quiet",
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
