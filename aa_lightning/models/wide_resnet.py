"""Wide-ResNet-28-10 for CIFAR (Zagoruyko & Komodakis 2016) and AA-WRN-28-10 (paper Table 1).

    x [B, 3, 32, 32] -> stem conv3x3 (16) -> 3 groups of N = (depth - 4) / 6 pre-activation
    blocks, widths 16k / 32k / 64k (160 / 320 / 640 for k = 10), strides 1 / 2 / 2
    -> BN-ReLU -> global average pool -> fc (100)

Pre-activation block (BN-ReLU-conv ordering, as the WRN paper and code):
    a = ReLU(BN(x)); out = conv2(dropout(ReLU(BN(conv1(a))))) + shortcut,
    shortcut = x, or conv1x1(a) when the width or stride changes.

AA-WRN-28-10: ``conv1`` of every block is an AugmentedConv2d with relative attention, Nh = 8,
k = 2v = 0.2 and at least 20 key dims per head (dk >= 160), tables sized for 32x32 inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ..constants import CIFAR100_MEAN, CIFAR100_STD
from .attention_settings import AttentionSettings, check_stages, grid, pop_img_size
from .weights import check_weight_source, checkpoint_filter_fn

WRN_AA = AttentionSettings(k=0.2, v=0.1, heads=8, min_dkh=20)


def feature_take_indices(num_features: int, indices: int | list[int] | None = None) -> tuple[list[int], int]:
    """(absolute feature indices, the largest) of timm's intermediates API: None -> all, an int n -> the
    last n, a list -> those (negative from the end); out of range is a ValueError."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = [num_features + i if i < 0 else i for i in indices]
        if not all(0 <= i < num_features for i in take):
            raise ValueError(f"feature indices {list(indices)} out of range (0 to {num_features - 1})")
    return take, max(take)


class PreActBlock(nn.Module):
    """WRN basic block: [B, in_chs, H, W] -> [B, out_chs, H / stride, W / stride]."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0, device=None, dtype=None
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = BatchNormAct2d(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.norm2 = BatchNormAct2d(out_chs, **dd)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.shortcut = (
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd) if stride != 1 or in_chs != out_chs else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.norm1(x)
        shortcut = x if self.shortcut is None else self.shortcut(x_pre)
        x = self.conv1(x_pre)
        x = self.drop(self.norm2(x))
        x = self.conv2(x)
        return x + shortcut


class AAPreActBlock(PreActBlock):
    """WRN block whose first conv (``conv1``) is an AugmentedConv2d.

    ``feat_sizes``: ((H, W) of the group's input, (H, W) of its output) at ``img_size``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        drop_rate: float = 0.0,
        *,
        attention: AttentionSettings,
        feat_sizes,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_chs, out_chs, stride, drop_rate, device=device, dtype=dtype)
        self.conv1 = attention.augment(self.conv1, feat_sizes[0] if stride > 1 else feat_sizes[1])


class WideResNet(nn.Module):
    """Pre-activation Wide-ResNet-``depth``-``widen_factor`` (CIFAR), a timm-compatible model.

    Args:
        depth: 6N + 4 (28 -> N = 4 blocks per group).
        widen_factor: k; group widths 16k, 32k, 64k.
        block: the block class, or one per group (the AA model binds AA blocks per group).
        drop_rate: dropout before the classifier (timm's convention).
        block_drop_rate: dropout between the two convs of each block (WRN's "dropout", 0.3 in
            some of Zagoruyko & Komodakis' runs; 0 by default).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        stem_width: int = 16,
        block: Callable[..., nn.Module] | Sequence[Callable[..., nn.Module]] = PreActBlock,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6N + 4 with N >= 1 (10, 16, 22, 28, ...); got {depth}")
        num_blocks = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        blocks = tuple(block) if isinstance(block, (tuple, list)) else (block,) * len(widths)
        if len(blocks) != len(widths):
            raise ValueError(f"block: one block class or {len(widths)} (one per group); got {len(blocks)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="stem")]
        stages, in_chs, reduction = [], stem_width, 1
        for stage_idx, (width, block_fn) in enumerate(zip(widths, blocks)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            stage = []
            for block_idx in range(num_blocks):
                stage.append(block_fn(in_chs, width, stride if block_idx == 0 else 1, block_drop_rate, **dd))
                in_chs = width
            stages.append(nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.norm = BatchNormAct2d(in_chs, **dd)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs, BN weight 1 / bias 0, zero fc bias (the WRN code's init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head with ``num_classes`` (0: none) and optionally another pooling ('' : none)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        weight = self.stem.weight
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=weight.device, dtype=weight.dtype
        )
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of the stem and each group (timm's intermediates API); ``norm`` applies the
        final BN-ReLU to the last group's features."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        last_idx = len(self.stages)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm / head) after the last feature ``indices`` need."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_wrn(variant: str, pretrained: bool = False, **kwargs: Any) -> WideResNet:
    check_weight_source(variant, pretrained, kwargs)
    return build_model_with_cfg(
        WideResNet,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """CIFAR-100 cfg (32x32, 100 classes, CIFAR-100 mean/std); no released weights."""
    return {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": "stem",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "wrn28_10": _cfg(paper_ids="arXiv:1605.07146", paper_name="Wide Residual Networks"),
        "aa_wrn28_10": _cfg(paper_ids="arXiv:1904.09925", paper_name="Attention Augmented Convolutional Networks"),
    }
)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (CIFAR-100 baseline of the paper's Table 1)."""
    return _create_wrn("wrn28_10", pretrained, **dict(dict(depth=28, widen_factor=10), **kwargs))


@register_model
def aa_wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """AA-WRN-28-10: conv1 of every block augmented (relative, Nh 8, k = 2v = 0.2, dkh >= 20)."""
    attention = AttentionSettings.pop_from(kwargs, WRN_AA, model_specific=("aa_stages",))
    stages = check_stages("aa_stages", kwargs.pop("aa_stages", (1, 2, 3)), (1, 2, 3), " (the WRN groups)")
    img_size = pop_img_size("aa_wrn28_10", kwargs)
    reductions = (1, 1, 2, 4)  # group inputs / outputs
    blocks = tuple(
        partial(
            AAPreActBlock,
            attention=attention,
            feat_sizes=(grid(img_size, reductions[i]), grid(img_size, reductions[i + 1])),
        )
        if i + 1 in stages
        else PreActBlock
        for i in range(3)
    )
    return _create_wrn("aa_wrn28_10", pretrained, **dict(dict(depth=28, widen_factor=10, block=blocks), **kwargs))
