"""ImageClassifier: any timm model (the AA networks included) trained with the paper's recipes.

- Model: ``timm.create_model(model_name, num_classes=..., **model_kwargs)``, so every ablation
  is a config line (``model_kwargs: {aa_k: 1.0, aa_v: 1.0}``).
- Loss: ``ce`` (cross-entropy, label smoothing), ``soft_ce`` or ``bce`` (timm's; :mod:`.losses`).
- Batch mixing of training batches (``mixing``: timm's Mixup / CutMix, seeded per optimizer step,
  :mod:`.mixing`); validation, test and predict batches are never mixed. Under mixing the train
  top-1 / top-5 compare the logits with the argmax of the mixed target (the larger share of the two
  images), so they are not the accuracy of clean images: read val/ for that.
- Optimizer: SGD (momentum, optional Nesterov), AdamW or any of timm's factory by name (``lamb``,
  ``lars``, ``rmsproptf``, ...; ``optimizer_kwargs``); no weight decay on norms and biases.
- Learning rate: peak = ``base_lr * B_global / reference_batch_size`` (the paper's linear scaling,
  B_global = batch per device x devices x nodes x gradient accumulation), linear warm-up over
  ``warmup_epochs`` then cosine decay (or step / constant / x ``lr_gamma`` every ``lr_decay_epochs``),
  stepped every optimizer step.
- EMA of the weights: :class:`aa_lightning.callbacks.ModelEMA` (Lightning's ``EMAWeightAveraging``) in
  ``trainer.callbacks``; validation and test then report the EMA weights and checkpoints carry them.
- Metrics: torchmetrics top-1 / top-5 accuracy for train, val and test (states summed across
  DDP processes), ``train/loss``, ``val/loss``, ``test/loss``, ``train/lr``, ``test/images``.

The checkpoint carries ``model_name`` and ``model_kwargs`` (``save_hyperparameters``), so
``ImageClassifier.load_from_checkpoint(path)`` rebuilds the same network, and what is needed to feed it
images: ``checkpoint["data_config"]`` (the data module's evaluation preprocessing in timm's keys:
``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) and
``checkpoint["class_names"]``, taken from the data module's ``data_config`` / ``class_names`` when it has them
(``on_save_checkpoint``). ``python -m aa_lightning.predict`` / ``export`` read them from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from aa_lightning.compat.lightning import build_training_loader

from .losses import LOSSES, LossName, build_loss
from .mixing import BatchMixer, Mixing, run_seed
from .optim import SCHEDULES, ScheduleName, build_optimizer, check_optimizer_name, peak_lr, warmup_schedule

#: checkpoint keys of the evaluation preprocessing (timm data-config keys) and of the class names
DATA_CONFIG_KEY = "data_config"
CLASS_NAMES_KEY = "class_names"


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


def build_timm_model(model_name: str, num_classes: int, model_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with errors that name the config keys."""
    if not timm.is_model(model_name):
        aa_models = ", ".join(timm.list_models("aa_*")) or "none registered"
        raise ValueError(
            f"model.model_name: unknown timm model {model_name!r} "
            f"(AA models: {aa_models}; any timm.list_models() name works)"
        )
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **model_kwargs)
    except TypeError as err:
        raise ValueError(f"model.model_kwargs {model_kwargs} not accepted by {model_name!r}: {err}") from err


