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

Built by timm (its ``semnasnet_*`` entry points; at 1.25 its MnasNet-A1 generator, see
:mod:`aa_lightning.compat.timm`), then :func:`aa_lightning.augment` with ``stages=None, min_reduction=16``, which
reads each block's input size from the network.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, load_pretrained, register_model, resolve_pretrained_cfg
from timm.models.efficientnet import EfficientNet

from aa_lightning.compat.timm import mnasnet_a1

from .attention_settings import AttentionSettings, is_integer, pop_img_size
from .augmentation import augment_with
from .weights import check_weight_source, checkpoint_filter_fn

MNASNET_AA = AttentionSettings(k=0.1, v=0.05, heads=4)
MIN_REDUCTION = 16


def _create_mnasnet_a1(
    variant: str, channel_multiplier: float, pretrained: bool = False, augment: bool = True, **kwargs: Any
) -> EfficientNet:
    """timm's MnasNet-A1 at ``channel_multiplier`` with ``variant``'s cfg; ``augment``: the AA step applied
    before the weights (if any) are loaded. timm builds it, so ``features_only`` is timm's
    (``EfficientNetFeatures``) and the augmented convs are found in either network."""
    check_weight_source(variant, pretrained, kwargs)
    if augment:
        attention = AttentionSettings.pop_from(kwargs, MNASNET_AA, model_specific=("aa_min_reduction",))
        min_reduction = kwargs.pop("aa_min_reduction", MIN_REDUCTION)
        if not is_integer(min_reduction) or min_reduction < 2:
            raise ValueError(
                f"aa_min_reduction must be an integer >= 2 (16: the 14x14 and 7x7 blocks at 224); got {min_reduction!r}"
            )
        img_size = pop_img_size(variant, kwargs)
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None),
    )
    if not augment:
        return mnasnet_a1(
            channel_multiplier, cfg, pretrained=pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
        )
    strict = kwargs.pop("pretrained_strict", True)
    features = bool(kwargs.get("features_only", False))
    model = mnasnet_a1(channel_multiplier, cfg, **kwargs)
    augment_with(model, attention, stages=None, min_reduction=min_reduction, img_size=img_size, cache=True)
    if pretrained:  # after the AA step: the file has the AA layers' weights (timm's own load, as it would do)
        load_pretrained(
            model,
            pretrained_cfg=cfg.to_dict(),
            num_classes=0 if features else model.num_classes,
            in_chans=kwargs.get("in_chans", 3),
            filter_fn=checkpoint_filter_fn,
            strict=strict and not features,
        )
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
