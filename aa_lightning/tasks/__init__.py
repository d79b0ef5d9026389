"""LightningModules: image classification and RetinaNet detection."""
from .classification import ImageClassifier

__all__ = ["ImageClassifier"]