class ImageClassifier(pl.LightningModule):
    """Image classification with a timm model; images [B, 3, H, W] -> logits [B, num_classes].

    Args:
        model_name: a timm model name, e.g. ``aa_wrn28_10``, ``aa_resnet50``, ``resnet50``.
        num_classes: output classes (must match the data).
        model_kwargs: extra keyword arguments of the model (e.g. ``aa_k``, ``aa_v``, ``aa_heads``,
            ``aa_position``, ``drop_rate``).
        optimizer: ``sgd`` (momentum, ``nesterov``) or ``adamw`` (``betas``), torch's; any other name of
            ``timm.optim.list_optimizers()`` (``momentum``, ``nesterov``, ``lamb``, ``lars``, ``rmsproptf`` ...)
            through ``timm.optim.create_optimizer_v2`` with ``momentum`` / ``betas`` where it has them.
        optimizer_kwargs: extra keyword arguments of the optimizer (``eps``, ``alpha``, ``trust_clip`` ...).
        base_lr: learning rate at ``reference_batch_size``; the run uses
            ``base_lr * B_global / reference_batch_size`` (``reference_batch_size: null``: no scaling).
        weight_decay: L2 / decoupled decay of the weights (never of norms and biases).
        warmup_epochs: linear warm-up from 0 (fractions of an epoch are allowed).
        schedule: ``cosine`` (to ``min_lr_ratio`` x peak), ``step`` (x ``lr_gamma`` at each of
            ``lr_milestone_epochs``), ``constant`` after the warm-up, or ``exponential_step``
            (x ``lr_gamma`` every ``lr_decay_epochs`` epochs counted from the start: timm's EfficientNet /
            MnasNet x0.97 every 2.4 epochs).
        label_smoothing: label smoothing of ``ce`` / ``soft_ce`` / ``bce`` for unmixed targets (with
            ``mixing`` on, the smoothing is ``mixing.label_smoothing``, applied before mixing).
        loss: ``ce``, ``soft_ce`` or ``bce`` (:mod:`aa_lightning.tasks.losses`).
        bce_target_thresh: ``bce`` only: targets above it become 1, the others 0 (A1/A2/A3: 0.2).
        mixing: timm's Mixup / CutMix of training batches (:class:`~aa_lightning.tasks.mixing.Mixing`).
    """

    #: the metric ModelCheckpoint watches unless the config names another one
    checkpoint_monitor: tuple[str, str] = ("val/top1", "max")

    def __init__(
        self,
        model_name: str = "aa_resnet50",
        num_classes: int = 1000,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        base_lr: float = 0.1,
        reference_batch_size: int | None = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        warmup_epochs: float = 5.0,
        schedule: ScheduleName = "cosine",
        min_lr_ratio: float = 0.0,
        lr_milestone_epochs: Sequence[float] = (),
        lr_gamma: float = 0.1,
        label_smoothing: float = 0.0,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_decay_epochs: float = 0.0,
        loss: LossName = "ce",
        bce_target_thresh: float | None = None,
        mixing: Mixing | None = None,
    ) -> None:
        super().__init__()
        if isinstance(mixing, dict):  # as checkpoints record it (load_from_checkpoint)
            mixing = Mixing(**mixing)
        check_optimizer_name(optimizer)
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        if loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {', '.join(LOSSES)}; got {loss!r}")
        mixing = mixing if mixing is not None else Mixing()
        mixing.check()
        if mixing.enabled and label_smoothing > 0:
            raise ValueError(
                f"model.label_smoothing is {label_smoothing} with model.mixing on: the mixed targets are smoothed "
                "already; set model.mixing.label_smoothing instead (and model.label_smoothing: 0)"
            )
        for key, value, ok, allowed in [
            ("num_classes", num_classes, num_classes >= 2, ">= 2"),
            ("base_lr", base_lr, base_lr > 0, "> 0"),
            (
                "reference_batch_size",
                reference_batch_size,
                reference_batch_size is None or reference_batch_size > 0,
                "> 0 or null",
            ),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("warmup_epochs", warmup_epochs, warmup_epochs >= 0, ">= 0"),
            ("min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
            ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
            (
                "lr_decay_epochs",
                lr_decay_epochs,
                lr_decay_epochs > 0 if schedule == "exponential_step" else lr_decay_epochs >= 0,
                "> 0 with schedule exponential_step (its period in epochs)",
            ),
            ("lr_gamma", lr_gamma, lr_gamma > 0, "> 0"),
            (
                "bce_target_thresh",
                bce_target_thresh,
                bce_target_thresh is None or 0 <= bce_target_thresh < 1,
                "null or in [0, 1)",
            ),
        ]:
            if not ok:
                raise ValueError(f"model.{key} must be {allowed}, got {value!r}")
        # the mixing settings as a plain dict: checkpoints stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["mixing"])
        self.hparams["mixing"] = asdict(mixing)
        self.model = build_timm_model(model_name, num_classes, dict(model_kwargs or {}))
        self.criterion = build_loss(loss, label_smoothing, bce_target_thresh)
        self.mixing = mixing
        #: mixes training batches (built at fit start, with the run's seed); None: no mixing
        self.mixer: BatchMixer | None = None
        metrics = _accuracy_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_images = SumMetric()
        #: the evaluation preprocessing (timm data-config keys) and class names saved in checkpoints: the data
        #: module's (at setup), else those of the checkpoint loaded; set them yourself when training without one
        self.data_config: dict[str, Any] | None = None
        self.class_names: list[str] | None = None

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    # -- data sanity -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes is {self.hparams.num_classes} but the data has {data_classes} classes "
                f"({type(datamodule).__name__}); set model.num_classes: {data_classes}"
            )
        if stage == "fit" and self.mixing.enabled:
            self.mixer = BatchMixer(self.mixing, self.hparams.num_classes, run_seed(self.mixing))
            batch = getattr(datamodule, "batch_size", None)
            if isinstance(batch, int) and batch % 2:
                raise ValueError(
                    f"model.mixing needs an even batch per device (timm pairs element i with B - 1 - i); "
                    f"data.batch_size is {batch}"
                )
        if getattr(datamodule, "data_config", None):
            self.data_config = dict(datamodule.data_config)
        if getattr(datamodule, "class_names", None):
            self.class_names = [str(name) for name in datamodule.class_names]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the preprocessing and the class names, so that the checkpoint describes itself."""
        if self.data_config:
            checkpoint[DATA_CONFIG_KEY] = dict(self.data_config)
        if self.class_names:
            checkpoint[CLASS_NAMES_KEY] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for key in ("model_name", "num_classes"):
            if key in saved and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"checkpoint was trained with {key}={saved[key]!r} but this run builds "
                    f"{key}={self.hparams[key]!r}; "
                    "use the checkpoint's config or a matching checkpoint"
                )
        # a resumed or reloaded model keeps the checkpoint's description unless its data module gave one
        self.data_config = self.data_config or checkpoint.get(DATA_CONFIG_KEY)
        self.class_names = self.class_names or checkpoint.get(CLASS_NAMES_KEY)

    # -- steps ---------------------------------------------------------------------------------
    def mix(self, images: Tensor, targets: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The training batch mixed by :attr:`mixer` (seeded by the optimizer step and the micro-batch inside
        it), or as it is without mixing. Only :meth:`training_step` calls it."""
        if self.mixer is None:
            return images, targets
        try:
            accumulate = self.trainer.accumulate_grad_batches
        except RuntimeError:  # not attached to a trainer (a direct call)
            accumulate = 1
        return self.mixer(images, targets, self.global_step, batch_idx % accumulate)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = self.mix(*batch, batch_idx)
        logits = self(images)
        loss = self.criterion(logits, targets)
        # mixed (soft) targets: accuracy against their argmax, the image with the larger share
        self.train_metrics.update(logits, targets.argmax(dim=1) if targets.ndim == 2 else targets)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(targets)
        )
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> None:
        images, targets = batch
        logits = self(images)
        self.log(
            f"{stage}/loss", self.criterion(logits, targets), on_epoch=True, sync_dist=True, batch_size=len(targets)
        )
        metrics.update(logits, targets)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)
        self.log("hp_metric", self.val_metrics["top1"], on_step=False, on_epoch=True)  # TensorBoard's hparams tab

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)
        self.test_images.update(torch.tensor(float(len(batch[1])), device=self.device))
        self.log("test/images", self.test_images, on_step=False, on_epoch=True)

    # -- optimization ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                "the learning-rate schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
            )
        total_steps = int(total_steps)
        if not math.isfinite(self.trainer.num_training_batches):
            # A max_steps run does not load the data to estimate its length, and the warm-up is given in epochs;
            # Lightning has no public call that sizes the training loader before fit starts (aa_lightning.compat).
            build_training_loader(self.trainer)
        batches = self.trainer.num_training_batches
        steps_per_epoch = (
            max(1, math.ceil(batches / self.trainer.accumulate_grad_batches)) if math.isfinite(batches) else total_steps
        )
        lr, global_batch = peak_lr(hp.base_lr, hp.reference_batch_size, self.trainer)
        scaling = f" x global batch {global_batch} / {hp.reference_batch_size}" if global_batch else " (not scaled)"
        rank_zero_info(
            f"learning rate: peak {lr:.4g} = base_lr {hp.base_lr}{scaling}; "
            f"{hp.warmup_epochs} warm-up epochs, {hp.schedule} over {total_steps} steps ({steps_per_epoch} per epoch)"
        )
        optimizer = build_optimizer(
            self.model,
            hp.optimizer,
            lr,
            hp.weight_decay,
            hp.momentum,
            hp.nesterov,
            hp.betas,
            optimizer_kwargs=hp.get("optimizer_kwargs"),
        )
        scheduler = warmup_schedule(
            optimizer,
            total_steps=total_steps,
            warmup_steps=round(hp.warmup_epochs * steps_per_epoch),
            schedule=hp.schedule,
            min_lr_ratio=hp.min_lr_ratio,
            milestones=[round(m * steps_per_epoch) for m in hp.lr_milestone_epochs],
            gamma=hp.lr_gamma,
            decay_steps=hp.get("lr_decay_epochs", 0.0) * steps_per_epoch,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
