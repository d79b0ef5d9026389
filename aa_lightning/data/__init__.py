"""LightningDataModules, data sets and augmentation pipelines."""
from .cifar import CIFAR100DataModule
from .imagenet import ImageNetDataModule
from .synthetic import SyntheticCIFARDataModule

__all__ = ["CIFAR100DataModule", "ImageNetDataModule", "SyntheticCIFARDataModule"]
