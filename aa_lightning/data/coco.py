"""COCO detection: the standard 2017 layout read with pycocotools, as a LightningDataModule.

Layout under ``root`` (what cocodataset.org ships)::

    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/*.jpg
    val2017/*.jpg

Conventions (those of torchvision's detection reference and COCO's own evaluation):

- Category ids (COCO's are 1..90 with gaps) map to contiguous labels ``0..K-1`` in sorted id order
  (:class:`CategoryMapping`); predictions map back with ``to_category_id``.
- Training: crowd boxes (``iscrowd=1``) are dropped from the targets, boxes are clipped to the
  image and those with no area dropped, and images without a usable box are removed. Boxes with
  no area inside their image are counted and reported once per split (a warning naming the file);
  a training split left without one usable image, or an evaluation split without one usable
  (non-crowd, non-empty) box, is a ``ValueError`` naming the file and why.
- Annotation files are checked when read (:func:`load_coco_annotations`): unique image and
  annotation ids, integer ids and sizes, boxes of 4 finite numbers (booleans are not numbers), and
  every split's categories those of the split read first (the model's); each error names the file
  and the entry.
- Evaluation: every image is kept (also those without annotations) and crowd boxes are kept with
  ``iscrowd=1``, which COCO evaluation treats as regions where detections are ignored; ``area``
  is the annotation's own (segmentation) area, which decides small/medium/large as in COCO.

A sample is ``(image, target)``: ``image`` float ``[3, h, w]`` in [0, 1] after the pipeline of
:mod:`aa_lightning.data.detection_transforms`; ``target`` holds ``boxes`` ``[N, 4]`` xyxy in the
resized image, ``labels`` ``[N]`` int64, ``iscrowd`` ``[N]``, ``area`` ``[N]`` (original pixels),
``orig_boxes`` ``[N, 4]`` xyxy in the original image, ``image_id``, ``orig_size`` ``(H, W)`` and
``size`` ``(h, w)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from .detection_transforms import detection_eval_transform, detection_train_transform
from .loaders import SplitLoaders, check_loader_settings, make_loader

COCO_DOWNLOAD_HINT = (
    "Get COCO 2017 from https://cocodataset.org/#download (2017 Train images, 2017 Val images, "
    "2017 Train/Val annotations) and unpack it so that the folder holds annotations/ , "
    "train2017/ and val2017/ ; or try the built-in synthetic set "
    "(aa_lightning.data.SyntheticCOCODataModule, configs/quickstart_detection.yaml)."
)


class CategoryMapping:
    """COCO category ids <-> contiguous labels ``0..K-1`` (sorted by id)."""

    def __init__(self, categories: Sequence[dict[str, Any]]):
        ids = sorted(int(c["id"]) for c in categories)
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids in {ids}")
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        self.category_ids: list[int] = ids
        self.names: list[str] = [names[i] for i in ids]
        self._label_of = {cid: label for label, cid in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_label(self, category_id: int) -> int:
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not one of {self.category_ids}") from None

    def to_category_id(self, label: int) -> int:
        if not 0 <= int(label) < len(self.category_ids):
            raise KeyError(f"label {label} is outside 0..{len(self.category_ids) - 1}")
        return self.category_ids[int(label)]


def _is_number(value: Any) -> bool:
    """An int or a float, not a bool (JSON ``true`` is no coordinate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unique_image_ids(path: Path, images: list[dict[str, Any]]) -> None:
    """pycocotools indexes images by id: a repeated id drops an image and gives its boxes to another file."""
    files: dict[int, list[str]] = {}
    for im in images:
        files.setdefault(im["id"], []).append(str(im["file_name"]))
    repeated = {image_id: names for image_id, names in files.items() if len(names) > 1}
    if repeated:
        image_id, names = next(iter(repeated.items()))
        more = f"; {len(repeated)} ids repeat" if len(repeated) > 1 else ""
        raise ValueError(
            f"{path}: image id {image_id} is used by {len(names)} entries of 'images' ({', '.join(names[:4])}); "
            f"image ids must be unique{more}"
        )


def load_coco_annotations(path: str | os.PathLike) -> COCO:
    """Read and validate a COCO ``instances_*.json``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}. {COCO_DOWNLOAD_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON annotation file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(
            f"{path}: missing or non-list key(s) {missing}; a COCO instances file has "
            "'images', 'annotations' and 'categories' lists"
        )
    try:
        for im in data["images"]:
            im["file_name"], im["id"], im["width"], im["height"]
        category_ids = {int(c["id"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: malformed 'images' or 'categories' entry ({e!r}); images need "
            "id, file_name, width, height and categories need id, name"
        ) from e
    for im in data["images"]:
        for key in ("id", "width", "height"):
            if not _is_int(im[key]):  # true would be image 1, or 1 pixel
                raise ValueError(f"{path}: image {im['file_name']}: {key!r} must be an integer; got {im[key]!r}")
    _check_unique_image_ids(path, data["images"])
    image_ids = {im["id"] for im in data["images"]}
    annotation_ids: dict[Any, int] = {}
    for ann in data["annotations"]:
        where = f"{path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r}"
        if not isinstance(ann, dict):
            raise ValueError(f"{where} is not an object")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: 'bbox' must be [x, y, width, height] (4 finite numbers); got {bbox!r}")
        for key, known, listed in (("image_id", image_ids, "images"), ("category_id", category_ids, "categories")):
            if not _is_int(ann.get(key)):
                raise ValueError(f"{where}: {key} {ann.get(key)!r} is not an integer (the id of one of '{listed}')")
            if ann[key] not in known:
                raise ValueError(f"{where}: {key} {ann[key]!r} is not in '{listed}'")
        if "id" in ann:
            annotation_ids[ann["id"]] = annotation_ids.get(ann["id"], 0) + 1
    repeated = [(ann_id, n) for ann_id, n in annotation_ids.items() if n > 1]
    if repeated:
        ann_id, n = repeated[0]
        raise ValueError(
            f"{path}: annotation id {ann_id!r} is used by {n} annotations; annotation ids must be unique "
            f"(pycocotools keeps one, so evaluation would count another box twice); {len(repeated)} ids repeat"
        )
    coco = COCO()  # built from the validated dict instead of letting pycocotools re-read the file
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``; EXIF orientation ignored, as COCO's annotations assume."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"cannot decode image (corrupt or not an image): {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _clipped_xywh(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0 = max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))
    x1, y1 = min(float(width), float(bbox[0]) + float(bbox[2])), min(float(height), float(bbox[1]) + float(bbox[3]))
    return x0, y0, x1 - x0, y1 - y0


class COCODetection(Dataset):
    """One split of a COCO-format detection set (see the module docstring for samples)."""

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transform,
        train: bool,
        categories: CategoryMapping | None = None,
    ):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}. {COCO_DOWNLOAD_HINT}")
        self.coco = load_coco_annotations(self.annotation_file)
        #: the categories this file declares; ``categories`` (another split's, the model's) when given is used
        self.file_categories = CategoryMapping(self.coco.dataset["categories"])
        self.categories = categories or self.file_categories
        for ann in self.coco.dataset["annotations"]:  # here, not as a KeyError in the middle of an epoch
            if ann["category_id"] not in self.categories.category_ids:
                raise ValueError(
                    f"{self.annotation_file}: annotation {ann.get('id', '?')}: category_id {ann['category_id']} is "
                    f"not one of the categories the model predicts ({self.categories.category_ids}, those of the "
                    "split read first); every split must declare and use the same categories"
                )
        self.transform = transform
        self.train = train
        ids = sorted(self.coco.imgs)
        self.box_counts = self._count_boxes()
        if train:  # as torchvision's reference: drop images with no usable (non-crowd, non-empty) box
            ids = [i for i in ids if any(self._usable(a, i) for a in self.coco.imgToAnns[i])]
            if not ids:
                raise ValueError(
                    f"{self.annotation_file}: no training image has a usable box "
                    f"({self.describe_boxes()}); training needs images with non-crowd boxes "
                    "wider and taller than 1 pixel inside the image"
                )
        self.ids = ids
        if self.box_counts["invalid"]:
            counts = self.box_counts
            rank_zero_warn(
                f"{self.annotation_file}: dropped {counts['invalid']} of {counts['total']} "
                f"boxes with no area inside their image (e.g. {counts['example']})"
            )

    def _count_boxes(self) -> dict[str, Any]:
        """Annotations: ``total``, ``crowd``, ``invalid`` (no area left once clipped to the image: dropped),
        ``thin`` (1 pixel wide or high at most), ``usable`` (the others), ``example`` (one invalid box)."""
        counts: dict[str, Any] = {"total": 0, "crowd": 0, "invalid": 0, "thin": 0, "usable": 0, "example": None}
        for ann in self.coco.dataset["annotations"]:
            info = self.coco.imgs[ann["image_id"]]
            _, _, w, h = _clipped_xywh(ann["bbox"], info["width"], info["height"])
            counts["total"] += 1
            if not (w > 0 and h > 0):
                counts["invalid"] += 1
                counts["example"] = counts["example"] or (
                    f"annotation {ann.get('id', '?')}: bbox {ann['bbox']} in the {info['width']}x{info['height']} "
                    f"image {info['file_name']}"
                )
            elif ann.get("iscrowd", 0):
                counts["crowd"] += 1
            elif w <= 1 or h <= 1:
                counts["thin"] += 1
            else:
                counts["usable"] += 1
        return counts

    def describe_boxes(self) -> str:
        """Why boxes are (not) usable, in words: for error messages."""
        c = self.box_counts
        if c["total"] == 0:
            return f"'annotations' is empty for its {len(self.coco.imgs)} images"
        parts = [
            f"{c[key]} {what}"
            for key, what in (
                ("crowd", "crowd (iscrowd=1)"),
                ("invalid", "with no area inside their image"),
                ("thin", "1 pixel wide or high or less"),
                ("usable", "usable"),
            )
            if c[key]
        ]
        detail = f"; e.g. {c['example']}" if c["example"] else ""
        return f"{c['total']} annotations: " + ", ".join(parts) + detail

    def _usable(self, ann: dict, image_id: int) -> bool:
        info = self.coco.imgs[image_id]
        _, _, w, h = _clipped_xywh(ann["bbox"], info["width"], info["height"])
        return not ann.get("iscrowd", 0) and w > 1 and h > 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = read_rgb_image(path)
        height, width = image.shape[:2]
        if (height, width) != (int(info["height"]), int(info["width"])):
            raise ValueError(
                f"{path}: image is {width}x{height} but {self.annotation_file} says {info['width']}x{info['height']}"
            )
        anns = [a for a in self.coco.imgToAnns[image_id] if not (self.train and a.get("iscrowd", 0))]
        boxes, labels, keep = [], [], []
        for a in anns:
            x, y, w, h = _clipped_xywh(a["bbox"], width, height)
            if w > 0 and h > 0:
                boxes.append((x, y, w, h))
                labels.append(self.categories.to_label(a["category_id"]))
                keep.append(a)
        out = self.transform(
            image=image,
            bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=labels,
            ann_index=list(range(len(keep))),
        )
        xywh = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        kept = [keep[int(i)] for i in out["ann_index"]]
        orig = torch.tensor([_clipped_xywh(a["bbox"], width, height) for a in kept], dtype=torch.float32).reshape(-1, 4)
        valid = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)  # RetinaNet rejects degenerate boxes
        xywh, orig = xywh[valid], orig[valid]
        kept = [a for a, v in zip(kept, valid.tolist()) if v]
        labels = torch.as_tensor(list(out["labels"]), dtype=torch.int64).reshape(-1)[valid]
        new_h, new_w = out["image"].shape[-2:]
        target = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": labels,
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in kept], dtype=torch.int64),
            "area": torch.tensor(
                [float(a.get("area") or a["bbox"][2] * a["bbox"][3]) for a in kept], dtype=torch.float32
            ),
            "orig_boxes": torch.cat([orig[:, :2], orig[:, :2] + orig[:, 2:]], dim=1),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([new_h, new_w], dtype=torch.int64),
        }
        return out["image"], target


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Variable-size images stay a list (RetinaNet pads them itself): ``(images, targets)``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class COCODataModule(SplitLoaders, pl.LightningDataModule):
    """COCO 2017 (or any set in its layout) for RetinaNet.

    Args:
        root: folder holding ``annotations/`` and the image folders.
        train_split / val_split / test_split: split names; the files read are
            ``annotations/instances_{split}.json`` and ``{split}/``. COCO's test-dev has no public
            annotations, so ``test`` defaults to ``val2017`` (set ``test_split: null`` for none).
        batch_size: images per device and step (Detectron's 16 = 8 GPUs x 2).
        train_min_size: shorter side in training; a list samples one per image (multi-scale).
        eval_min_size / max_size: shorter side at evaluation / cap on the longer side.
        hflip_prob: horizontal flip probability in training.
        min_visibility: albumentations drops a box keeping less than this fraction of its area.
        seed: seed of the augmentation pipeline (each worker re-seeds from torch's worker seed).
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = "val2017",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        train_min_size: int | list[int] = 800,
        eval_min_size: int = 800,
        max_size: int = 1333,
        hflip_prob: float = 0.5,
        min_visibility: float = 0.0,
        seed: int = 0,
        pin_memory: bool = True,
    ):
        super().__init__()
        check_loader_settings(batch_size, num_workers)
        if not 0.0 <= min_visibility <= 1.0:
            raise ValueError(f"data.min_visibility must be in [0, 1]; got {min_visibility}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.pin_memory = pin_memory
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        # build the pipelines now so that bad sizes fail at start-up
        self.train_transform = detection_train_transform(train_min_size, max_size, hflip_prob, min_visibility, seed)
        self.eval_transform = detection_eval_transform(eval_min_size, max_size)
        self._categories: CategoryMapping | None = None
        self.train_set = self.val_set = self.test_set = None

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def image_dir(self, split: str) -> Path:
        return self.root / split

    @property
    def categories(self) -> CategoryMapping:
        """The category mapping (read from the validation annotations, the smaller file)."""
        if self._categories is None:
            with_categories = self.val_set or self.train_set or self.test_set
            if with_categories is not None:
                self._categories = with_categories.categories
            else:
                self._categories = CategoryMapping(
                    load_coco_annotations(self.annotation_file(self.val_split)).dataset["categories"]
                )
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def _dataset(self, split: str, train: bool) -> COCODetection:
        return COCODetection(
            self.image_dir(split),
            self.annotation_file(split),
            self.train_transform if train else self.eval_transform,
            train=train,
            categories=self._categories,
        )

    def _check_same_categories(self, dataset: COCODetection) -> None:
        if dataset.file_categories.category_ids != self.categories.category_ids:
            raise ValueError(
                f"{dataset.annotation_file} has category ids {dataset.file_categories.category_ids}, "
                f"which differ from the other split's {self.categories.category_ids}"
            )

    @staticmethod
    def _check_ground_truth(dataset: COCODetection, role: str, split: str) -> None:
        """An evaluation split without one usable box would score mAP -1 (and pick 'best' checkpoints by it)."""
        if dataset.box_counts["usable"] + dataset.box_counts["thin"] == 0:
            raise ValueError(
                f"data.{role}_split {split!r}: {dataset.annotation_file} has no usable ground truth "
                f"({dataset.describe_boxes()}), so its mAP would be -1; evaluate on a split with non-crowd boxes"
            )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._dataset(self.train_split, train=True)
            self._categories = self._categories or self.train_set.categories
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._dataset(self.val_split, train=False)
            self._check_ground_truth(self.val_set, "val", self.val_split)
            self._categories = self._categories or self.val_set.categories
            self._check_same_categories(self.val_set)
        if stage in ("test", None) and self.test_set is None and self.test_split:
            if self.test_split == self.val_split and self.val_set is not None:
                self.test_set = self.val_set  # the same file: read (and reported on) once
            else:
                self.test_set = self._dataset(self.test_split, train=False)
                self._check_ground_truth(self.test_set, "test", self.test_split)
            self._categories = self._categories or self.test_set.categories
            self._check_same_categories(self.test_set)

    def _loader(self, dataset: COCODetection, train: bool) -> DataLoader:
        # under DDP every evaluation image exactly once (repeats would count twice in the COCO metrics)
        return make_loader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=self.num_workers,
            train=train,
            trainer=self.trainer,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=collate_detection,
            seed=self.hparams.seed,  # training samples' augmentation seeded by (seed, epoch, index): exact resume
        )

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("data.test_split is null: there is no test split to evaluate")
        return super().test_dataloader()
