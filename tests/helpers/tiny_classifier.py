"""A few training steps of ``ImageClassifier("predict_tiny_aa")`` (registered by tests/conftest.py) on a data
module, saved as a Lightning checkpoint: the checkpoints predict / export / metadata tests read."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from aa_lightning.tasks import ImageClassifier


def fit_and_save(data: pl.LightningDataModule, num_classes: int, path: Path, max_steps: int) -> Path:
    """``max_steps`` SGD steps from seed 0 on ``data`` (no logger, no checkpoints of its own), saved to ``path``."""
    torch.manual_seed(0)
    model = ImageClassifier("predict_tiny_aa", num_classes=num_classes, base_lr=0.1, warmup_epochs=0)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(path)
    return path
