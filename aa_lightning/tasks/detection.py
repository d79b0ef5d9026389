"""RetinaNet (torchvision) on any timm backbone of the zoo, as a LightningModule.

Everything RetinaNet-specific is torchvision's ``RetinaNet``: its head (4 convs + cls/box convs
per branch, shared across levels), anchor generator, focal loss (alpha 0.25, gamma 2: fixed in
torchvision's head, the values of Lin et al. 2017), box coder and post-processing (score
threshold, per-level top-k, NMS). This module adds the backbone (:mod:`.detection_backbone`),
the optimizer/schedule (:mod:`aa_lightning.tasks.optim`) and COCO metrics (torchmetrics'
``MeanAveragePrecision``, gathered per process under DDP: :mod:`.detection_metrics`).

Input transform decision: images arrive already resized by the data pipeline
(:mod:`aa_lightning.data.detection_transforms`, shorter side / longer-side cap) and in [0, 1].
RetinaNet's own ``GeneralizedRCNNTransform`` is replaced by :class:`NormalizePadTransform`, the
same class with its resize turned into the identity: it only normalizes with the backbone's
mean/std and pads the batch to a multiple of 32. So a checkpoint predicts on [0, 1] RGB images of
any size, and nothing is resized twice.

Batches are ``(images, targets)`` from :func:`aa_lightning.data.coco.collate_detection`: boxes
for training in the resized image, ``orig_boxes``/``area``/``iscrowd`` for evaluation in the
original image, where COCO's metrics (and their small/medium/large areas) are defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .detection_backbone import TimmFPNBackbone
from .detection_metrics import DistributedMeanAveragePrecision
from .optim import build_optimizer, peak_lr, warmup_schedule

#: Logged COCO metrics (torchmetrics names): AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@100.
LOGGED_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class NormalizePadTransform(GeneralizedRCNNTransform):
    """RetinaNet's input transform without resizing (the data pipeline resized already):
    normalize ``(x - mean) / std`` and batch to ``[B, 3, H_max, W_max]`` padded to ``size_divisible``."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float], size_divisible: int = 32):
        # min_size/max_size are required by the parent but never used: resize() is the identity
        super().__init__(
            min_size=1,
            max_size=1,
            image_mean=list(image_mean),
            image_std=list(image_std),
            size_divisible=size_divisible,
        )

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target


def anchor_generator(sizes: Sequence[int], scales_per_octave: int, aspect_ratios: Sequence[float]) -> AnchorGenerator:
    """Lin et al.'s anchors: per level, base size s x 2^(i/scales_per_octave) for each ratio."""
    per_level = tuple(
        tuple(int(round(s * 2 ** (i / scales_per_octave))) for i in range(scales_per_octave)) for s in sizes
    )
    return AnchorGenerator(per_level, (tuple(aspect_ratios),) * len(per_level))


