"""AttentionMapLogger: TensorBoard overlays of the real attention probabilities, rank 0 only, cheap and safe."""

import io
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.attention import relative_attention_reference
from aa_lightning.callbacks import AttentionMapLogger
from aa_lightning.layers import AugmentedConv2d
from aa_lightning.viz.overlay import colormap_table, tile_origin

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_network(attention: bool = True) -> nn.Module:
    """16x16 input -> conv -> AA conv (stride 2, 2 heads, 8x8 grid) -> AA conv (2 heads, 8x8) -> 3 logits."""

    def aa(cin, cout, stride, size):
        if not attention:
            return nn.Conv2d(cin, cout, 3, stride, 1)
        return AugmentedConv2d(cin, cout, 3, stride, dk=4, dv=4, num_heads=2, feat_size=size, backend="chunked")

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        aa(8, 8, 2, 16),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        aa(8, 8, 1, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


class TinyClassifier(pl.LightningModule):
    def __init__(self, attention: bool = True):
        super().__init__()
        self.model = tiny_network(attention)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TinyData(pl.LightningDataModule):
    mean, std = MEAN, STD
    class_names = ["circle", "square", "plus"]

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(12, 3, 16, 16, generator=g)
        self.labels = torch.arange(12) % 3

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images[:8], self.labels[:8]), batch_size=4)


def fit(tmp_path, callback, epochs=3, attention=True):
    torch.manual_seed(0)
    module, data = TinyClassifier(attention), TinyData()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, datamodule=data)
    return module, data, trainer, Path(logger.log_dir)


def image_events(log_dir: Path) -> dict:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def reference_probabilities(layer: AugmentedConv2d, layer_input: torch.Tensor) -> torch.Tensor:
    """[B, Nh, HW, HW] attention probabilities by the explicit reference attention (one-hot values)."""
    q, k, _ = layer.attention_inputs(layer_input)
    b, nh, h, w, _ = q.shape
    eye = torch.eye(h * w).reshape(1, 1, h, w, h * w).expand(b, nh, h, w, h * w)
    return relative_attention_reference(q, k, eye, *layer.relative_tables(h, w)).reshape(b, nh, h * w, h * w)


def decode_colormap(pixels: np.ndarray, name: str) -> np.ndarray:
    """[N, 3] uint8 colours -> [N] values in [0, 1] by the nearest entry of the colormap table."""
    table = colormap_table(name).numpy() * 255
    return np.abs(pixels[:, None, :].astype(np.float64) - table[None]).sum(-1).argmin(1) / 255


def test_logged_overlays_show_the_layers_attention_probabilities(tmp_path):
    """Every 2nd validation epoch one image per validation image; with alpha 1 each head tile's grid
    cells carry colormap(p / max p) of the reference attention of the logged layer."""
    queries = [(0.5, 0.5), (0.0, 0.99)]
    callback = AttentionMapLogger(
        every_n_epochs=2, num_images=2, queries=queries, tile_size=32, alpha=1.0, colormap="viridis"
    )
    module, data, trainer, log_dir = fit(tmp_path, callback)
    images = image_events(log_dir)
    assert sorted(images) == ["val/attention_0", "val/attention_1"]
    steps_per_epoch = 3
    for events in images.values():  # validations 1 and 3 of 3 (the sanity check does not count)
        assert [e.step for e in events] == [steps_per_epoch, 3 * steps_per_epoch]

    # the default layer is the last AA layer ("6"); recompute its attention for the final weights
    module.eval()
    inputs = {}
    layer = module.model[6]
    handle = layer.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        module(data.images[:2])
        probs = reference_probabilities(layer, inputs["x"])  # [2, 2, 64, 64]
    handle.remove()
    query_index = [4 * 8 + 4, 0 * 8 + 7]  # (0.5, 0.5) -> (4, 4); (0.0, 0.99) -> (0, 7) on the 8x8 grid
    cell = 32 // 8
    centers = np.arange(8) * cell + cell // 2
    for b in range(2):
        figure = np.asarray(
            Image.open(io.BytesIO(images[f"val/attention_{b}"][-1].encoded_image_string)).convert("RGB")
        )
        for r, qi in enumerate(query_index):
            for head in range(2):
                x, y = tile_origin(r, 1 + head, tile_size=32, header_lines=2)
                pixels = figure[y + centers[:, None], x + centers[None, :]].reshape(-1, 3)
                shown = decode_colormap(pixels, "viridis").reshape(8, 8)
                expected = probs[b, head, qi].reshape(8, 8)
                expected = (expected / expected.max()).numpy()
                np.testing.assert_allclose(shown, expected, atol=1.5 / 255)
    assert not module.model[6].attention_capture  # capture is switched off again


