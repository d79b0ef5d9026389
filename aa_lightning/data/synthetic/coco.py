"""A built-in offline detection set in COCO format: coloured shapes on textured backgrounds.

``generate_synthetic_coco(root, ...)`` writes, deterministically from ``seed``::

    root/annotations/instances_train2017.json     root/train2017/000000000001.jpg ...
    root/annotations/instances_val2017.json       root/val2017/...
    root/synthetic_coco.json                      (the generation parameters)

and writes only into a missing or empty ``root`` or one it generated before (that stamp): a folder
holding anything else (a real COCO set) is a ``ValueError``, never overwritten.

Five classes with COCO-like non-contiguous ids: 1 circle, 3 square, 5 triangle, 7 cross, 9 bar
(a 3:1 to 5:1 rectangle). Each image (``image_size`` +-20 % per side) holds 1 to
``max_objects`` shapes of random colour, size (``min_object_size`` to half the shorter side) and
rotation, overlapping little, on a background of smooth noise, stripes or a gradient plus pixel
noise. Annotations are exact: ``segmentation`` is the polygon, rasterized with pycocotools
(the pixels painted are that mask), ``bbox`` the mask's tight box and ``area`` its pixel count,
as COCO computes them. ``SyntheticCOCODataModule`` generates the set on first use and then
reads it with the ordinary :class:`~aa_lightning.data.coco.COCODataModule`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from ..coco import COCODataModule
from .generated import write_generated_set

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 5, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "cross", "supercategory": "shape"},
    {"id": 9, "name": "bar", "supercategory": "shape"},
]
_META_FILE = "synthetic_coco.json"
_FORMAT_VERSION = 1


def _shape_polygon(name: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Polygon ``[P, 2]`` centred on (0, 0) with extent about ``size``, randomly rotated."""
    r = size / 2
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * r * 0.75
    elif name == "triangle":
        t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif name == "cross":
        a, b = r, r * 0.33
        pts = np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ],
            dtype=np.float64,
        )
    elif name == "bar":
        ratio = rng.uniform(3.0, 5.0)
        pts = np.array([[-1, -1 / ratio], [1, -1 / ratio], [1, 1 / ratio], [-1, 1 / ratio]]) * r
    else:
        raise ValueError(name)
    angle = rng.uniform(0, np.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # smooth colour noise
        low = rng.uniform(0, 255, size=(rng.integers(3, 8), rng.integers(3, 8), 3)).astype(np.float32)
        img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes
        period = rng.uniform(6, 24)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * np.pi / period)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = c0 + wave[..., None] * (c1 - c0)
    else:  # linear gradient
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx / max(1, width - 1) + yy / max(1, height - 1)) / 2
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = c0 + t[..., None] * (c1 - c0)
    img = img + rng.normal(0, 10, size=(height, width, 3))
    return img