class RetinaNetDetector(pl.LightningModule):
    """RetinaNet with a timm backbone + FPN (P3-P7).

    Args:
        num_classes: object classes K (contiguous labels 0..K-1; no background class: the
            classifier is K sigmoids). Must equal the data module's category count.
        backbone: timm model name (``aa_resnet50``, ``resnet50``, ...); ``backbone_kwargs`` go to
            ``timm.create_model``. ``out_indices``: the feature levels used as C3-C5.
        backbone_checkpoint: classification checkpoint of this project to initialize the backbone.
        backbone_pretrained: timm's own pretrained weights instead (downloaded by timm; the aa_*
            models have none: train them with the ImageNet recipes and use backbone_checkpoint).
        fpn_channels: channels of P3-P7 and of the head (256 in the paper).
        p6p7_from: ``"p5"`` (torchvision, TPU RetinaNet) or ``"c5"`` (Lin et al. / Detectron).
        freeze_at: 0 trains the whole backbone; 1 freezes the stem; 2 the stem and stage 1 (Detectron).
        frozen_bn: replace every backbone BatchNorm by FrozenBatchNorm2d (detection recipes with
            ImageNet-initialized backbones and 2 images per device).
        head_norm: ``"none"`` (RetinaNet v1) or ``"group"`` (GroupNorm(32) in the head, torchvision v2).
        anchor_sizes / anchor_scales_per_octave / aspect_ratios: anchors, one base size per level.
        score_thresh, nms_thresh, detections_per_img, fg_iou_thresh, bg_iou_thresh, topk_candidates:
            torchvision RetinaNet's post-processing and matching (Detectron's values by default).
        optimizer, base_lr, reference_batch_size, momentum, nesterov, betas, weight_decay: the
            classifier's settings (:class:`~aa_lightning.tasks.ImageClassifier`): ``base_lr`` is the
            rate for a global batch of ``reference_batch_size`` images, scaled linearly to the run's
            global batch (``reference_batch_size: null`` uses ``base_lr`` as is).
        warmup_steps, schedule, lr_milestone_steps, lr_gamma, min_lr_ratio: per-step schedule of
            :func:`aa_lightning.tasks.optim.warmup_schedule`; warm-up and milestones in optimizer steps
            (Detectron's unit; the classifier counts them in epochs).
        channels_last: NHWC memory format for the whole network (~1.6x faster on CPU here;
            also the fast path for mixed precision on recent GPUs).
        map_backend: ``"pycocotools"`` or ``"faster_coco_eval"``.

    Validation images with their boxes are drawn by the
    :class:`~aa_lightning.callbacks.DetectionImageLogger` callback from what ``validation_step`` returns.
    """

    #: the metric ModelCheckpoint watches unless the config names another one
    checkpoint_monitor: tuple[str, str] = ("val/map", "max")

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_checkpoint: str | None = None,
        backbone_pretrained: bool = False,
        out_indices: Sequence[int] = (2, 3, 4),
        fpn_channels: int = 256,
        p6p7_from: Literal["p5", "c5"] = "p5",
        freeze_at: int = 2,
        frozen_bn: bool = True,
        head_norm: Literal["none", "group"] = "none",
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        anchor_scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        topk_candidates: int = 1000,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        base_lr: float = 0.01,
        reference_batch_size: int | None = 16,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        warmup_steps: int = 500,
        schedule: Literal["step", "cosine", "constant"] = "step",
        lr_milestone_steps: Sequence[int] = (60000, 80000),
        lr_gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        channels_last: bool = False,
        map_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
    ):
        super().__init__()
        self._validate(locals())
        self.save_hyperparameters()
        backbone_module = TimmFPNBackbone(
            backbone,
            out_indices,
            fpn_channels,
            p6p7_from,
            freeze_at,
            frozen_bn,
            backbone_checkpoint,
            backbone_kwargs,
            backbone_pretrained,
            channels_last,
        )
        if (frozen_bn or freeze_at > 0) and not (backbone_checkpoint or backbone_pretrained):
            rank_zero_warn(
                f"model.init_args: freeze_at={freeze_at}, frozen_bn={frozen_bn} freeze a randomly initialized "
                "backbone; set backbone_checkpoint (an ImageNet classifier of this project) or "
                "freeze_at: 0 and frozen_bn: false to train from scratch"
            )
        anchors = anchor_generator(anchor_sizes, anchor_scales_per_octave, aspect_ratios)
        head = RetinaNetHead(
            fpn_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=(lambda c: nn.GroupNorm(32, c)) if head_norm == "group" else None,
        )
        self.model = RetinaNet(
            backbone_module,
            num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            topk_candidates=topk_candidates,
        )
        cfg = backbone_module.pretrained_cfg
        self.model.transform = NormalizePadTransform(
            cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        )
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.val_map = DistributedMeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=map_backend)
        self.test_map = DistributedMeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=map_backend)
        self.category_ids: list[int] = list(range(num_classes))  # replaced by the data's in setup()
        self.category_names: list[str] = [str(i) for i in range(num_classes)]

    @staticmethod
    def _validate(args: dict[str, Any]) -> None:
        def fail(key: str, allowed: str) -> None:
            raise ValueError(f"model.init_args.{key}: expected {allowed}; got {args[key]!r}")

        if args["num_classes"] < 1:
            fail("num_classes", "an int >= 1")
        if len(args["out_indices"]) != 3:
            fail("out_indices", "three feature levels (C3, C4, C5), e.g. [2, 3, 4]")
        if len(args["anchor_sizes"]) != 5:
            fail("anchor_sizes", "five base sizes, one per level P3-P7")
        if not all(isinstance(s, (int, float)) and s > 0 for s in args["anchor_sizes"]):
            fail("anchor_sizes", "five positive base sizes in pixels (e.g. [32, 64, 128, 256, 512])")
        if args["anchor_scales_per_octave"] < 1:
            fail("anchor_scales_per_octave", "an int >= 1")
        if not args["aspect_ratios"] or not all(isinstance(r, (int, float)) and r > 0 for r in args["aspect_ratios"]):
            fail("aspect_ratios", "positive height/width ratios (e.g. [0.5, 1.0, 2.0])")
        if args["head_norm"] == "group" and args["fpn_channels"] % 32:
            fail("fpn_channels", "a multiple of 32 with head_norm 'group'")
        if args["fpn_channels"] < 1:
            fail("fpn_channels", "an int >= 1")
        if not 0 < args["bg_iou_thresh"] <= args["fg_iou_thresh"] <= 1:
            fail("bg_iou_thresh", "0 < bg_iou_thresh <= fg_iou_thresh <= 1")
        if args["base_lr"] <= 0:
            fail("base_lr", "a positive float")
        if args["warmup_steps"] < 0:
            fail("warmup_steps", "an int >= 0")
        if list(args["lr_milestone_steps"]) != sorted(args["lr_milestone_steps"]):
            fail("lr_milestone_steps", "increasing optimizer steps")

    # -- data hand-over ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        try:
            datamodule = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer (built by hand)
            datamodule = None
        categories = getattr(datamodule, "categories", None)
        if categories is None:
            return
        if len(categories) != self.hparams.num_classes:
            raise ValueError(
                f"model.init_args.num_classes is {self.hparams.num_classes} but the data set has "
                f"{len(categories)} categories (ids {categories.category_ids}); set num_classes to {len(categories)}"
            )
        self.category_ids = list(categories.category_ids)
        self.category_names = list(categories.names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["categories"] = {"ids": self.category_ids, "names": self.category_names}
        # the weights are in the state dict: loading this checkpoint must not need (or download)
        # the backbone's initialization again; where it came from is kept beside
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            checkpoint["backbone_init"] = {
                "checkpoint": hparams.get("backbone_checkpoint"),
                "pretrained": hparams.get("backbone_pretrained", False),
            }
            hparams["backbone_checkpoint"], hparams["backbone_pretrained"] = None, False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        categories = checkpoint.get("categories")
        if categories:
            self.category_ids, self.category_names = list(categories["ids"]), list(categories["names"])

    # -- steps ------------------------------------------------------------------------------
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for [0, 1] RGB images ``[3, H, W]``: boxes xyxy (input pixels), scores, labels."""
        return self.model(images)

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = losses["classification"] + losses["bbox_regression"]
        n = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/loss_cls", losses["classification"], batch_size=n)
        self.log("train/loss_box", losses["bbox_regression"], batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return loss

    def _evaluate(
        self,
        batch: tuple[list[Tensor], list[dict]],
        metric: DistributedMeanAveragePrecision,
    ) -> list[dict[str, Tensor]]:
        images, targets = batch
        detections = self.model(images)
        preds = []
        for det, t in zip(detections, targets):
            scale = (t["orig_size"].flip(0) / t["size"].flip(0)).to(det["boxes"]).repeat(2)  # (sx, sy, sx, sy)
            preds.append(
                {"boxes": det["boxes"].float() * scale, "scores": det["scores"].float(), "labels": det["labels"]}
            )
        metric.update(
            preds,
            [
                {"boxes": t["orig_boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"], "area": t["area"]}
                for t in targets
            ],
        )
        return detections

    def validation_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> list[dict[str, Tensor]]:
        """The batch's detections (in the network's input pixels), for callbacks such as DetectionImageLogger."""
        return self._evaluate(batch, self.val_map)

    def test_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def _log_metrics(self, metric: DistributedMeanAveragePrecision, prefix: str) -> None:
        results = metric.compute()  # synchronized across processes by torchmetrics
        self.log_dict({f"{prefix}/{k}": results[k].float() for k in LOGGED_METRICS}, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_map, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Tensor]]:
        """Detections with COCO ``category_ids`` beside the contiguous ``labels``."""
        images = batch[0] if isinstance(batch, (tuple, list)) and isinstance(batch[0], list) else batch
        detections = self.model(images)
        ids = torch.tensor(self.category_ids)
        for det in detections:
            det["category_ids"] = ids.to(det["labels"].device)[det["labels"]]
        return detections

    # -- optimization -----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        lr, _ = peak_lr(hp.base_lr, hp.reference_batch_size, self.trainer)
        optimizer = build_optimizer(self, hp.optimizer, lr, hp.weight_decay, hp.momentum, hp.nesterov, hp.betas)
        scheduler = warmup_schedule(
            optimizer, total, hp.warmup_steps, hp.schedule, hp.min_lr_ratio, hp.lr_milestone_steps, hp.lr_gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
