"""LightningDataModules, data sets and augmentation pipelines."""

from .cifar import CIFAR100DataModule
from .coco import COCODataModule
from .imagenet import ImageNetDataModule
from .streaming import StreamingImageNetDataModule  # litdata is imported in setup(), not here
from .synthetic import SyntheticCIFARDataModule
from .synthetic_coco import SyntheticCOCODataModule

__all__ = [
    "CIFAR100DataModule",
    "COCODataModule",
    "ImageNetDataModule",
    "SyntheticCIFARDataModule",
    "SyntheticCOCODataModule",
    "StreamingImageNetDataModule",
]
