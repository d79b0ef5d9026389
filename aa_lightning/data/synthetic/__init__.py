"""The built-in synthetic data sets, written in the real on-disk formats and read by the real readers:
:class:`SyntheticCIFARDataModule` (CIFAR-100 python pickles; the quickstart), :class:`SyntheticCOCODataModule`
(COCO JSON + JPEGs; the detection quickstart); :mod:`.generated` publishes and stamps what they write."""

from .cifar import SyntheticCIFARDataModule
from .coco import SyntheticCOCODataModule

__all__ = ["SyntheticCIFARDataModule", "SyntheticCOCODataModule"]
