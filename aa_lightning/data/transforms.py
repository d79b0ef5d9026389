"""albumentations pipelines for classification, seeded per DataLoader worker.

- CIFAR: pad 4 (zeros) + random 32x32 crop + horizontal flip + normalize (training);
  normalize only (evaluation).
- ImageNet: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3) + flip + normalize (training);
  resize the short side to 256 + center crop 224 + normalize (evaluation).
- Training only, when set: RandAugment / AutoAugment / TrivialAugment and colour jitter after the flip,
  random erasing after normalize (:mod:`.augment`, seeded per sample like the rest of the pipeline).

:func:`eval_data_config` describes an evaluation transform in timm's data-config keys (``input_size``,
``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``): the data modules provide it as
``data_config``, training records it in every checkpoint, and predict / export read it from there
(``timm.data.create_transform(**data_config)`` is their preprocessing).

albumentations 2.x draws from its own generator (``Compose(seed=...)``), not from numpy's or
torch's global state. The training loaders (:func:`aa_lightning.data.loaders.make_loader`) re-seed
it before every sample from (seed, epoch, index) through :meth:`AlbumentationsTransform.set_random_seed`,
so a sample's augmentation is the same whichever worker loads it and after a resume. Used outside
those loaders, the pipeline is re-seeded once in each DataLoader worker from ``torch.initial_seed()``
(workers differ, epochs differ, reproducible from the seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import get_worker_info

from aa_lightning.constants import CIFAR100_MEAN, CIFAR100_STD

from .augment import AugmentSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AlbumentationsTransform:
    """``image uint8 [H, W, 3] -> float tensor [3, H', W']`` through an albumentations ``Compose``.

    The pipeline is seeded with ``seed`` in the main process, and once per DataLoader worker
    with ``torch.initial_seed()`` of that worker.
    """

    def __init__(self, transforms: Sequence[A.BasicTransform], seed: int = 0) -> None:
        self.pipeline = A.Compose(list(transforms), seed=seed)
        self._worker_seeded = False

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not self._worker_seeded and get_worker_info() is not None:
            self.pipeline.set_random_seed(torch.initial_seed() % 2**32)
            self._worker_seeded = True  # only in this worker's copy
        return self.pipeline(image=image)["image"]

    def set_random_seed(self, seed: int) -> None:
        """Re-seed the pipeline's generators (the loaders call it before every training sample)."""
        self.pipeline.set_random_seed(seed)
        self._worker_seeded = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


def _normalize(
    mean: Sequence[float], std: Sequence[float], normalized_steps: Sequence[A.BasicTransform] = ()
) -> list[A.BasicTransform]:
    """Normalize, the steps on the normalized image (random erasing), float tensor [3, H, W]."""
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), *normalized_steps, ToTensorV2()]


def _with_augment(
    transforms: list[A.BasicTransform],
    augment: AugmentSettings | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[A.BasicTransform]:
    """``transforms`` (crop / flip), then ``augment``'s uint8 steps, normalize, its normalized-image steps."""
    augment = augment or AugmentSettings()
    return transforms + augment.image_steps(image_size, mean) + _normalize(mean, std, augment.normalized_steps())


def cifar_train_transform(
    mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD,
    pad: int = 4,
    hflip: bool = True,
    image_size: int = 32,
    seed: int = 0,
    augment: AugmentSettings | None = None,
) -> AlbumentationsTransform:
    """Zero-pad ``pad`` pixels, random ``image_size`` crop, optional horizontal flip, ``augment``'s steps
    (:mod:`.augment`; none by default), normalize."""
    transforms: list[A.BasicTransform] = []
    if pad > 0:
        transforms += [
            A.PadIfNeeded(image_size + 2 * pad, image_size + 2 * pad, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(image_size, image_size),
        ]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    return AlbumentationsTransform(_with_augment(transforms, augment, image_size, mean, std), seed=seed)


def cifar_eval_transform(
    mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD
) -> AlbumentationsTransform:
    """Normalize only."""
    return AlbumentationsTransform(_normalize(mean, std))


def imagenet_train_transform(
    image_size: int = 224,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
    augment: AugmentSettings | None = None,
) -> AlbumentationsTransform:
    """RandomResizedCrop ``image_size`` (area ``scale``, aspect 3/4-4/3), optional flip, ``augment``'s steps
    (:mod:`.augment`; none by default), normalize."""
    transforms: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(image_size, image_size), scale=tuple(scale), ratio=(3 / 4, 4 / 3), interpolation=cv2.INTER_LINEAR
        )
    ]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    return AlbumentationsTransform(_with_augment(transforms, augment, image_size, mean, std), seed=seed)


def imagenet_eval_transform(
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> AlbumentationsTransform:
    """Resize the short side to ``resize_size``, center crop ``image_size``, normalize."""
    transforms = [
        A.SmallestMaxSize(max_size=resize_size, interpolation=cv2.INTER_LINEAR),
        A.CenterCrop(image_size, image_size),
    ]
    return AlbumentationsTransform(transforms + _normalize(mean, std))


def eval_data_config(
    image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear"
) -> dict[str, Any]:
    """The evaluation transform "resize the short side to ``resize_size``, center crop ``image_size``, normalize"
    in timm's data-config keys, for ``timm.data.create_transform(**config)`` and a model's ``pretrained_cfg``.

    ``crop_pct`` is chosen so that timm's ``floor(image_size / crop_pct)`` is exactly ``resize_size``
    (``image_size / resize_size`` alone may land a float ulp below it).
    """
    if not 0 < image_size <= resize_size:
        raise ValueError(f"eval_data_config: need 0 < image_size <= resize_size, got {image_size}, {resize_size}")
    crop_pct = image_size / resize_size
    while math.floor(image_size / crop_pct) < resize_size:
        crop_pct = math.nextafter(crop_pct, 0.0)
    while math.floor(image_size / crop_pct) > resize_size:
        crop_pct = math.nextafter(crop_pct, 1.0)
    return {
        "input_size": (3, int(image_size), int(image_size)),
        "interpolation": interpolation,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }
