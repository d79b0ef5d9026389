"""``augment(model, ...)``: turn a built timm CNN into its attention-augmented version, in place.

    model = aa_lightning.augment(timm.create_model("resnext50_32x4d"), stages=(2, 3, 4), k=0.2, v=0.1, heads=8)

The registered AA models are exactly this step applied to timm's own networks (``aa_resnet50`` =
timm's ``resnet50`` augmented in stages 2-4; ``aa_mnasnet_100`` = ``semnasnet_100`` augmented
where the input is at 1/16 or below). Which conv of a block is replaced:

- timm ResNet family (``timm.models.resnet`` ``Bottleneck`` / ``BasicBlock``: ResNet, ResNeXt, ResNet-D,
  SE-ResNet, ...): the first 3x3 conv (``conv2`` / ``conv1``); stages are ``layer1``..``layer4``.
- timm's inverted residuals (EfficientNet / MnasNet / MobileNet blocks with ``conv_pw``, ``conv_dw``,
  ``conv_pwl``): the expansion 1x1 conv ``conv_pw``; stages are the entries of ``blocks``.

Each stage's stride and feature size are read from the model, not from a table: one forward pass of
shapes only (parameters swapped for ``meta`` tensors by ``torch.func.functional_call``: no compute,
no memory) records the input (H, W) of every candidate conv at ``img_size``, and, for
``min_reduction``, at a 1024-pixel probe (its input reduction). The new layers keep the conv's
in / out channels, kernel, stride, dilation and groups; their convs are initialized as the model
family initializes its convs (timm's ResNet: Kaiming normal, fan out; EfficientNet: the same with
zero biases), the relative tables by the layer. Everything else (pretrained weights included) is
left as it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from itertools import chain

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ..layers import AugmentedConv2d
from .attention_settings import AttentionSettings, check_stages, is_integer, to_img_size

#: the side of the square input that measures each conv's input reduction (exact up to 1/1024)
PROBE_SIZE = 1024
#: (repr of the network, input size, conv names) -> the traced input sizes; only for the registered models,
#: whose forward (timm's ResNet / EfficientNet) is fixed by their modules, which the repr lists in full
_TRACE_CACHE: dict[tuple, dict[str, tuple[int, int]]] = {}


def init_resnet_conv(layer: nn.Module) -> None:
    """timm ``ResNet.init_weights`` for the convs of ``layer``: Kaiming normal (fan out, ReLU) weights."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def init_efficientnet_conv(layer: nn.Module) -> None:
    """timm's EfficientNet init for the convs of ``layer``: normal(0, sqrt(2 / fan_out)), fan_out =
    k * k * out / groups, zero biases (what ``efficientnet_init_weights`` does to a conv)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def block_conv(block: nn.Module) -> tuple[str, Callable[[nn.Module], None]] | None:
    """(name of the conv ``augment`` replaces in ``block``, its init), or None for a block it does not know."""
    if isinstance(block, Bottleneck):
        return "conv2", init_resnet_conv
    if isinstance(block, BasicBlock):
        return "conv1", init_resnet_conv
    if all(isinstance(getattr(block, name, None), nn.Module) for name in ("conv_pw", "conv_dw", "conv_pwl")):
        return "conv_pw", init_efficientnet_conv  # timm's InvertedResidual (its class is in a private module)
    return None


def find_stages(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """1-based stage number -> (name, module): ``layerN`` (ResNet family), else the entries of ``blocks``
    (EfficientNet family); also inside timm's feature wrappers (``features_only``)."""
    stages: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = re.fullmatch(r"layer(\d+)", name.rsplit(".", 1)[-1])
        if match and isinstance(module, nn.Sequential):
            if int(match[1]) in stages:
                raise ValueError(f"augment: two stages named layer{match[1]} ({stages[int(match[1])][0]}, {name})")
            stages[int(match[1])] = (name, module)
    if stages:
        return dict(sorted(stages.items()))
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.Sequential):
            if len(module) and all(isinstance(stage, nn.Sequential) for stage in module):
                return {i: (f"{name}.{i - 1}", stage) for i, stage in enumerate(module, start=1)}
    return stages