def test_images_are_denormalized_with_the_datamodule_statistics(tmp_path):
    callback = AttentionMapLogger(num_images=1, queries=[(0.0, 0.0)], tile_size=32)  # query box in the corner
    _, data, _, log_dir = fit(tmp_path, callback, epochs=1)
    figure = np.asarray(
        Image.open(io.BytesIO(image_events(log_dir)["val/attention_0"][0].encoded_image_string)).convert("RGB")
    )
    x, y = tile_origin(0, 0, tile_size=32, header_lines=2)
    tile = figure[y + 8 : y + 24, x + 8 : x + 24].astype(np.float64) / 255  # inside, away from the query box
    original = (data.images[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1)
    upsampled = nn.functional.interpolate(original[None], size=(32, 32), mode="bilinear", antialias=True)[0]
    expected = upsampled[:, 8:24, 8:24].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(tile, expected, atol=1.5 / 255)


def test_figures_use_eval_mode_without_gradients_and_restore_training_mode():
    torch.manual_seed(0)
    module, data = TinyClassifier(), TinyData()
    trainer = types.SimpleNamespace(datamodule=data, current_epoch=0)
    callback = AttentionMapLogger(num_images=3, tile_size=32)
    callback.setup(trainer, module, "fit")
    module.train()
    bn = module.model[1]
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    figures = callback.figures(trainer, module)
    assert module.training and all(m.training for m in module.modules())
    torch.testing.assert_close(bn.running_mean, before[0])  # eval mode: running statistics untouched
    assert bn.num_batches_tracked == before[1]
    assert all(p.grad is None for p in module.parameters())
    assert len(figures) == 3 and all(f.shape[0] == 3 and f.min() >= 0 and f.max() <= 1 for f in figures)


def test_only_global_rank_zero_logs():
    module, data = TinyClassifier(), TinyData()
    experiment = types.SimpleNamespace(add_image=lambda *a, **k: pytest.fail("rank 1 logged an image"))
    logger = TensorBoardLogger.__new__(TensorBoardLogger)
    logger._experiment = experiment
    trainer = types.SimpleNamespace(
        datamodule=data, sanity_checking=False, is_global_zero=False, loggers=[logger], current_epoch=0, global_step=0
    )
    callback = AttentionMapLogger(tile_size=32)
    callback.setup(trainer, module, "fit")
    module.forward = lambda x: pytest.fail("rank 1 ran a forward for the attention maps")
    callback.on_validation_epoch_end(trainer, module)
    assert callback.validations == 1  # counted on every rank, so all ranks agree on the schedule


def test_a_wrong_layer_name_fails_at_setup_naming_the_aa_layers(tmp_path):
    with pytest.raises(ValueError, match=r"attention_maps.layer: no AugmentedConv2d named 'layer9'.*\['3', '6'\]"):
        fit(tmp_path, AttentionMapLogger(layer="layer9"), epochs=1)


def test_explicit_layer_is_logged(tmp_path):
    callback = AttentionMapLogger(layer="3", num_images=1, queries=[(0.5, 0.5)], tile_size=32)
    fit(tmp_path, callback, epochs=1)
    assert callback._layer == "3"


def test_baseline_model_warns_and_logs_nothing(tmp_path):
    with pytest.warns(UserWarning, match="no AugmentedConv2d layer with attention"):
        _, _, _, log_dir = fit(tmp_path, AttentionMapLogger(), epochs=1, attention=False)
    assert image_events(log_dir) == {}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"num_images": 0}, "num_images"),
        ({"alpha": 2.0}, "alpha"),
        ({"queries": [(0.5, 1.5)]}, "queries"),
        ({"queries": []}, "queries"),
        ({"upsample": "cubic"}, "upsample"),
        ({"colormap": "nonexistent"}, "colormap"),
        ({"tile_size": 4}, "tile_size"),
    ],
)
def test_bad_settings_fail_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"attention_maps\.{key}"):
        AttentionMapLogger(**kwargs)


def test_schedule_survives_a_resume():
    callback = AttentionMapLogger(every_n_epochs=3)
    callback.validations = 4
    restored = AttentionMapLogger(every_n_epochs=3)
    restored.load_state_dict(callback.state_dict())
    assert restored.validations == 4