def _render_image(
    height: int, width: int, max_objects: int, min_object_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    image = _background(height, width, rng)
    occupied = np.zeros((height, width), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            size = rng.uniform(min_object_size, max(min_object_size + 1, min(height, width) / 2))
            poly = _shape_polygon(category["name"], size, rng)
            lo, hi = poly.min(0), poly.max(0)
            if hi[0] - lo[0] >= width - 2 or hi[1] - lo[1] >= height - 2:
                continue
            cx = rng.uniform(1 - lo[0], width - 1 - hi[0])
            cy = rng.uniform(1 - lo[1], height - 1 - hi[1])
            polygon = np.round(poly + np.array([cx, cy]), 2).reshape(-1).tolist()
            rle = coco_mask.merge(coco_mask.frPyObjects([polygon], height, width))
            mask = coco_mask.decode(rle).astype(bool)  # COCO's own rasterization of the polygon
            if mask.sum() < 4 or (mask & occupied).sum() > 0.2 * mask.sum():
                continue
            occupied |= mask
            colour = rng.uniform(0, 255, 3)
            shade = rng.uniform(0.7, 1.0)
            image[mask] = colour * shade + rng.normal(0, 6, size=(int(mask.sum()), 3))
            objects.append(
                {
                    "category_id": category["id"],
                    "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                    "area": float(coco_mask.area(rle)),
                    "segmentation": [polygon],
                    "iscrowd": 0,
                }
            )
            break
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _write_split(
    root: Path,
    split: str,
    num_images: int,
    image_size: int,
    max_objects: int,
    min_object_size: int,
    seed: int,
    split_index: int,
) -> None:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_index, i])
        height = int(round(image_size * rng.uniform(0.8, 1.2)))
        width = int(round(image_size * rng.uniform(0.8, 1.2)))
        pixels, objects = _render_image(height, width, max_objects, min_object_size, rng)
        image_id = i + 1
        file_name = _image_file(image_id)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {image_dir / file_name}")
        (image_dir / file_name).write_bytes(encoded.tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    dataset = {
        "info": {
            "description": "aa-lightning synthetic shapes (COCO format)",
            "version": "1.0",
            "year": 2024,
            "contributor": "aa-lightning",
            "date_created": "n/a",
        },
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
        json.dump(dataset, f)


def _image_file(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def _files(params: dict[str, Any]) -> list[str]:
    """The files :func:`generate_synthetic_coco` writes with these parameters (of its stamp), images and annotations."""
    files = []
    for split, count in ((params["train_split"], params["num_train"]), (params["val_split"], params["num_val"])):
        files.append(f"annotations/instances_{split}.json")
        files += [f"{split}/{_image_file(image_id)}" for image_id in range(1, int(count) + 1)]
    return files


def check_synthetic_coco_args(
    num_train: int, num_val: int, image_size: int, max_objects: int, min_object_size: int
) -> None:
    """``ValueError`` naming the parameter when the synthetic set cannot be drawn with these sizes."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1; got {num_train}, {num_val}")
    if image_size < 32 or not 4 <= min_object_size <= image_size // 3:
        raise ValueError(
            f"need image_size >= 32 and 4 <= min_object_size <= image_size // 3; got {image_size}, {min_object_size}"
        )
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1; got {max_objects}")


def generate_synthetic_coco(
    root: str | Path,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 160,
    max_objects: int = 4,
    min_object_size: int = 12,
    seed: int = 0,
    train_split: str = "train2017",
    val_split: str = "val2017",
) -> Path:
    """Write the synthetic set under ``root`` (skipped if already there with the same parameters).

    ``root`` must be missing, empty or a folder this function generated (``synthetic_coco.json``
    stamp); any other folder, e.g. a real COCO set, is a ``ValueError`` and is left untouched. The
    set is written into a temporary sibling and renamed into place, so a killed generation never
    leaves a half set under ``root``.
    """
    check_synthetic_coco_args(num_train, num_val, image_size, max_objects, min_object_size)
    params = dict(
        version=_FORMAT_VERSION,
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        max_objects=max_objects,
        min_object_size=min_object_size,
        seed=seed,
        train_split=train_split,
        val_split=val_split,
    )

    def write(folder: Path) -> None:
        _write_split(folder, train_split, num_train, image_size, max_objects, min_object_size, seed, 0)
        _write_split(folder, val_split, num_val, image_size, max_objects, min_object_size, seed, 1)

    write_generated_set(
        root,
        _META_FILE,
        params,
        _files,
        write,
        is_own_stamp=lambda found: {"version", "num_train", "num_val", "train_split", "val_split"} <= set(found),
        what="the synthetic COCO set (SyntheticCOCODataModule)",
    )
    return Path(root)


class SyntheticCOCODataModule(COCODataModule):
    """The synthetic shapes set, generated under ``root`` on first use, read as COCO.

    Generation args (``num_train``, ``num_val``, ``image_size``, ``max_objects``,
    ``min_object_size``, ``generator_seed``) are those of :func:`generate_synthetic_coco`; the
    others are :class:`COCODataModule`'s. The test split is the validation split.
    """

    def __init__(
        self,
        root: str = "data/synthetic_coco",
        num_train: int = 600,
        num_val: int = 100,
        image_size: int = 160,
        max_objects: int = 4,
        min_object_size: int = 12,
        generator_seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        train_min_size: int | list[int] = 160,
        eval_min_size: int = 160,
        max_size: int = 256,
        hflip_prob: float = 0.5,
        min_visibility: float = 0.0,
        seed: int = 0,
        pin_memory: bool = True,
    ):
        super().__init__(
            root=root,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_min_size=train_min_size,
            eval_min_size=eval_min_size,
            max_size=max_size,
            hflip_prob=hflip_prob,
            min_visibility=min_visibility,
            seed=seed,
            pin_memory=pin_memory,
        )
        self.generator_args = dict(
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
            max_objects=max_objects,
            min_object_size=min_object_size,
            seed=generator_seed,
        )
        try:  # validate now (fail at start-up, not after the trainer is built)
            check_synthetic_coco_args(num_train, num_val, image_size, max_objects, min_object_size)
        except ValueError as err:
            raise ValueError(f"data: bad synthetic set parameters {self.generator_args}: {err}") from None

    def prepare_data(self) -> None:
        generate_synthetic_coco(self.root, **self.generator_args)

    @property
    def categories(self):
        if self._categories is None and not (self.root / _META_FILE).is_file():
            self.prepare_data()
        return super().categories
