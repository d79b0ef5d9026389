"""tasks.mixing: timm's Mixup / CutMix as the task applies it: mixed images are the stated convex combination or
pasted box, targets are the stated mixture of smoothed one-hot rows (summing to 1), draws are seeded by the step
and leave numpy's global generator as it was, and validation / test batches reach the model unmixed."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.tasks import ImageClassifier
from aa_lightning.tasks.mixing import BatchMixer, Mixing

CLASSES = 5


def batch(n: int = 8, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=generator, dtype=torch.float64).float()
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 0, 1][:n])  # label i != label of its partner n - 1 - i
    return images, labels


def smoothed(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Smoothed one-hot rows, float64, by explicit loops: on 1 - s + s / C, off s / C."""
    rows = torch.full((len(labels), CLASSES), smoothing / CLASSES, dtype=torch.float64)
    for i, label in enumerate(labels.tolist()):
        rows[i, label] = 1.0 - smoothing + smoothing / CLASSES
    return rows


def lam_of_row(target: torch.Tensor, label: int, smoothing: float) -> float:
    """The share lam of element i, read from its target row (its own class gets lam * on + (1 - lam) * off)."""
    on, off = 1.0 - smoothing + smoothing / CLASSES, smoothing / CLASSES
    return (float(target[label]) - off) / (on - off)


def test_mixup_images_are_the_convex_combination_and_targets_the_same_mixture():
    images, labels = batch()
    mixer = BatchMixer(Mixing(mixup_alpha=1.0, label_smoothing=0.1), CLASSES, seed=3)
    mixed, targets = mixer(images, labels, step=11)
    lam = lam_of_row(targets[0], int(labels[0]), 0.1)
    assert 0.0 < lam < 1.0
    x, partner = images.double(), images.double().flip(0)
    assert torch.allclose(mixed.double(), lam * x + (1 - lam) * partner, atol=1e-6)
    one_hot = smoothed(labels, 0.1)
    assert torch.allclose(targets.double(), lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1).double(), torch.ones(len(labels), dtype=torch.float64), atol=1e-6)
    assert torch.equal(images, batch()[0])  # the loader's batch is not modified in place


def test_cutmix_pastes_one_box_of_the_partner_whose_area_is_the_target_share():
    images, labels = batch(size=16)
    mixer = BatchMixer(Mixing(cutmix_alpha=1.0, label_smoothing=0.0), CLASSES, seed=0)
    for step in range(6):
        mixed, targets = mixer(images, labels, step=step)
        changed = (mixed != images).any(dim=1)  # [B, H, W]
        assert torch.equal(changed, changed[:1].expand_as(changed)), "one box for the whole batch"
        box = changed[0]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        area = 0
        if len(rows):
            top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            assert box[top:bottom, left:right].all() and int(box.sum()) == (bottom - top) * (right - left)
            area = (bottom - top) * (right - left)
            partner = images.flip(0)
            assert torch.equal(mixed[:, :, top:bottom, left:right], partner[:, :, top:bottom, left:right])
        lam = 1.0 - area / (16 * 16)
        expected = lam * smoothed(labels, 0.0) + (1 - lam) * smoothed(labels.flip(0), 0.0)
        assert torch.allclose(targets.double(), expected, atol=1e-6), step
        assert torch.allclose(targets.sum(1).double(), torch.ones(len(labels), dtype=torch.float64), atol=1e-6)


def test_elem_mode_mixes_every_element_with_its_own_lam():
    images, labels = batch()
    mixed, targets = BatchMixer(Mixing(mixup_alpha=0.4, mode="elem", label_smoothing=0.0), CLASSES, seed=1)(
        images, labels, step=2
    )
    lams = [lam_of_row(targets[i], int(labels[i]), 0.0) for i in range(len(labels))]
    assert len({round(lam, 6) for lam in lams}) > 1
    for i, lam in enumerate(lams):
        j = len(labels) - 1 - i
        assert torch.allclose(mixed[i].double(), lam * images[i].double() + (1 - lam) * images[j].double(), atol=1e-6)


def test_draws_depend_on_seed_and_step_only_and_numpy_global_state_is_restored():
    images, labels = batch()
    mixer = BatchMixer(Mixing(mixup_alpha=1.0, cutmix_alpha=1.0), CLASSES, seed=7)
    np.random.seed(123)
    before = np.random.get_state()
    first = mixer(images, labels, step=5)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(before[1:2], after[1:2])) and before[2] == after[2]
    np.random.seed(999)  # another global state: the same draw
    again = mixer(images, labels, step=5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [mixer(images, labels, step=s)[1] for s in range(6, 12)]
    assert any(not torch.equal(first[1], other) for other in others)
    other_seed = BatchMixer(Mixing(mixup_alpha=1.0, cutmix_alpha=1.0), CLASSES, seed=8)
    assert not torch.equal(first[1], other_seed(images, labels, step=5)[1])


def test_bad_mixing_values_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.mixing\.prob must be in \[0, 1\], got 1.5"):
        Mixing(mixup_alpha=0.2, prob=1.5).check()
    with pytest.raises(ValueError, match=r"model\.mixing\.mixup_alpha must be >= 0"):
        ImageClassifier(model_name="test_resnet", num_classes=CLASSES, mixing=Mixing(mixup_alpha=-1.0))
    with pytest.raises(ValueError, match=r"model\.mixing\.cutmix_minmax"):
        Mixing(cutmix_minmax=(0.5, 0.2)).check()
    with pytest.raises(ValueError, match="even batch"):
        BatchMixer(Mixing(mixup_alpha=1.0), CLASSES, 0)(*batch(n=7), step=0)


class InputRecorder(pl.Callback):
    """Records (training?, images the network got, images the loader gave) for every forward of the network."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":  # once: the test reuses the module
            pl_module.model.register_forward_pre_hook(lambda m, args: self.seen.append((m.training, args[0].clone())))


def test_training_batches_are_mixed_and_validation_and_test_batches_are_not():
    pl.seed_everything(0)
    images, labels = torch.rand(16, 3, 16, 16), torch.arange(16) % CLASSES
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    model = ImageClassifier(
        model_name="test_resnet",
        num_classes=CLASSES,
        reference_batch_size=None,
        warmup_epochs=0,
        mixing=Mixing(mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0),
    )
    recorder = InputRecorder()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, loader, loader)
    trainer.test(model, loader)
    train = [x for training, x in recorder.seen if training]
    evaluated = [x for training, x in recorder.seen if not training]
    assert len(train) == 2 and len(evaluated) == 4  # 2 validation + 2 test batches
    for index, x in enumerate(train):
        assert not torch.equal(x, images[8 * index : 8 * index + 8])
    for index, x in enumerate(evaluated):
        assert torch.equal(x, images[8 * (index % 2) : 8 * (index % 2) + 8])
