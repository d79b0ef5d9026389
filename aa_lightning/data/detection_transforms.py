"""Albumentations pipelines for detection: resize by shorter/longer side, flip, to [0, 1] tensors.

Resizing happens here, not in the model: :class:`ShortSideResize` applies torchvision's /
Detectron's rule ``scale = min(min_size / short_side, max_size / long_side)`` (e.g. 800 / 1333):
the shorter side becomes ``min_size`` unless the longer side would exceed ``max_size``. (Chaining
``A.SmallestMaxSize`` and ``A.LongestMaxSize`` cannot express this: ``LongestMaxSize`` also
*up*-scales, so either order is wrong for some aspect ratios.) The model's
internal ``GeneralizedRCNNTransform`` is configured not to resize again (see
``aa_lightning.tasks.detection``); it normalizes with the backbone's mean/std and pads the
batch to a multiple of 32. Keeping normalization in the model means a checkpoint takes plain
[0, 1] RGB images at inference.

Boxes use COCO's ``[x, y, w, h]`` in absolute pixels on the way in (``BboxParams(format="coco")``)
and come out in the same format, in the coordinates of the resized (and flipped) image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

#: Per-box fields carried alongside ``bboxes`` through the pipeline (filtered together with them).
BOX_FIELDS = ("labels", "ann_index")


class ShortSideResize(A.DualTransform):
    """Resize keeping the aspect ratio: ``scale = min(min_size / min(H, W), max_size / max(H, W))``.

    ``min_size`` may be a list: one value is drawn per call (multi-scale training), from the
    pipeline's seeded generator. The new size is ``round(H * scale) x round(W * scale)`` (bilinear),
    as albumentations' own max-size resizes compute it; boxes are scale invariant in
    albumentations' normalized representation, so they pass unchanged. Built on the public
    ``A.DualTransform`` (albumentations' guide to custom transforms), not its internal resize base.
    """

    def __init__(self, min_size: int | list[int] = 800, max_size: int = 1333, p: float = 1.0):
        super().__init__(p=p)
        self.min_size = min_size
        self.max_size = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.py_random.choice(self.min_size) if isinstance(self.min_size, list) else self.min_size
        return {"scale": min(short / min(height, width), self.max_size / max(height, width))}

    def apply(self, img: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        size = max(1, round(height * scale)), max(1, round(width * scale))
        return img if size == (height, width) else cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalized coordinates: unchanged by a uniform scale

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


def _bbox_params(min_visibility: float) -> A.BboxParams:
    return A.BboxParams(
        format="coco",
        label_fields=list(BOX_FIELDS),
        min_visibility=min_visibility,
        clip=True,  # COCO has boxes that overshoot the image border by a fraction of a pixel
    )


def _check_sizes(min_size: int | Sequence[int], max_size: int) -> None:
    sizes = [min_size] if isinstance(min_size, int) else list(min_size)
    if not sizes or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"min_size must be a positive int or a non-empty list of them; got {min_size!r}")
    if max_size <= 0:
        raise ValueError(f"max_size must be a positive int; got {max_size!r}")


def detection_train_transform(
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    hflip_prob: float = 0.5,
    min_visibility: float = 0.0,
    seed: int | None = None,
) -> A.Compose:
    """Training pipeline: resize (shorter side ``min_size``, a random choice if a list, longer side
    at most ``max_size``), horizontal flip with ``hflip_prob``, uint8 HWC -> float CHW in [0, 1]."""
    _check_sizes(min_size, max_size)
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1]; got {hflip_prob!r}")
    sizes = min_size if isinstance(min_size, int) else [int(s) for s in min_size]
    return A.Compose(
        [
            ShortSideResize(min_size=sizes, max_size=max_size),
            A.HorizontalFlip(p=hflip_prob),
            A.ToFloat(max_value=255.0),
            ToTensorV2(),
        ],
        bbox_params=_bbox_params(min_visibility),
        seed=seed,
    )


def detection_eval_transform(min_size: int = 800, max_size: int = 1333) -> A.Compose:
    """Evaluation pipeline: the deterministic resize of training at one scale, no flip."""
    _check_sizes(min_size, max_size)
    return A.Compose(
        [
            ShortSideResize(min_size=int(min_size), max_size=max_size),
            A.ToFloat(max_value=255.0),
            ToTensorV2(),
        ],
        bbox_params=_bbox_params(0.0),
    )
