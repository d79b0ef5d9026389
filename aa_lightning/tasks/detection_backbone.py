"""RetinaNet's backbone: any timm model's C3-C5 features + torchvision's FPN with P6/P7.

    x [B, 3, H, W] -> timm features_only (C3, C4, C5 at strides 8, 16, 32)
                   -> FeaturePyramidNetwork -> P3, P4, P5 (out_channels each)
                   -> LastLevelP6P7         -> P6, P7 (strides 64, 128)
    returns OrderedDict {"0": P3, "1": P4, "2": P5, "p6": P6, "p7": P7}

P6 is a 3x3 stride-2 conv on P5 (``p6p7_from="p5"``: torchvision's RetinaNet and the TPU
RetinaNet the paper's authors used) or on C5 (``"c5"``: Lin et al. 2017 / Detectron).

Backbone initialization from a classification checkpoint of this project: a Lightning ``.ckpt``
(state dict keys prefixed ``model.``), a plain state dict ``.pth``/``.pt`` or a ``.safetensors``
file; read with ``torch.load(weights_only=True)`` / safetensors (no unpickling of code). The
weights must fit the named backbone exactly (bar the classifier): anything else fails naming
the checkpoint's model and the backbone.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Sequence

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

#: Hyper-parameter keys under which a classification checkpoint may name its timm model.
_MODEL_NAME_KEYS = ("model_name", "backbone", "arch", "architecture", "model")


def _find_model_name(hparams: Any) -> str | None:
    if isinstance(hparams, dict):
        for key in _MODEL_NAME_KEYS:
            value = hparams.get(key)
            if isinstance(value, str):
                return value
        for value in hparams.values():  # e.g. nested init_args
            found = _find_model_name(value)
            if found:
                return found
    return None


def read_classification_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(state_dict of the timm model, name of the model if the checkpoint records it)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    model_name = None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) (it pickles "
                             f"objects other than tensors and plain containers): {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict or a Lightning checkpoint; got {type(state).__name__}")
        if "state_dict" in state:  # Lightning checkpoint of this project's classifier
            model_name = _find_model_name(state.get("hyper_parameters"))
            state = state["state_dict"]
    prefixed = [k for k in state if k.startswith("model.")]
    if prefixed:
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    elif all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no tensors under 'model.'-prefixed or plain keys")
    return state, model_name


def _weights_for(name: str, model_kwargs: dict, path: Path, state: dict[str, torch.Tensor],
                 source_name: str | None) -> dict[str, torch.Tensor]:
    """Check ``state`` against ``timm.create_model(name)`` (classifier excluded) key by key."""
    described = f"'{source_name}'" if source_name else "an unnamed model"
    if source_name and source_name != name:
        raise ValueError(f"{path} is a checkpoint of {described}, but the backbone is '{name}' "
                         "(set model.init_args.backbone to the checkpoint's model)")
    reference = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}
    expected = reference.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} ({described}) does not fit the backbone '{name}': {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(mismatched)} shape "
            f"mismatches {mismatched[:3]}")
    return state


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
        raise ValueError(f"model.init_args.backbone: unknown timm model '{name}' (import aa_lightning "
                         "registers the aa_* models; see timm.list_models())")
    kwargs: dict[str, Any] = dict(features_only=True, out_indices=tuple(out_indices), **model_kwargs)
    if checkpoint:
        state, source_name = read_classification_checkpoint(checkpoint)
        state = _weights_for(name, model_kwargs, Path(checkpoint), state, source_name)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    elif pretrained:
        kwargs.update(pretrained=True)
    return timm.create_model(name, **kwargs)


def freeze_backbone_stages(body: nn.Module, freeze_at: int) -> None:
    """Freeze (no grad, BN -> FrozenBatchNorm2d) the stem (``freeze_at >= 1``) and the stages up
    to ``freeze_at - 1`` (Detectron's FREEZE_AT: 2 = stem + stage 1 (res2), the usual choice)."""
    info = body.feature_info.info
    if not 0 <= freeze_at <= len(info):
        raise ValueError(f"model.init_args.freeze_at must be in 0..{len(info)} (0: train everything, "
                         f"1: freeze the stem, k: stem + stages 1..k-1); got {freeze_at}")
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

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
