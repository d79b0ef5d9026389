"""RetinaNet's backbone: any timm model's C3-C5 features + torchvision's FPN with P6/P7.

    x [B, 3, H, W] -> timm features_only (C3, C4, C5 at strides 8, 16, 32)
                   -> FeaturePyramidNetwork -> P3, P4, P5 (out_channels each)
                   -> LastLevelP6P7         -> P6, P7 (strides 64, 128)
    returns OrderedDict {"0": P3, "1": P4, "2": P5, "p6": P6, "p7": P7}

P6 is a 3x3 stride-2 conv on P5 (``p6p7_from="p5"``: torchvision's RetinaNet and the TPU
RetinaNet the paper's authors used) or on C5 (``"c5"``: Lin et al. 2017 / Detectron).

Backbone initialization from a classification checkpoint of this project: a Lightning ``.ckpt``
(state dict keys prefixed ``model.``), a plain state dict ``.pth``/``.pt`` or a ``.safetensors``
file, read by the model zoo's :func:`~aa_lightning.models.weights.read_checkpoint`
(``torch.load(weights_only=True)`` / safetensors: no unpickling of code). The weights must fit
the named backbone (bar the classifier; relative tables of another ``img_size`` are resampled):
anything else fails naming the checkpoint's model and the backbone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from ..models.weights import check_model_name, fitted_state_dict, read_checkpoint


def backbone_weights(name: str, model_kwargs: dict, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a classification checkpoint (:func:`~aa_lightning.models.weights.read_checkpoint`)
    for the backbone ``name``: checked key by key against ``timm.create_model(name)`` without classifier."""
    contents = read_checkpoint(checkpoint)
    check_model_name(contents, name, "set model.init_args.backbone to the checkpoint's model")
    reference = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    return fitted_state_dict(reference, contents, what="backbone")


def create_feature_backbone(
    name: str,
    out_indices: Sequence[int] = (2, 3, 4),
    checkpoint: str | Path | None = None,
    model_kwargs: dict | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """``timm.create_model(name, features_only=True, out_indices=...)``, optionally initialized
    from a classification checkpoint (validated, then loaded by timm before feature wrapping) or
    with timm's own pretrained weights (``pretrained``: downloaded by timm, where it has them)."""
    model_kwargs = dict(model_kwargs or {})
    if checkpoint and pretrained:
        raise ValueError("model.init_args: set backbone_checkpoint or backbone_pretrained, not both")
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(
            f"model.init_args.backbone: unknown timm model '{name}' (import aa_lightning "
            "registers the aa_* models; see timm.list_models())"
        )
    kwargs: dict[str, Any] = dict(features_only=True, out_indices=tuple(out_indices), **model_kwargs)
    if checkpoint:
        state = backbone_weights(name, model_kwargs, checkpoint)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    elif pretrained:
        kwargs.update(pretrained=True)
    return timm.create_model(name, **kwargs)


def freeze_backbone_stages(body: nn.Module, freeze_at: int) -> None:
    """Freeze (no grad, BN -> FrozenBatchNorm2d) the stem (``freeze_at >= 1``) and the stages up
    to ``freeze_at - 1`` (Detectron's FREEZE_AT: 2 = stem + stage 1 (res2), the usual choice)."""
    info = body.feature_info.info
    if not 0 <= freeze_at <= len(info):
        raise ValueError(
            f"model.init_args.freeze_at must be in 0..{len(info)} (0: train everything, "
            f"1: freeze the stem, k: stem + stages 1..k-1); got {freeze_at}"
        )
    if freeze_at == 0:
        return
    last = info[freeze_at - 1]["module"]
    names = [n for n, _ in body.named_children()]
    stop = next((i for i, n in enumerate(names) if n in (last, last.replace(".", "_"))), None)
    if stop is None:
        raise ValueError(f"cannot find backbone module '{last}' among {names} to freeze")
    for child_name in names[: stop + 1]:
        child = freeze_batch_norm_2d(getattr(body, child_name))
        child.requires_grad_(False)
        setattr(body, child_name, child)


class TimmFPNBackbone(nn.Module):
    """timm C3-C5 + FPN + P6/P7 with ``out_channels`` (the attribute RetinaNet reads).

    ``channels_last``: feed the backbone NHWC-strided input (the weights must be converted too,
    as :class:`~aa_lightning.tasks.RetinaNetDetector` does); ~1.6x faster convolutions on CPU.
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (2, 3, 4),
        out_channels: int = 256,
        p6p7_from: Literal["p5", "c5"] = "p5",
        freeze_at: int = 0,
        frozen_bn: bool = False,
        checkpoint: str | Path | None = None,
        model_kwargs: dict | None = None,
        pretrained: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        if p6p7_from not in ("p5", "c5"):
            raise ValueError(f"model.init_args.p6p7_from must be 'p5' or 'c5'; got {p6p7_from!r}")
        self.body = create_feature_backbone(name, out_indices, checkpoint, model_kwargs, pretrained)
        if frozen_bn:
            self.body = freeze_batch_norm_2d(self.body)
        freeze_backbone_stages(self.body, freeze_at)
        in_channels = self.body.feature_info.channels()
        extra = LastLevelP6P7(in_channels[-1] if p6p7_from == "c5" else out_channels, out_channels)
        extra.use_P5 = p6p7_from == "p5"  # explicit: torchvision infers it from equal channel counts
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.pretrained_cfg = self.body.pretrained_cfg

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
