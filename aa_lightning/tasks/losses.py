"""Classification losses by name (``model.loss``), each taking class indices [B] or soft targets [B, C].

- ``ce``: torch's cross-entropy with ``label_smoothing`` (soft targets are used as given).
- ``soft_ce``: timm's ``SoftTargetCrossEntropy``, sum_c -y_c log softmax(z)_c; class indices become
  smoothed one-hot rows first (on 1 - s + s / C, off s / C).
- ``bce``: timm's ``BinaryCrossEntropy`` (per-class sigmoid BCE, "ResNet strikes back"): indices become
  smoothed one-hot rows; ``bce_target_thresh`` binarizes the (mixed) targets: y > t -> 1, else 0.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn

LossName = Literal["ce", "soft_ce", "bce"]
LOSSES = ("ce", "soft_ce", "bce")


class SoftCrossEntropy(nn.Module):
    """timm's ``SoftTargetCrossEntropy`` that also takes class indices (smoothed one-hot rows)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if targets.shape != logits.shape:
            classes = logits.shape[-1]
            off = self.label_smoothing / classes
            targets = F.one_hot(targets.long(), classes).to(logits.dtype) * (1.0 - self.label_smoothing) + off
        return self.soft(logits, targets)


def build_loss(name: str, label_smoothing: float = 0.0, bce_target_thresh: float | None = None) -> nn.Module:
    """The loss ``name`` (``ce``, ``soft_ce``, ``bce``); fails naming ``model.loss`` otherwise."""
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "soft_ce":
        return SoftCrossEntropy(label_smoothing)
    if name == "bce":
        return BinaryCrossEntropy(smoothing=label_smoothing, target_threshold=bce_target_thresh)
    raise ValueError(f"model.loss must be one of {', '.join(LOSSES)}; got {name!r}")
