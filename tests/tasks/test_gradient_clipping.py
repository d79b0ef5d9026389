"""trainer.gradient_clip_val / gradient_clip_algorithm (Lightning's clipping, as quickstart_modern.yaml uses it) reach
the classifier's optimizer: every step sees gradients of global L2 norm <= the value."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.tasks import ImageClassifier


def gradient_norms(clip: float | None) -> list[float]:
    pl.seed_everything(0)
    model = ImageClassifier(model_name="test_resnet", num_classes=3, reference_batch_size=None, warmup_epochs=0)
    norms: list[float] = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def hook(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(hook)  # after the closure: backward, then clipping

    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        gradient_clip_algorithm="norm",
        callbacks=[Record()],
    )
    data = TensorDataset(torch.randn(24, 3, 16, 16), torch.arange(24) % 3)
    trainer.fit(model, DataLoader(data, batch_size=8))
    return norms


def test_gradient_clipping_by_norm_bounds_every_steps_gradient_norm():
    unclipped, clipped = gradient_norms(None), gradient_norms(0.05)
    assert len(clipped) == 3 and min(unclipped) > 0.05  # the bound is active
    assert all(n <= 0.05 * (1 + 1e-4) for n in clipped), clipped
