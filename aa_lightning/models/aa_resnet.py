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

Baselines: timm's own ``resnet26/34/50/101/152``. timm's ResNet kwargs pass through
(``layers``, ``channels``, ``stem_width``, ``output_stride``, ...): ``aa_resnet34`` with
``layers=(2, 2, 2, 2)`` is an AA-ResNet-18 (the detection quickstart's backbone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .attention_settings import AttentionSettings, grid, pop_img_size
from .weights import check_weight_source, checkpoint_filter_fn

DEEP_AA = AttentionSettings(k=0.2, v=0.1, heads=8)  # ResNet-50/101/152
SHALLOW_AA = AttentionSettings(k=0.25, v=0.25, heads=8)  # ResNet-26/34
AUGMENTED_STAGES = (2, 3, 4)


def _block_input_size(feat_sizes: tuple[tuple[int, int], tuple[int, int]], stride: int) -> tuple[int, int]:
    """Input (H, W) of a block: the stage's input for its strided first block, else its output."""
    stage_in, stage_out = feat_sizes
    return stage_in if stride > 1 else stage_out


class AABasicBlock(BasicBlock):
    """timm BasicBlock whose first 3x3 conv (``conv1``) is an AugmentedConv2d.

    ``feat_sizes``: ((H, W) of the stage's input, (H, W) of its output) at ``img_size``.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample=None,
        *,
        attention: AttentionSettings,
        feat_sizes,
        **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, **kwargs)
        self.conv1 = attention.augment(self.conv1, _block_input_size(feat_sizes, self.conv1.stride[0]))


class AABottleneck(Bottleneck):
    """timm Bottleneck whose 3x3 conv (``conv2``) is an AugmentedConv2d.

    ``feat_sizes``: ((H, W) of the stage's input, (H, W) of its output) at ``img_size``.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample=None,
        *,
        attention: AttentionSettings,
        feat_sizes,
        **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, **kwargs)
        self.conv2 = attention.augment(self.conv2, _block_input_size(feat_sizes, self.conv2.stride[0]))


AA_BLOCKS = {BasicBlock: AABasicBlock, Bottleneck: AABottleneck}


def stage_feat_sizes(img_size: Sequence[int], output_stride: int = 32, num_stages: int = 4):
    """[((H, W) in, (H, W) out)] of each ResNet stage, as timm's ``make_blocks`` strides them
    (stem /4, then /2 per stage until ``output_stride``, dilation after)."""
    sizes, reduction = [], 4
    for stage_idx in range(num_stages):
        before = reduction
        if stage_idx > 0 and reduction < output_stride:
            reduction *= 2
        sizes.append((grid(img_size, before), grid(img_size, reduction)))
    return sizes


def aa_stage_blocks(
    block: type,
    attention: AttentionSettings,
    img_size: Sequence[int],
    output_stride: int = 32,
    stages: Sequence[int] = AUGMENTED_STAGES,
) -> tuple[Callable, ...]:
    """timm ResNet's per-stage ``block`` tuple: ``block`` in stages not in ``stages`` (1-based),
    its AA version (bound to the stage's feature sizes) in the others."""
    blocks = []
    for stage, feat_sizes in enumerate(stage_feat_sizes(img_size, output_stride), start=1):
        if stage not in stages:
            blocks.append(block)
            continue
        fn = partial(AA_BLOCKS[block], attention=attention, feat_sizes=feat_sizes)
        fn.expansion = block.expansion  # make_blocks reads block_fn.expansion
        blocks.append(fn)
    return tuple(blocks)


def _create_aa_resnet(
    variant: str,
    pretrained: bool,
    block: type,
    default_layers: Sequence[int],
    attention: AttentionSettings,
    **kwargs: Any,
) -> ResNet:
    """timm's ResNet built by ``build_model_with_cfg`` with the AA blocks of ``variant``."""
    check_weight_source(variant, pretrained, kwargs)
    attention = AttentionSettings.pop_from(kwargs, attention, model_specific=("aa_stages",))
    img_size = pop_img_size(variant, kwargs)
    stages = tuple(kwargs.pop("aa_stages", AUGMENTED_STAGES))
    if not set(stages) <= {1, 2, 3, 4}:
        raise ValueError(f"aa_stages must be a subset of (1, 2, 3, 4); got {stages}")
    layers = tuple(kwargs.pop("layers", default_layers))  # timm's ResNet kwarg: e.g. (2, 2, 2, 2) for an AA-ResNet-18
    blocks = aa_stage_blocks(block, attention, img_size, kwargs.get("output_stride", 32), stages)
    return build_model_with_cfg(
        ResNet,
        variant,
        pretrained,
        block=blocks,
        layers=layers,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
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
