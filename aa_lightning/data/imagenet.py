"""ImageNet (ILSVRC-2012) as a LightningDataModule: ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``.

The layout is torchvision's ``ImageFolder`` (classes = sorted folder names); data/README.md says
how to arrange the official validation images into class folders. Training: RandomResizedCrop
224 + horizontal flip; evaluation: resize 256 + center crop 224. The ``val/`` images serve both
validation and test, as ImageNet results (the paper's included) are reported on them.

Decoding: PIL with JPEG draft mode — the decoder downscales by 1/2, 1/4 or 1/8 in the DCT
domain while the image stays at least as large as needed (``train_size`` / ``resize_size``
on its short side), which cuts decoding time of large photos several-fold. A file that cannot be
decoded raises an error that names it.

The class folders are scanned by :func:`.class_folders.scan_class_folders` (also the shard converter's scan):
``ImageFolder``'s classes and order, but a folder link back into the tree (``train/n01/loop -> ..``), a folder
reached twice through links, or a class folder without an image is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from .augment import AugmentSettings
from .class_folders import scan_class_folders
from .images import rgb_array
from .loaders import SplitLoaders, check_loader_settings
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_data_config,
    imagenet_eval_transform,
    imagenet_train_transform,
)


class ClassFolderImages(ImageFolder):
    """torchvision's ``ImageFolder`` on the scan of :func:`.class_folders.scan_class_folders`: the same classes,
    samples and order, but a folder link back into the tree or an empty class folder is an
    :class:`~.class_folders.ImageTreeError` naming it (``ImageFolder`` loops through such links)."""

    def __init__(self, root: str, loader: Callable[[str], Any], transform: Callable | None = None) -> None:
        self._scan = scan_class_folders(root)
        super().__init__(root, loader=loader, transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = self._scan[0]
        return classes, {name: label for label, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any):
        return list(self._scan[1])


class ImageDecodeError(RuntimeError):
    """An image file that cannot be read or decoded."""


class RGBLoader:
    """``path -> uint8 [H, W, 3]`` RGB; with ``min_size`` the JPEG decoder may downscale (draft mode)
    as long as both sides stay >= ``min_size``. 16-bit greyscale is scaled, not clipped (:func:`.images.rgb_array`)."""

    def __init__(self, min_size: int | None = None) -> None:
        self.min_size = min_size

    def __call__(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                if self.min_size and image.format == "JPEG":
                    image.draft("RGB", (self.min_size, self.min_size))
                return rgb_array(image)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for bad files
            raise ImageDecodeError(f"cannot decode image {path}: {err}") from err


class ImageNetDataModule(SplitLoaders, pl.LightningDataModule):
    """ImageNet train/val loaders from class folders.

    Args:
        data_dir: folder holding ``train/`` and ``val/``, each with one sub-folder per class.
        batch_size: images per device and step (the global batch is this x devices x nodes).
        num_workers: DataLoader worker processes per device.
        train_size: RandomResizedCrop output size.
        eval_size, resize_size: evaluation center crop after resizing the short side to ``resize_size``.
        min_scale: smallest crop area fraction of RandomResizedCrop.
        hflip: random horizontal flips.
        draft: let the JPEG decoder downscale large images (faster, same result size).
        seed: seed of the augmentation pipeline.
        pin_memory: pin host memory (default: when CUDA is available).
        persistent_workers: keep workers alive between epochs.
        auto_augment, color_jitter, random_erasing, random_erasing_mode, random_erasing_count: training-only
            per-sample augmentation, off by default (:mod:`aa_lightning.data.augment`: ``auto_augment`` e.g.
            ``rand-m9-mstd0.5-inc1``, ``autoaugment``, ``autoaugment-cifar``, ``trivialaugment``).
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 128,
        num_workers: int = 8,
        train_size: int = 224,
        eval_size: int = 224,
        resize_size: int = 256,
        min_scale: float = 0.08,
        hflip: bool = True,
        draft: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        auto_augment: str | None = None,
        color_jitter: float | None = None,
        random_erasing: float = 0.0,
        random_erasing_mode: str = "const",
        random_erasing_count: int = 1,
    ) -> None:
        super().__init__()
        check_loader_settings(batch_size, num_workers)
        self.augment = AugmentSettings(
            auto_augment, random_erasing, random_erasing_mode, random_erasing_count, color_jitter
        )
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"data.min_scale must be in (0, 1], got {min_scale}")
        if resize_size < eval_size:
            raise ValueError(f"data.resize_size ({resize_size}) must be >= data.eval_size ({eval_size})")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self.train_set = self.val_set = self.test_set = None

    @property
    def data_config(self) -> dict[str, Any]:
        """The evaluation preprocessing in timm's data-config keys (recorded in checkpoints and exports): short
        side to ``resize_size``, center crop ``eval_size``, normalize with ``mean`` / ``std``."""
        return eval_data_config(self.hparams.eval_size, self.hparams.resize_size, self.mean, self.std)

    def _folder(self, split: str, stage_hint: str) -> str:
        folder = self.data_dir / split
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise FileNotFoundError(
                f"ImageNet {stage_hint} images not found: looked for class folders in {folder} "
                f"(expected {folder}/<class, e.g. n01440764>/<image>.JPEG). "
                "See data/README.md for how to arrange ILSVRC-2012 train and val images."
            )
        return str(folder)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        eval_loader = RGBLoader(hp.resize_size if hp.draft else None)
        eval_transform = imagenet_eval_transform(hp.eval_size, hp.resize_size, self.mean, self.std)
        self.val_set = ClassFolderImages(
            self._folder("val", "validation"), loader=eval_loader, transform=eval_transform
        )
        self.test_set = self.val_set  # ILSVRC-2012's labelled val images are also the test set
        self.class_names = list(self.val_set.classes)
        self.num_classes = len(self.class_names)
        if stage in (None, "fit"):
            train_transform = imagenet_train_transform(
                hp.train_size, (hp.min_scale, 1.0), hp.hflip, self.mean, self.std, seed=hp.seed, augment=self.augment
            )
            self.train_set = ClassFolderImages(
                self._folder("train", "training"),
                loader=RGBLoader(hp.train_size if hp.draft else None),
                transform=train_transform,
            )
            if self.train_set.classes != self.val_set.classes:
                only_train = sorted(set(self.train_set.classes) - set(self.val_set.classes))[:5]
                only_val = sorted(set(self.val_set.classes) - set(self.train_set.classes))[:5]
                raise ValueError(
                    f"{self.data_dir}/train and {self.data_dir}/val must have the same class folders; "
                    f"only in train: {only_train}, only in val: {only_val}"
                )
