"""Train at one size and test at another (timm's A3: 160 train, 224 test, crop 0.95) on an AA model, through the data
module's arguments: the AA layers' relative tables are resampled for the evaluation size, so this just works."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from aa_lightning.data import ImageNetDataModule
from aa_lightning.tasks import ImageClassifier

TRAIN, EVAL, RESIZE = 32, 48, 50  # resize 50 -> crop 48: crop fraction 0.96 (A3: 224 / 235 = 0.95)


class InputSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: set[tuple[bool, int, int]] = set()

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            pl_module.model.register_forward_pre_hook(lambda m, args: self.sizes.add((m.training, *args[0].shape[-2:])))


def test_an_aa_model_trained_at_32_is_validated_and_tested_at_48(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for wnid in ("n01", "n02"):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    data = ImageNetDataModule(
        data_dir=str(tmp_path), batch_size=4, num_workers=0, train_size=TRAIN, eval_size=EVAL, resize_size=RESIZE
    )
    pl.seed_everything(0)
    model = ImageClassifier(
        model_name="aa_wrn28_10",
        num_classes=2,
        model_kwargs={"depth": 10, "widen_factor": 1, "aa_stages": [2, 3], "aa_heads": 2, "aa_min_dkh": 4},
        reference_batch_size=None,
        warmup_epochs=0,
    )
    sizes = InputSizes()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[sizes],
    )
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data)
    assert sizes.sizes == {(True, TRAIN, TRAIN), (False, EVAL, EVAL)}
    assert torch.isfinite(torch.tensor(results["test/loss"])) and results["test/images"] == 8
    assert model.data_config["input_size"] == (3, EVAL, EVAL)
    assert model.data_config["crop_pct"] == EVAL / RESIZE
