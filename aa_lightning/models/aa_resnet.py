"""AA-ResNet-26/34/50/101/152 (ImageNet, 224x224): timm's ResNet with augmented blocks.

The first 3x3 conv of every block in stages 2-4 (``layer2``-``layer4``) is an
:class:`~aa_lightning.layers.AugmentedConv2d` (Bottleneck ``conv2``, BasicBlock ``conv1``); stage
1 and everything else is timm's ResNet unchanged, so a plain ``resnet50`` checkpoint's keys line
up except the augmented convs (``layerN.M.conv2.{conv,qkv,proj,rel_h,rel_w}``).

- AA-ResNet-50/101/152: Nh = 8, k = 2v = 0.2 (the paper's ResNet-50 setting).
- AA-ResNet-26/34: Nh = 8, k = v = 0.25 (what public re-implementations use for the paper's
  AA-ResNet-34; the spec gives no count for ResNet-26, whose baseline here is timm's Bottleneck
  ``resnet26``, layers 2-2-2-2).
- Strided convs (first block of stages 2-4) average-pool the attention input by the stride.
- Relative tables are sized for ``img_size`` (default 224): attention grids 28/14/7 in
  stages 2/3/4; other input sizes resample them in the layer.
- Built as timm builds its ``resnet*`` (``build_model_with_cfg(ResNet, ...)``) with the public
  :func:`aa_lightning.augment` step applied right after construction (it reads each conv's
  input size from the model); ``aa_lightning.augment`` does the same to timm's other ResNets.

Baselines: timm's own ``resnet26/34/50/101/152``. timm's ResNet kwargs pass through
(``layers``, ``channels``, ``stem_width``, ``output_stride``, ...): ``aa_resnet34`` with
``layers=(2, 2, 2, 2)`` is an AA-ResNet-18 (the detection quickstart's backbone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .attention_settings import AttentionSettings, check_stages, pop_img_size
from .augmentation import augment_with
from .weights import check_weight_source, checkpoint_filter_fn

DEEP_AA = AttentionSettings(k=0.2, v=0.1, heads=8)  # ResNet-50/101/152
SHALLOW_AA = AttentionSettings(k=0.25, v=0.25, heads=8)  # ResNet-26/34
AUGMENTED_STAGES = (2, 3, 4)


def _create_aa_resnet(
    variant: str,
    pretrained: bool,
    block: type,
    default_layers: Sequence[int],
    attention: AttentionSettings,
    **kwargs: Any,
) -> ResNet:
    """timm's ResNet (as timm's ``_create_resnet`` builds it: ``build_model_with_cfg(ResNet, ...)``), augmented
    by :func:`~aa_lightning.models.augmentation.augment` right after construction, before timm loads weights or
    wraps it for ``features_only``."""
    check_weight_source(variant, pretrained, kwargs)
    attention = AttentionSettings.pop_from(kwargs, attention, model_specific=("aa_stages",))
    img_size = pop_img_size(variant, kwargs)
    stages = check_stages("aa_stages", kwargs.pop("aa_stages", AUGMENTED_STAGES), (1, 2, 3, 4))
    kwargs.setdefault("layers", tuple(default_layers))  # timm's ResNet kwarg: e.g. (2, 2, 2, 2) for an AA-ResNet-18

    def augmented_resnet(**model_kwargs: Any) -> ResNet:
        return augment_with(ResNet(block=block, **model_kwargs), attention, stages, img_size=img_size, cache=True)

    return build_model_with_cfg(
        augmented_resnet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm ResNet's ImageNet cfg; no released weights (``url`` empty)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1904.09925",
        "paper_name": "Attention Augmented Convolutional Networks",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "aa_resnet26": _cfg(),
        "aa_resnet34": _cfg(),
        "aa_resnet50": _cfg(),
        "aa_resnet101": _cfg(),
        "aa_resnet152": _cfg(),
    }
)


@register_model
def aa_resnet26(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """AA-ResNet-26 (timm's Bottleneck ResNet-26, layers 2-2-2-2): Nh 8, k = v = 0.25."""
    return _create_aa_resnet("aa_resnet26", pretrained, Bottleneck, (2, 2, 2, 2), SHALLOW_AA, **kwargs)


@register_model
def aa_resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """AA-ResNet-34 (BasicBlock, layers 3-4-6-3): Nh 8, k = v = 0.25."""
    return _create_aa_resnet("aa_resnet34", pretrained, BasicBlock, (3, 4, 6, 3), SHALLOW_AA, **kwargs)


@register_model
def aa_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """AA-ResNet-50 (Bottleneck, layers 3-4-6-3): Nh 8, k = 2v = 0.2."""
    return _create_aa_resnet("aa_resnet50", pretrained, Bottleneck, (3, 4, 6, 3), DEEP_AA, **kwargs)


@register_model
def aa_resnet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """AA-ResNet-101 (Bottleneck, layers 3-4-23-3): Nh 8, k = 2v = 0.2."""
    return _create_aa_resnet("aa_resnet101", pretrained, Bottleneck, (3, 4, 23, 3), DEEP_AA, **kwargs)


@register_model
def aa_resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """AA-ResNet-152 (Bottleneck, layers 3-8-36-3): Nh 8, k = 2v = 0.2."""
    return _create_aa_resnet("aa_resnet152", pretrained, Bottleneck, (3, 8, 36, 3), DEEP_AA, **kwargs)
