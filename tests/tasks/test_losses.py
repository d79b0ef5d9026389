"""tasks.losses: ce / soft_ce / bce by name, on class indices and on soft (mixed) targets, against float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.tasks import ImageClassifier
from aa_lightning.tasks.losses import build_loss

C = 4


def logits_and_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, C, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    soft = torch.softmax(torch.randn(6, C, generator=generator, dtype=torch.float64), 1)
    return logits, labels, soft


def smoothed(labels, s):
    return [[(1 - s + s / C) if c == int(y) else s / C for c in range(C)] for y in labels]


def soft_ce_loop(logits, rows):
    total = 0.0
    for z, y in zip(logits.tolist(), rows):
        log_norm = math.log(sum(math.exp(v) for v in z))
        total += -sum(t * (v - log_norm) for t, v in zip(y, z))
    return total / len(rows)


def bce_loop(logits, rows, thresh=None):
    total = 0.0
    for z, y in zip(logits.tolist(), rows):
        for v, t in zip(z, y):
            t = float(t > thresh) if thresh is not None else t
            p = 1 / (1 + math.exp(-v))
            total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    return total / (len(rows) * C)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_ce_takes_indices_as_smoothed_one_hot_and_soft_targets_as_given(smoothing):
    logits, labels, soft = logits_and_targets()
    loss = build_loss("soft_ce", smoothing)
    assert float(loss(logits, labels)) == pytest.approx(soft_ce_loop(logits, smoothed(labels, smoothing)), rel=1e-9)
    assert float(loss(logits, soft)) == pytest.approx(soft_ce_loop(logits, soft.tolist()), rel=1e-9)
    ce = build_loss("ce", smoothing)
    assert float(ce(logits, labels)) == pytest.approx(soft_ce_loop(logits, smoothed(labels, smoothing)), rel=1e-9)


@pytest.mark.parametrize("thresh", [None, 0.2])
def test_bce_is_per_class_sigmoid_bce_with_the_target_threshold(thresh):
    logits, labels, soft = logits_and_targets()
    loss = build_loss("bce", 0.1, thresh)
    assert float(loss(logits, soft)) == pytest.approx(bce_loop(logits, soft.tolist(), thresh), rel=1e-9)
    assert float(loss(logits, labels)) == pytest.approx(bce_loop(logits, smoothed(labels, 0.1), thresh), rel=1e-9)


def test_bad_loss_settings_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.loss must be one of ce, soft_ce, bce; got 'focal'"):
        ImageClassifier(model_name="test_resnet", num_classes=C, loss="focal")
    with pytest.raises(ValueError, match=r"model\.bce_target_thresh must be null or in \[0, 1\)"):
        ImageClassifier(model_name="test_resnet", num_classes=C, loss="bce", bce_target_thresh=1.5)
    with pytest.raises(ValueError, match=r"model\.optimizer must be one of"):
        ImageClassifier(model_name="test_resnet", num_classes=C, optimizer="lambda")
    with pytest.raises(ValueError, match=r"model\.label_smoothing is 0.1 with model\.mixing on"):
        ImageClassifier(model_name="test_resnet", num_classes=C, label_smoothing=0.1, mixing={"mixup_alpha": 0.2})
    with pytest.raises(ValueError, match=r"model\.lr_decay_epochs must be > 0 with schedule exponential_step"):
        ImageClassifier(model_name="test_resnet", num_classes=C, schedule="exponential_step")
