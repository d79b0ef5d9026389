"""Batch mixing of training batches: timm's Mixup / CutMix as one typed setting, seeded per optimizer step.

- :class:`Mixing`: the recipe's ``model.mixing`` (jsonargparse validates the types; :meth:`Mixing.check`
  the values, naming the key). Mixup (Zhang et al. 2018): x~ = lam x_i + (1 - lam) x_j, lam ~ Beta(a, a);
  CutMix (Yun et al. 2019): a box of area fraction (1 - lam) of x_i replaced by x_j's pixels, lam corrected
  to the box's clipped area. Targets y~ = lam y_i + (1 - lam) y_j with smoothed one-hot y (each row sums to 1).
  The partner j of element i is the flipped batch (j = B - 1 - i), as in timm.
- :class:`BatchMixer`: calls ``timm.data.Mixup`` with numpy's global generator seeded from
  (seed, global step, micro-batch within the step) and restores the generator afterwards, so a resumed run
  draws the same lam / boxes and nothing else that draws from numpy notices. Training batches only: the task
  never calls it for validation, test or predict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from timm.data import Mixup
from torch import Tensor


@dataclass
class Mixing:
    """timm's Mixup / CutMix settings (``model.mixing``). Off unless ``mixup_alpha`` or ``cutmix_alpha`` > 0
    (or ``cutmix_minmax`` is set).

    Args:
        mixup_alpha: Beta(a, a) of the mixup lam; 0 disables mixup.
        cutmix_alpha: Beta(a, a) of the CutMix lam; 0 disables CutMix.
        cutmix_minmax: ``[min, max]`` box side fractions (timm: forces cutmix_alpha 1.0 and draws the box
            sides uniformly in that range instead).
        prob: probability of mixing a batch (``mode: batch``) or an element / pair.
        switch_prob: probability of CutMix instead of mixup when both are on.
        mode: ``batch`` (one lam per batch), ``pair`` (per pair i, B - 1 - i), ``elem`` (per element).
        label_smoothing: smoothing of the one-hot targets before mixing (on 1 - s + s / C, off s / C).
        correct_lam: lam = 1 - (clipped box area) / (image area) for CutMix.
        seed: seed of the draws; null: the run's ``seed_everything`` (0 without one).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1
    correct_lam: bool = True
    seed: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    def check(self, key: str = "model.mixing") -> None:
        """A ``ValueError`` naming ``key.<field>`` and what is allowed for the first bad value."""
        minmax = self.cutmix_minmax
        for field, ok, allowed in [
            ("mixup_alpha", self.mixup_alpha >= 0, ">= 0"),
            ("cutmix_alpha", self.cutmix_alpha >= 0, ">= 0"),
            (
                "cutmix_minmax",
                minmax is None or (len(minmax) == 2 and 0 < minmax[0] <= minmax[1] <= 1),
                "null or [min, max] with 0 < min <= max <= 1",
            ),
            ("prob", 0 <= self.prob <= 1, "in [0, 1]"),
            ("switch_prob", 0 <= self.switch_prob <= 1, "in [0, 1]"),
            ("mode", self.mode in ("batch", "pair", "elem"), "one of batch, pair, elem"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
        ]:
            if not ok:
                raise ValueError(f"{key}.{field} must be {allowed}, got {getattr(self, field)!r}")


def run_seed(mixing: Mixing) -> int:
    """``mixing.seed``, else the seed ``lightning.seed_everything`` recorded (``PL_GLOBAL_SEED``), else 0."""
    if mixing.seed is not None:
        return int(mixing.seed)
    return int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)


def step_seed(seed: int, step: int, micro_batch: int = 0) -> int:
    """A 32-bit numpy seed from (seed, optimizer step, micro-batch): independent streams per step."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(micro_batch)]).generate_state(1)[0])


class BatchMixer:
    """``mixer(images [B, 3, H, W], labels [B], step, micro_batch) -> (mixed images, targets [B, C])``.

    ``B`` must be even (timm pairs element i with B - 1 - i). The input images are not modified.
    """

    def __init__(self, mixing: Mixing, num_classes: int, seed: int) -> None:
        mixing.check()
        self.seed = int(seed)
        self.mixup = Mixup(
            mixup_alpha=mixing.mixup_alpha,
            cutmix_alpha=mixing.cutmix_alpha,
            cutmix_minmax=list(mixing.cutmix_minmax) if mixing.cutmix_minmax is not None else None,
            prob=mixing.prob,
            switch_prob=mixing.switch_prob,
            mode=mixing.mode,
            correct_lam=mixing.correct_lam,
            label_smoothing=mixing.label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, images: Tensor, labels: Tensor, step: int, micro_batch: int = 0) -> tuple[Tensor, Tensor]:
        if len(images) % 2:
            raise ValueError(
                f"model.mixing needs an even batch (timm pairs element i with B - 1 - i); got {len(images)} images: "
                "set data.batch_size to an even number"
            )
        saved = np.random.get_state()
        np.random.seed(step_seed(self.seed, step, micro_batch))
        try:
            return self.mixup(images.clone(), labels)
        finally:
            np.random.set_state(saved)
