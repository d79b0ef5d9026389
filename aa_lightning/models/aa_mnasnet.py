"""AA-MnasNet (0.75 / 1.0 / 1.25 / 1.4): timm's MnasNet-A1 with attention in the low-resolution
inverted bottlenecks.

The paper's MnasNet baselines (ImageNet top-1 73.3 / 75.2 / 77.2 at 0.75 / 1.0 / 1.4) are
MnasNet-A1, timm's ``semnasnet_*`` (SE in some stages). timm has no 1.25 variant:
``semnasnet_125`` is registered here as its baseline.

Which blocks (the paper does not list them; our decision): every inverted-residual block whose
*input* is at 1/16 of the image or smaller (14x14 and 7x7 at 224: blocks 1-3 of the c80 stage,
the c112, c160 and c320 stages; 9 of the 16 blocks) has its expansion 1x1 conv ``conv_pw``
(Fin -> 6 Fin) replaced by an AugmentedConv2d (kernel 1: conv branch 6 Fin - dv channels,
attention dv channels) with relative attention, Nh = 4, k = 2v = 0.1 (ratios of the expanded
width, Fout = 6 Fin). The depthwise conv, SE and projection are unchanged. This adds +0.10M to
+0.34M parameters from 0.75 to 1.4 (the paper: +0.1M to +0.35M). ``aa_min_reduction`` moves the
threshold (8: also the 28x28 blocks). Keys are timm's (``blocks.S.B.conv_pw.{conv,qkv,proj,...}``
in the augmented blocks).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._efficientnet_builder import (
    decode_arch_def,
    efficientnet_init_weights,
    resolve_bn_args,
    round_channels,
)
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from torch import nn

from .attention_settings import AttentionSettings, grid, pop_img_size
from .weights import check_weight_source, checkpoint_filter_fn

MNASNET_AA = AttentionSettings(k=0.1, v=0.05, heads=4)
MIN_REDUCTION = 16

# MnasNet-A1, as timm's efficientnet._gen_mnasnet_a1 defines it (the arch_def is data inside
# that function; the rest of the build is timm's own builder).
MNASNET_A1_ARCH = [
    ["ds_r1_k3_s1_e1_c16_noskip"],  # 112x112 in
    ["ir_r2_k3_s2_e6_c24"],  # 112x112 in
    ["ir_r3_k5_s2_e3_c40_se0.25"],  # 56x56 in
    ["ir_r4_k3_s2_e6_c80"],  # 28x28 in
    ["ir_r2_k3_s1_e6_c112_se0.25"],  # 14x14 in
    ["ir_r3_k5_s2_e6_c160_se0.25"],  # 14x14 in
    ["ir_r1_k3_s1_e6_c320"],  # 7x7 in
]


def augment_inverted_residuals(
    blocks: nn.Sequential, attention: AttentionSettings, img_size, min_reduction: int
) -> list[str]:
    """Swap ``conv_pw`` of every InvertedResidual whose input is at >= ``min_reduction`` for an
    AugmentedConv2d (tables sized for ``img_size``); returns the augmented block names."""
    reduction, augmented = 2, []  # the stem has stride 2
    for stage_idx, stage in enumerate(blocks):
        for block_idx, block in enumerate(stage):
            if isinstance(block, InvertedResidual) and reduction >= min_reduction:
                layer = attention.augment(block.conv_pw, grid(img_size, reduction))
                if layer is not block.conv_pw:
                    efficientnet_init_weights(layer)
                    block.conv_pw = layer
                    augmented.append(f"blocks.{stage_idx}.{block_idx}")
            reduction *= block.conv_dw.stride[0]
    return augmented


class AAEfficientNet(EfficientNet):
    """timm EfficientNet with attention-augmented inverted residuals (see module doc)."""

    def __init__(
        self, *, attention: AttentionSettings, img_size, aa_min_reduction: int = MIN_REDUCTION, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.augmented_blocks = augment_inverted_residuals(self.blocks, attention, img_size, aa_min_reduction)


class AAEfficientNetFeatures(EfficientNetFeatures):
    """timm EfficientNetFeatures (``features_only=True``) with the same augmented blocks."""

    def __init__(
        self, *, attention: AttentionSettings, img_size, aa_min_reduction: int = MIN_REDUCTION, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.augmented_blocks = augment_inverted_residuals(self.blocks, attention, img_size, aa_min_reduction)


def _create_mnasnet_a1(
    variant: str, channel_multiplier: float, pretrained: bool = False, augment: bool = True, **kwargs: Any
) -> nn.Module:
    """timm's _gen_mnasnet_a1 + _create_effnet with the AA classes (``augment``) or timm's own."""
    check_weight_source(variant, pretrained, kwargs)
    model_kwargs = dict(
        block_args=decode_arch_def(MNASNET_A1_ARCH),
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
    )
    if augment:
        model_kwargs["attention"] = AttentionSettings.pop_from(kwargs, MNASNET_AA, model_specific=("aa_min_reduction",))
        min_reduction = kwargs.pop("aa_min_reduction", MIN_REDUCTION)
        if not isinstance(min_reduction, int) or min_reduction < 2:
            raise ValueError(
                f"aa_min_reduction must be an integer >= 2 (16: the 14x14 and 7x7 blocks at 224); got {min_reduction!r}"
            )
        model_kwargs.update(img_size=pop_img_size(variant, kwargs), aa_min_reduction=min_reduction)
    model_kwargs.update(kwargs)

    # the features_only handling of timm's efficientnet._create_effnet
    features_mode, model_cls, kwargs_filter = "", AAEfficientNet if augment else EfficientNet, None
    if model_kwargs.pop("features_only", False):
        if "feature_cfg" in model_kwargs or "feature_cls" in model_kwargs:
            features_mode = "cfg"
        else:
            kwargs_filter = ("num_classes", "num_features", "head_conv", "global_pool")
            model_cls = AAEfficientNetFeatures if augment else EfficientNetFeatures
            features_mode = "cls"
    pretrained_strict = model_kwargs.pop("pretrained_strict", True)
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        features_only=features_mode == "cfg",
        pretrained_strict=pretrained_strict and features_mode != "cls",
        pretrained_filter_fn=checkpoint_filter_fn,
        kwargs_filter=kwargs_filter,
        **model_kwargs,
    )
    if features_mode == "cls":
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's MnasNet ImageNet cfg; no released weights."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_stem",
        "classifier": "classifier",
        **kwargs,
    }


_AA_PAPER = dict(paper_ids="arXiv:1904.09925", paper_name="Attention Augmented Convolutional Networks")
default_cfgs = generate_default_cfgs(
    {
        "semnasnet_125": _cfg(paper_ids="arXiv:1807.11626"),
        "aa_mnasnet_075": _cfg(**_AA_PAPER),
        "aa_mnasnet_100": _cfg(**_AA_PAPER),
        "aa_mnasnet_125": _cfg(**_AA_PAPER),
        "aa_mnasnet_140": _cfg(**_AA_PAPER),
    }
)


@register_model
def semnasnet_125(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MnasNet-A1 (w/ SE), depth multiplier 1.25 (baseline of aa_mnasnet_125; not in timm)."""
    return _create_mnasnet_a1("semnasnet_125", 1.25, pretrained, augment=False, **kwargs)


@register_model
def aa_mnasnet_075(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """AA-MnasNet-A1 0.75 (baseline: timm's semnasnet_075)."""
    return _create_mnasnet_a1("aa_mnasnet_075", 0.75, pretrained, **kwargs)


@register_model
def aa_mnasnet_100(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """AA-MnasNet-A1 1.0 (baseline: timm's semnasnet_100)."""
    return _create_mnasnet_a1("aa_mnasnet_100", 1.0, pretrained, **kwargs)


@register_model
def aa_mnasnet_125(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """AA-MnasNet-A1 1.25 (baseline: semnasnet_125, registered here)."""
    return _create_mnasnet_a1("aa_mnasnet_125", 1.25, pretrained, **kwargs)


@register_model
def aa_mnasnet_140(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """AA-MnasNet-A1 1.4 (baseline: timm's semnasnet_140)."""
    return _create_mnasnet_a1("aa_mnasnet_140", 1.4, pretrained, **kwargs)
