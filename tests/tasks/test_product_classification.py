"""ImageClassifier's recipe options act on training, checked against numbers computed here."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.tasks import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class _LossCheck(pl.Callback):
    """The loss the training step returns vs label-smoothed cross-entropy computed from the logits."""

    def __init__(self, smoothing: float) -> None:
        self.smoothing, self.pairs = smoothing, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, targets = batch
        with torch.no_grad():
            log_p = torch.log_softmax(pl_module(images).double(), dim=1)  # train mode: the same batch statistics
        nll = -log_p.gather(1, targets[:, None])[:, 0]
        uniform = -log_p.mean(dim=1)
        self.expected = ((1 - self.smoothing) * nll + self.smoothing * uniform).mean()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs.append((float(outputs["loss"]), float(self.expected)))


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_training_loss_is_the_label_smoothed_cross_entropy(tmp_path, smoothing):
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", num_classes=5, label_smoothing=smoothing, warmup_epochs=0)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    check = _LossCheck(smoothing)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[check],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert len(check.pairs) == 2
    for loss, expected in check.pairs:
        assert loss == pytest.approx(expected, rel=1e-5)
