"""COCO mAP that stays exact under DDP when processes hold different numbers of images.

torchmetrics' ``MeanAveragePrecision`` gathers its per-image list states one collective per image,
which breaks when the processes evaluated different numbers of images — what
``UnrepeatedDistributedSampler`` does so that every image counts exactly once (padding the shards
instead counts repeated images twice). This metric gathers each process's whole list at once
(:class:`aa_lightning.compat.torchmetrics.PerProcessListGather`); the metric itself
(pycocotools / faster_coco_eval) is unchanged.
"""

from __future__ import annotations

from torchmetrics.detection import MeanAveragePrecision

from aa_lightning.compat.torchmetrics import PerProcessListGather


class DistributedMeanAveragePrecision(PerProcessListGather, MeanAveragePrecision):
    """``MeanAveragePrecision`` with a per-process (not per-image) gather of its list states."""
