"""The LightningModules: image classification (:class:`ImageClassifier`, any timm model) and RetinaNet
detection (:class:`RetinaNetDetector`, any zoo model as an FPN backbone), with their optimizer and
learning-rate rules (:mod:`.optim`) and the detection metric."""

from .classification import ImageClassifier
from .detection import RetinaNetDetector

__all__ = ["ImageClassifier", "RetinaNetDetector"]
