"""Small COCO-format fixtures written to disk for the detection tests."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def write_coco_split(
    root: Path, split: str, images: list[dict], annotations: list[dict], categories: list[dict]
) -> Path:
    """Write ``root/annotations/instances_{split}.json`` and a JPEG per image (random pixels)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for im in images:
        pixels = rng.integers(0, 255, size=(im["height"], im["width"], 3), dtype=np.uint8)
        cv2.imwrite(str(root / split / im["file_name"]), pixels)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def crowd_and_empty_set(root: Path, split: str = "val2017") -> Path:
    """Three 40x60 images with non-contiguous category ids 1, 5, 90:
    image 1: a normal box (id 5) and a crowd box (id 90); image 2: a crowd box only;
    image 3: no annotation at all."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 60, "height": 40} for i in (1, 2, 3)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 5, 20, 10], "area": 150.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 90, "bbox": [30, 20, 25, 15], "area": 300.0, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 900.0, "iscrowd": 1},
    ]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    return write_coco_split(root, split, images, annotations, categories)
