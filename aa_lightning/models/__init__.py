"""AA networks and their baselines registered as timm models (importing this module registers them).

- ``aa_resnet26/34/50/101/152`` (:mod:`.aa_resnet`; baselines: timm's ``resnet*``)
- ``wrn28_10``, ``aa_wrn28_10`` (:mod:`.wide_resnet`, CIFAR-100)
- ``aa_mnasnet_075/100/125/140`` (:mod:`.aa_mnasnet`; baselines: timm's ``semnasnet_*`` and
  ``semnasnet_125`` registered here)

Every AA model takes the ``aa_*`` kwargs of :mod:`.attention_settings` and ``img_size``.
No weights are published: see :func:`load_checkpoint`.
"""

from .aa_mnasnet import AAEfficientNet, AAEfficientNetFeatures
from .aa_resnet import AABasicBlock, AABottleneck
from .attention_settings import AttentionSettings
from .weights import NoPretrainedWeightsError, load_checkpoint
from .wide_resnet import AAPreActBlock, PreActBlock, WideResNet

__all__ = [
    "AABasicBlock",
    "AABottleneck",
    "AAEfficientNet",
    "AAEfficientNetFeatures",
    "AAPreActBlock",
    "AttentionSettings",
    "NoPretrainedWeightsError",
    "PreActBlock",
    "WideResNet",
    "load_checkpoint",
]
