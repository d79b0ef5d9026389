"""CIFAR-100 as a LightningDataModule (the paper's Table 1 data).

Reads the official ``cifar-100-python/`` pickles under ``data_dir`` (see data/README.md);
``download: true`` fetches them with torchvision when online. Training: pad-4 random crop +
horizontal flip + normalize; evaluation: normalize. ``val_split: N`` holds out N training
images (a seeded random subset) for validation; ``val_split: 0`` validates on the test set, as
the paper trains on all 50,000 images (pair it with testing the last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import AugmentSettings
from .cifar_format import BASE_FOLDER, read_cifar_meta, read_cifar_split
from .loaders import SplitLoaders, check_loader_settings
from .transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    AlbumentationsTransform,
    cifar_eval_transform,
    cifar_train_transform,
    eval_data_config,
)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
IMAGE_SIZE = 32  # CIFAR-format images are 32x32


class ArrayImageDataset(Dataset):
    """``images`` uint8 [N, H, W, 3] and ``labels`` [N] -> (transform(image) [3, H', W'], label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: AlbumentationsTransform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class CIFAR100DataModule(SplitLoaders, pl.LightningDataModule):
    """CIFAR-100 train/val/test loaders.

    Args:
        data_dir: folder that holds ``cifar-100-python/`` (or receives it when downloading).
        batch_size: images per device and step (the global batch is this x devices x nodes).
        num_workers: DataLoader worker processes per device.
        val_split: training images held out for validation; 0 validates on the test set.
        download: fetch the data with torchvision when it is missing (needs internet).
        pad: zero padding before the random 32x32 crop (0 disables the crop).
        hflip: random horizontal flips.
        mean, std: per-channel normalization of [0, 1] pixel values.
        seed: seed of the augmentation pipeline and of the validation split.
        pin_memory: pin host memory (default: when CUDA is available).
        persistent_workers: keep workers alive between epochs.
        auto_augment, color_jitter, random_erasing, random_erasing_mode, random_erasing_count: training-only
            per-sample augmentation, off by default (:mod:`aa_lightning.data.augment`: ``auto_augment`` e.g.
            ``rand-m9-mstd0.5-inc1``, ``autoaugment-cifar``, ``autoaugment``, ``trivialaugment``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        val_split: int = 0,
        download: bool = True,
        pad: int = 4,
        hflip: bool = True,
        mean: tuple[float, float, float] = CIFAR100_MEAN,
        std: tuple[float, float, float] = CIFAR100_STD,
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
        if val_split < 0:
            raise ValueError(f"data.val_split must be >= 0 (images held out), got {val_split}")
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
        """The evaluation preprocessing in timm's data-config keys (recorded in checkpoints and exports): a
        32x32 input, normalized with ``mean`` / ``std``; another image is resized (short side) and center-cropped."""
        return eval_data_config(IMAGE_SIZE, IMAGE_SIZE, self.mean, self.std)

    @property
    def folder(self) -> Path:
        return self.data_dir / BASE_FOLDER

    def _missing(self) -> list[Path]:
        return [self.folder / name for name in ("train", "test", "meta") if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        """Download CIFAR-100 with torchvision if it is missing and ``download`` is on (local rank 0)."""
        if not self._missing() or not self.hparams.download:
            return
        import torchvision

        try:
            for train in (True, False):
                torchvision.datasets.CIFAR100(root=str(self.data_dir), train=train, download=True)
        except Exception as err:  # offline, proxy, disk full, corrupt archive ...
            raise RuntimeError(
                f"could not download CIFAR-100 into {self.data_dir}: {err}\n{self._how_to_get_it()}"
            ) from err

    def _how_to_get_it(self) -> str:
        return (
            f"Get it either with `--data.download true` (needs internet; torchvision fetches {CIFAR100_URL}) "
            f"or by downloading that archive and extracting it into {self.data_dir}/ so that {self.folder}/train "
            "exists "
            "(see data/README.md). For an offline try-out use the built-in data set: "
            "python train.py --config configs/quickstart.yaml"
        )

    def setup(self, stage: str | None = None) -> None:
        missing = self._missing()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-100 not found: looked for {', '.join(str(p) for p in missing)}.\n{self._how_to_get_it()}"
            )
        self.class_names = read_cifar_meta(self.data_dir)
        self.num_classes = len(self.class_names)
        eval_transform = cifar_eval_transform(self.mean, self.std)
        if stage in (None, "fit", "validate"):
            images, labels = read_cifar_split(self.data_dir, "train", self.num_classes)
            train_transform = cifar_train_transform(
                self.mean,
                self.std,
                self.hparams.pad,
                self.hparams.hflip,
                IMAGE_SIZE,
                seed=self.hparams.seed,
                augment=self.augment,
            )
            n_val = self.hparams.val_split
            if n_val >= len(labels):
                raise ValueError(f"data.val_split ({n_val}) must be smaller than the {len(labels)} training images")
            order = np.random.Generator(np.random.PCG64(self.hparams.seed)).permutation(len(labels))
            train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
            self.train_set = ArrayImageDataset(images[train_idx], labels[train_idx], train_transform)
            if n_val > 0:
                self.val_set = ArrayImageDataset(images[val_idx], labels[val_idx], eval_transform)
        if stage in (None, "test") or (self.hparams.val_split == 0 and stage in ("fit", "validate")):
            images, labels = read_cifar_split(self.data_dir, "test", self.num_classes)
            self.test_set = ArrayImageDataset(images, labels, eval_transform)
            if self.hparams.val_split == 0:
                self.val_set = self.test_set
