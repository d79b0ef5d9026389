"""ImageClassifier: schedule values at known steps, metrics, parameter groups, errors; in-process runs."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.tasks import ImageClassifier

TINY = "test_resnet"  # timm's 0.37M-parameter test network


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class _Data(pl.LightningDataModule):
    def __init__(self, n=48, batch_size=8, num_classes=4, size=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.batch_size, self.num_classes = batch_size, num_classes

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


class _RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_lr_follows_scaled_warmup_then_cosine_at_every_step(tmp_path):
    # 48 images, batch 8 -> 6 steps per epoch; 3 epochs -> 18 steps; warm-up 0.5 epoch -> 3 steps
    model = ImageClassifier(TINY, num_classes=4, base_lr=0.4, warmup_epochs=0.5, weight_decay=0.0)
    recorder = _RecordLR()
    _trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[recorder]).fit(model, datamodule=_Data())
    peak = 0.4 * 8 / 256  # lr = base_lr * B_global / 256
    expected = []
    for step in range(18):
        if step < 3:
            expected.append(peak * (step + 1) / 3)
        else:
            expected.append(peak * 0.5 * (1 + math.cos(math.pi * (step - 3) / 15)))
    got = [lrs[0] for lrs in recorder.lrs]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(len(set(lrs)) == 1 for lrs in recorder.lrs)  # the no-decay group shares the schedule


def test_step_schedule_and_unscaled_lr(tmp_path):
    model = ImageClassifier(
        TINY,
        num_classes=4,
        base_lr=0.05,
        reference_batch_size=None,
        warmup_epochs=0,
        schedule="step",
        lr_milestone_epochs=[1, 2],
        lr_gamma=0.1,
        optimizer="adamw",
    )
    recorder = _RecordLR()
    _trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[recorder]).fit(model, datamodule=_Data())
    got = [lrs[0] for lrs in recorder.lrs]
    assert got == pytest.approx([0.05] * 6 + [0.005] * 6 + [0.0005] * 6)
    assert isinstance(model.trainer.optimizers[0], torch.optim.AdamW)


def test_no_weight_decay_on_norms_and_biases(tmp_path):
    model = ImageClassifier(TINY, num_classes=4, weight_decay=5e-4, nesterov=True)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=_Data())
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0 and decay["nesterov"]
    names = {id(p): n for n, p in model.model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    norm_and_bias = {n for n in names.values() if n.endswith(".bias") or ".bn" in n or "norm" in n}
    assert norm_and_bias and norm_and_bias <= {names[id(p)] for p in no_decay["params"]}


def test_top1_top5_match_a_direct_count():
    model = ImageClassifier(TINY, num_classes=10)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 10, generator=g), torch.randint(0, 10, (50,), generator=g)
    model.test_metrics.update(logits, targets)
    result = model.test_metrics.compute()
    top5 = logits.topk(5, dim=1).indices
    assert result["test/top1"].item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert result["test/top5"].item() == pytest.approx((top5 == targets[:, None]).any(1).float().mean().item())


def test_learns_separable_data(tmp_path):
    """Classes = which image quadrant is bright: a few epochs must beat chance by far."""
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, 16, 16, generator=g) * 0.3
    y = torch.arange(128) % 4
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 2.0
    data = _Data()
    data.x, data.y, data.batch_size = x, y, 16
    model = ImageClassifier(TINY, num_classes=4, base_lr=2.0, warmup_epochs=0.5, weight_decay=0)
    _trainer(tmp_path, max_epochs=6).fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_checkpoint_carries_model_name_and_kwargs(tmp_path):
    model = ImageClassifier(TINY, num_classes=4, model_kwargs={"drop_rate": 0.25})
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=_Data())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams.model_name == TINY and loaded.hparams.model_kwargs == {"drop_rate": 0.25}
    assert loaded.model.drop_rate == 0.25
    other = ImageClassifier("resnet10t", num_classes=4)
    with pytest.raises(ValueError, match=r"model_name='test_resnet'.*model_name='resnet10t'"):
        other.on_load_checkpoint(torch.load(path, weights_only=False))


def test_class_count_must_match_the_data(tmp_path):
    model = ImageClassifier(TINY, num_classes=7)
    with pytest.raises(ValueError, match="model.num_classes is 7 but the data has 4 classes"):
        _trainer(tmp_path, max_steps=1).fit(model, datamodule=_Data())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_name": "no_such_net"}, "model.model_name: unknown timm model 'no_such_net'"),
        ({"model_kwargs": {"bogus_option": 1}}, "model.model_kwargs .*bogus_option"),
        ({"label_smoothing": 1.5}, r"model.label_smoothing must be in \[0, 1\)"),
        ({"base_lr": -1.0}, "model.base_lr must be > 0"),
    ],
)
def test_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(**{"model_name": TINY, "num_classes": 4, **kwargs})
