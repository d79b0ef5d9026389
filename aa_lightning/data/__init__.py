"""The data: a LightningDataModule per data set (CIFAR-100 pickles, ImageNet class folders, ImageNet as
litdata shards, COCO JSON + JPEGs) with their readers, loaders and albumentations pipelines;
:mod:`.synthetic` (the built-in sets) and ``python -m aa_lightning.data.prepare`` (the shard converter)."""

from .cifar import CIFAR100DataModule
from .coco import COCODataModule
from .imagenet import ImageNetDataModule
from .streaming import StreamingImageNetDataModule  # litdata is imported in setup(), not here
from .synthetic import SyntheticCIFARDataModule, SyntheticCOCODataModule

__all__ = [
    "CIFAR100DataModule",
    "COCODataModule",
    "ImageNetDataModule",
    "SyntheticCIFARDataModule",
    "SyntheticCOCODataModule",
    "StreamingImageNetDataModule",
]
