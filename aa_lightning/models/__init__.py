"""AA networks and their baselines registered as timm models (importing this module registers them).

- ``aa_resnet26/34/50/101/152`` (:mod:`.aa_resnet`; baselines: timm's ``resnet*``)
- ``wrn28_10``, ``aa_wrn28_10`` (:mod:`.wide_resnet`, CIFAR-100)
- ``aa_mnasnet_075/100/125/140`` (:mod:`.aa_mnasnet`; baselines: timm's ``semnasnet_*`` and
  ``semnasnet_125`` registered here)

Every AA model takes the ``aa_*`` kwargs of :mod:`.attention_settings` and ``img_size``.
The AA-ResNets and AA-MnasNets are timm's own networks with :func:`augment` (:mod:`.augmentation`) applied
after construction; ``augment`` works on timm's other ResNet-family networks too.
No weights are published: see :func:`load_checkpoint`.
"""

from . import aa_mnasnet, aa_resnet  # noqa: F401  (register the models)
from .attention_settings import AttentionSettings
from .augmentation import augment
from .weights import NoPretrainedWeightsError, load_checkpoint
from .wide_resnet import AAPreActBlock, PreActBlock, WideResNet

__all__ = [
    "AAPreActBlock",
    "AttentionSettings",
    "NoPretrainedWeightsError",
    "PreActBlock",
    "WideResNet",
    "augment",
    "load_checkpoint",
]
