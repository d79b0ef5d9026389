"""TrainingImageGrid: log a grid of the first augmented training batch to TensorBoard."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger

from aa_lightning.viz.overlay import denormalize


class TrainingImageGrid(pl.Callback):
    """At the first training batch of a fit, log ``num_images`` augmented inputs as ``train/images``.

    Images are un-normalized with the DataModule's ``mean`` / ``std`` when it has them (else
    min-max scaled per image). Only with a TensorBoardLogger, only on global rank 0;
    ``num_images: 0`` turns it off.
    """

    def __init__(self, num_images: int = 32, nrow: int = 8) -> None:
        if num_images < 0 or nrow < 1:
            raise ValueError(f"image_grid.num_images must be >= 0 and image_grid.nrow >= 1, got {num_images}, {nrow}")
        self.num_images, self.nrow = num_images, nrow
        self._logged = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._logged or self.num_images == 0 or not trainer.is_global_zero:
            return
        self._logged = True
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        images = batch[0] if isinstance(batch, (tuple, list)) else None
        if logger is None or not isinstance(images, torch.Tensor) or images.ndim != 4:
            return
        mean, std = getattr(trainer.datamodule, "mean", None), getattr(trainer.datamodule, "std", None)
        images = denormalize(images[: self.num_images], mean, std)
        grid = torchvision.utils.make_grid(images, nrow=self.nrow, padding=2)
        logger.experiment.add_image("train/images", grid, global_step=trainer.global_step)
