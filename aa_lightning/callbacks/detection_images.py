"""DetectionImageLogger: the first validation batch's images with boxes, to TensorBoard."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import draw_bounding_boxes


class DetectionImageLogger(pl.Callback):
    """After every validation (not the sanity check), log ``num_images`` images of its first batch as
    ``val/detections_<i>``: ground truth green, detections with score >= ``score_thresh`` red, labelled
    with the task's ``category_names``.

    Reads the detections that the task's ``validation_step`` returns (a list of torchvision
    ``{"boxes", "scores", "labels"}`` dicts in the network's input pixels). Only with a
    TensorBoardLogger, only on global rank 0; ``num_images: 0`` turns it off.
    """

    def __init__(self, num_images: int = 4, score_thresh: float = 0.3) -> None:
        if num_images < 0 or not 0.0 <= score_thresh <= 1.0:
            raise ValueError(
                f"DetectionImageLogger: num_images must be >= 0 and score_thresh in [0, 1], "
                f"got {num_images}, {score_thresh}"
            )
        self.num_images, self.score_thresh = num_images, score_thresh

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or self.num_images == 0:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not isinstance(outputs, list):
            return
        names = getattr(pl_module, "category_names", None)
        images, targets = batch
        for i, (image, target, det) in enumerate(zip(images, targets, outputs)):
            if i >= self.num_images:
                break
            logger.experiment.add_image(
                f"val/detections_{i}", self.draw(image, target, det, names), trainer.global_step
            )

    def draw(self, image: torch.Tensor, target: dict, detections: dict, names: Any) -> torch.Tensor:
        """uint8 [3, H', W'] canvas of ``image`` ([3, H, W] in [0, 1]), enlarged to >= 256 px on its short side
        so that labels stay readable."""

        def label(k: int) -> str:
            return names[k] if names is not None and k < len(names) else str(k)

        zoom = max(1, math.ceil(256 / min(image.shape[-2:])))
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
        canvas = canvas.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)
        if len(target["boxes"]):
            canvas = draw_bounding_boxes(
                canvas,
                target["boxes"].cpu() * zoom,
                colors="lime",
                width=1,
                labels=[label(int(k)) for k in target["labels"]],
            )
        keep = detections["scores"] >= self.score_thresh
        if keep.any():
            labels = [
                f"{label(int(k))} {s:.2f}"
                for k, s in zip(detections["labels"][keep].tolist(), detections["scores"][keep].tolist())
            ]
            canvas = draw_bounding_boxes(
                canvas, detections["boxes"][keep].float().cpu() * zoom, colors="red", width=1, labels=labels
            )
        return canvas
