"""callbacks.ModelEMA (Lightning's EMAWeightAveraging): the EMA after N steps is the closed-form EMA of the recorded
weights; validation, the test after fitting, the checkpoint's state_dict and the readers of predict / export
use the EMA weights; the raw weights travel beside them for a resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.callbacks import ModelEMA
from aa_lightning.models.weights import load_checkpoint, read_checkpoint
from aa_lightning.tasks import ImageClassifier

DECAY, START, EVERY, STEPS = 0.8, 1, 2, 6


class Recorder(pl.Callback):
    """The weights after every optimizer step, and those the module holds during validation / test."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.at_validation: list[dict[str, torch.Tensor]] = []
        self.at_test: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(self.weights(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.at_validation.append(self.weights(pl_module))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.at_test.append(self.weights(pl_module))


def closed_form_ema(history: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """float64: theta_ema = theta at the first update step, then decay * theta_ema + (1 - decay) * theta at each
    update step k (k >= START, k % EVERY == 0; k counts optimizer steps from 0)."""
    ema = None
    for k, weights in enumerate(history):
        if k < START or k % EVERY:
            continue
        if ema is None:
            ema = {n: w.double().clone() for n, w in weights.items()}
        else:
            ema = {n: DECAY * ema[n] + (1 - DECAY) * weights[n].double() for n in ema}
    return ema


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    pl.seed_everything(0)
    images, labels = torch.rand(48, 3, 16, 16), torch.arange(48) % 4
    train = DataLoader(TensorDataset(images, labels), batch_size=8)
    val = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    model = ImageClassifier(
        model_name="test_resnet", num_classes=4, reference_batch_size=None, base_lr=0.1, warmup_epochs=0
    )
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp, filename="best", monitor="val/top1", mode="max")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[
            ModelEMA(decay=DECAY, update_starting_at_step=START, update_every_n_steps=EVERY),
            recorder,
            checkpoint,
        ],
    )
    trainer.fit(model, train, val)
    trainer.test(model, val, ckpt_path=checkpoint.best_model_path, weights_only=True)
    return recorder, checkpoint.best_model_path


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert torch.allclose(got[name].double(), want[name].double(), rtol=1e-5, atol=1e-6), f"{what}: {name}"


def test_the_ema_after_n_steps_is_the_closed_form_ema_of_the_recorded_weights(ema_run):
    recorder, path = ema_run
    assert len(recorder.after_step) == STEPS
    expected = closed_form_ema(recorder.after_step)
    checkpoint = torch.load(path, weights_only=True)
    saved = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    assert_close({k: saved[k] for k in expected}, expected, "checkpoint state_dict vs closed-form EMA")
    raw = {k.removeprefix("model."): v for k, v in checkpoint["current_model_state"].items() if k.startswith("model.")}
    assert_close({k: raw[k] for k in expected}, recorder.after_step[-1], "current_model_state vs the raw weights")
    assert int(checkpoint["averaging_state"]["n_averaged"]) == sum(
        1 for k in range(STEPS) if k >= START and k % EVERY == 0
    )
    moved = [n for n in expected if not torch.allclose(expected[n], recorder.after_step[-1][n].double())]
    assert moved, "the EMA must differ from the raw weights for this test to mean anything"


def test_validation_and_the_test_after_fitting_use_the_ema_weights(ema_run):
    recorder, _ = ema_run
    expected = closed_form_ema(recorder.after_step)
    assert recorder.at_validation and recorder.at_test
    for weights in recorder.at_validation + recorder.at_test:
        assert_close(weights, expected, "weights during validation / test")


def test_predict_and_export_read_the_ema_weights_of_the_checkpoint(ema_run):
    recorder, path = ema_run
    expected = closed_form_ema(recorder.after_step)
    assert_close({k: v for k, v in read_checkpoint(path).state_dict.items() if k in expected}, expected, "read")
    model = load_checkpoint(ImageClassifier(model_name="test_resnet", num_classes=4).model, path)
    assert_close({k: v.detach() for k, v in model.named_parameters()}, expected, "load_checkpoint")
    reloaded = ImageClassifier.load_from_checkpoint(path, weights_only=True)  # the hyper-parameters load too
    assert_close({k: v.detach() for k, v in reloaded.model.named_parameters()}, expected, "load_from_checkpoint")


def test_bad_ema_settings_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"ModelEMA\.decay must be in \[0, 1\), got 1.5"):
        ModelEMA(decay=1.5)
    with pytest.raises(ValueError, match=r"ModelEMA\.update_every_n_steps must be >= 1"):
        ModelEMA(update_every_n_steps=0)


def test_a_timm_checkpoint_with_raw_and_ema_weights_is_read_as_its_ema(tmp_path):
    """timm's train.py saves the raw weights under state_dict and the EMA beside them under state_dict_ema."""
    raw = {"fc.weight": torch.zeros(2, 3)}
    ema = {"fc.weight": torch.ones(2, 3)}
    torch.save({"state_dict": raw, "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, tmp_path / "t.pth")
    assert torch.equal(read_checkpoint(tmp_path / "t.pth").state_dict["fc.weight"], ema["fc.weight"])