def conv_input_sizes(
    model: nn.Module, convs: dict[str, nn.Module], img_size: tuple[int, int], cache: bool = False
) -> dict[str, tuple]:
    """The input (H, W) of each of ``convs`` (name -> module of ``model``) in a forward pass of one
    ``img_size`` image, run on shapes only: parameters and buffers replaced by ``meta`` tensors.

    ``cache``: reuse the sizes traced for a network of the same repr (a forward pass of shapes costs
    0.3 s for a ResNet-50, 1 s for a ResNet-152; the registered models are built many times)."""
    key = (type(model), repr(model), tuple(img_size), tuple(convs)) if cache else None
    if key is not None and key in _TRACE_CACHE:
        return dict(_TRACE_CACHE[key])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(f"augment: {type(model).__name__} has no Conv2d")
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    handles = [conv.register_forward_pre_hook(record(name)) for name, conv in convs.items()]
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        )
    }
    x = torch.empty(1, first_conv.in_channels, *img_size, device="meta", dtype=first_conv.weight.dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            torch.func.functional_call(model, state, (x,), tie_weights=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [name for name in convs if name not in sizes]
    if missing:
        raise ValueError(f"augment: {missing[0]} did not run in a forward pass of the model; cannot size it")
    if key is not None:
        if len(_TRACE_CACHE) >= 64:
            _TRACE_CACHE.clear()
        _TRACE_CACHE[key] = dict(sizes)
    return sizes


def default_img_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) of the model's ``pretrained_cfg['input_size']``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not cfg.get("input_size"):
        raise ValueError(f"augment: {type(model).__name__} has no pretrained_cfg input_size; pass img_size=(H, W)")
    return to_img_size(tuple(cfg["input_size"][-2:]))


def augment_with(
    model: nn.Module,
    attention: AttentionSettings,
    stages: Sequence[int] | None = (2, 3, 4),
    min_reduction: int = 1,
    img_size: int | Sequence[int] | None = None,
    cache: bool = False,
) -> nn.Module:
    """:func:`augment` with the AA hyper-parameters as one :class:`AttentionSettings`; ``cache``: see
    :func:`conv_input_sizes` (the registered models' factories)."""
    if not is_integer(min_reduction) or min_reduction < 1:
        raise ValueError(f"augment: min_reduction must be an integer >= 1; got {min_reduction!r}")
    size = default_img_size(model) if img_size is None else to_img_size(img_size)
    found = find_stages(model)
    if not found:
        raise ValueError(
            f"augment: no stage of {type(model).__name__} found (it augments timm's ResNet family, stages layer1.., "
            "and EfficientNet family, stages blocks.0..)"
        )
    if stages is None:
        chosen = list(found)
    else:
        where = f" (the model's {', '.join(name for name, _ in found.values())})"
        chosen = list(check_stages("augment: stages", stages, tuple(found), where))

    candidates: dict[str, tuple[nn.Module, str, Callable]] = {}  # conv name -> (block, attribute, init)
    for number in chosen:
        stage_name, stage = found[number]
        known = 0
        for block_name, block in stage.named_children():
            kind = block_conv(block)
            if kind is None:
                continue
            known += 1
            attribute, init = kind
            conv, name = getattr(block, attribute), f"{stage_name}.{block_name}.{attribute}"
            if isinstance(conv, AugmentedConv2d):
                raise ValueError(f"augment: {name} is already an AugmentedConv2d")
            padding = conv.dilation[0] * (conv.kernel_size[0] - 1) // 2 if type(conv) is nn.Conv2d else None
            if type(conv) is not nn.Conv2d or conv.padding != (padding, padding) or conv.padding_mode != "zeros":
                raise ValueError(
                    f"augment: {name} is a {type(conv).__name__} (padding {getattr(conv, 'padding', '?')}); only an "
                    "nn.Conv2d with symmetric zero 'same' padding can become an AugmentedConv2d"
                )
            candidates[name] = (block, attribute, init)
        if stages is not None and not known:
            raise ValueError(f"augment: stage {number} ({stage_name}) has no block augment knows")

    convs = {name: getattr(block, attribute) for name, (block, attribute, _) in candidates.items()}
    sizes = conv_input_sizes(model, convs, size, cache)
    if min_reduction > 1:
        probe = conv_input_sizes(model, convs, (PROBE_SIZE, PROBE_SIZE), cache)
        convs = {name: conv for name, conv in convs.items() if PROBE_SIZE // probe[name][0] >= min_reduction}

    augmented = []
    for name, conv in convs.items():
        block, attribute, init = candidates[name]
        layer = attention.augment(conv, sizes[name])
        if layer is conv:  # aa_v = 0: no attention asked for
            continue
        init(layer)
        setattr(block, attribute, layer)
        augmented.append(name.rsplit(".", 1)[0])
    model.augmented_blocks = augmented
    return model


def augment(
    model: nn.Module,
    stages: Sequence[int] | None = (2, 3, 4),
    *,
    k: float = 0.2,
    v: float = 0.1,
    heads: int = 8,
    min_dkh: int = 1,
    position: str = "relative",
    backend: str = "auto",
    rel_init_std: float | None = None,
    min_reduction: int = 1,
    img_size: int | Sequence[int] | None = None,
) -> nn.Module:
    """Replace the chosen convs of a built timm network by :class:`AugmentedConv2d` (in place); returns it.

    Args:
        model: a timm ResNet-family or EfficientNet-family network (also ``features_only``).
        stages: 1-based stages to augment (ResNet: ``layerN``; EfficientNet: ``blocks[N - 1]``), or
            None for every stage.
        k, v, heads, min_dkh: dk = k Fout, dv = v Fout (rounded to multiples of ``heads``), Nh, at least
            ``min_dkh`` key dims per head (:func:`aa_lightning.layers.aa_dims`).
        position, backend, rel_init_std: the layer's position encoding, attention backend and table init.
        min_reduction: augment only convs whose input is at 1/``min_reduction`` of the image or smaller.
        img_size: the input (H, W) the relative tables are sized for (default: the model's
            ``pretrained_cfg['input_size']``); other sizes resample them at run time.

    The names of the augmented blocks are left in ``model.augmented_blocks``.
    """
    attention = AttentionSettings(k, v, heads, min_dkh, position, backend, rel_init_std)
    return augment_with(model, attention, stages, min_reduction, img_size)
