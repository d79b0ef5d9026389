"""LightningModules: image classification and RetinaNet detection."""

from .classification import ImageClassifier
from .detection import RetinaNetDetector

__all__ = ["ImageClassifier", "RetinaNetDetector"]
