"""The AA hyper-parameters every AA model takes as ``timm.create_model`` kwargs.

    timm.create_model("aa_resnet50", aa_k=1.0, aa_v=1.0)       # fully attentional ablation
    timm.create_model("aa_resnet50", aa_position="none")        # position-encoding ablation
    timm.create_model("aa_wrn28_10", aa_heads=4, img_size=64)   # other heads / input size

- ``aa_k`` = dk / Fout (key depth ratio), ``aa_v`` = dv / Fout (attention channel ratio) of each
  augmented conv; rounded to multiples of Nh by :func:`aa_lightning.layers.aa_dims`.
- ``aa_heads`` = Nh; ``aa_min_dkh``: at least this many key dims per head (the paper keeps 20 on
  the CIFAR WRN).
- ``aa_position``: ``relative`` | ``none`` | ``sine`` | ``coord`` (paper Section 4.5).
- ``aa_backend``: attention backend (``auto`` | ``reference`` | ``chunked`` | ``cpu_kernel`` | ``triton`` | ``fused``).
- ``aa_rel_init_std``: std of the relative tables' normal init (default dkh**-0.5).
- ``img_size``: the input (H, W) the relative tables are sized for (default: the model's
  pretrained cfg ``input_size``); other runtime sizes resample the tables in the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from timm.models import resolve_pretrained_cfg
from torch import nn

from ..attention import BACKENDS
from ..layers import POSITIONS, AugmentedConv2d, aa_dims

#: create_model kwarg -> AttentionSettings field
KWARGS: dict[str, str] = {
    "aa_k": "k",
    "aa_v": "v",
    "aa_heads": "heads",
    "aa_min_dkh": "min_dkh",
    "aa_position": "position",
    "aa_backend": "backend",
    "aa_rel_init_std": "rel_init_std",
}


@dataclass(frozen=True)
class AttentionSettings:
    """k = dk/Fout, v = dv/Fout, Nh heads, position encoding and backend of the AA convs."""

    k: float = 0.2
    v: float = 0.1
    heads: int = 8
    min_dkh: int = 1
    position: str = "relative"
    backend: str = "auto"
    rel_init_std: float | None = None

    def __post_init__(self) -> None:
        def fail(kwarg: str, allowed: str, got: Any) -> None:
            raise ValueError(f"{kwarg} must be {allowed}; got {got!r}")

        # bool is an int to Python: a YAML `true` must not become 1 head or a fully attentional layer
        if not is_number(self.v) or not 0.0 <= self.v <= 1.0:
            fail("aa_v (dv / Fout)", "a number in [0, 1] (0: plain convs, 1: fully attentional)", self.v)
        if not is_number(self.k) or not math.isfinite(self.k) or self.k < 0 or (self.v > 0 and self.k <= 0):
            fail("aa_k (dk / Fout)", "a number > 0 (when aa_v > 0)", self.k)
        if not is_integer(self.heads) or self.heads < 1:
            fail("aa_heads (Nh)", "an integer >= 1", self.heads)
        if not is_integer(self.min_dkh) or self.min_dkh < 1:
            fail("aa_min_dkh", "an integer >= 1", self.min_dkh)
        if self.position not in POSITIONS:
            fail("aa_position", f"one of {POSITIONS}", self.position)
        if self.backend not in BACKENDS:
            fail("aa_backend", f"one of {BACKENDS}", self.backend)
        if self.rel_init_std is not None and not (is_number(self.rel_init_std) and self.rel_init_std > 0):
            fail("aa_rel_init_std", "a number > 0 or None (dkh**-0.5)", self.rel_init_std)

    @classmethod
    def pop_from(
        cls, kwargs: dict[str, Any], defaults: AttentionSettings, model_specific: Sequence[str] = ()
    ) -> AttentionSettings:
        """Remove the ``aa_*`` keys from create_model ``kwargs``; settings = ``defaults`` updated by
        them. Any other ``aa_*`` key (a typo) fails, naming the accepted ones (``model_specific``
        are accepted too and left to the caller; timm's ``aa_layer`` (anti-aliasing) passes)."""
        unknown = sorted(
            k for k in kwargs if k.startswith("aa_") and k not in KWARGS and k not in model_specific and k != "aa_layer"
        )
        if unknown:
            accepted = sorted([*KWARGS, *model_specific, "img_size"])
            raise ValueError(f"unknown AA argument(s) {unknown}; this model accepts {accepted}")
        given = {KWARGS[key]: kwargs.pop(key) for key in list(kwargs) if key in KWARGS}
        return replace(defaults, **given)

    def as_kwargs(self) -> dict[str, Any]:
        """The create_model kwargs that reproduce these settings."""
        names = {field: kwarg for kwarg, field in KWARGS.items()}
        return {names[f.name]: getattr(self, f.name) for f in fields(self)}

    def dims(self, out_channels: int, layer: str = "", groups: int = 1) -> tuple[int, int]:
        """(dk, dv) of an augmented conv with Fout = ``out_channels``; ``layer`` names it in errors.

        A grouped conv (ResNeXt's 3x3 convs, ``groups`` > 1) keeps whole groups in its conv branch of
        Fout - dv channels: dv is rounded to a multiple of lcm(Nh, groups) instead of Nh (dk is not)."""
        try:
            dk, dv = aa_dims(out_channels, self.k, self.v, self.heads, self.min_dkh)
            unit = math.lcm(self.heads, groups)
            if dv and unit != self.heads and dv != out_channels:
                dv = aa_dims(out_channels, self.k, self.v, unit, self.min_dkh)[1]
            return dk, dv
        except ValueError as err:
            where = f"{layer}: " if layer else ""
            raise ValueError(f"{where}aa_k={self.k}, aa_v={self.v}, aa_heads={self.heads}: {err}") from None

    def augment(self, conv: nn.Conv2d, feat_size: tuple[int, int], name: str | None = None) -> nn.Module:
        """An :class:`AugmentedConv2d` with ``conv``'s Fin, Fout, kernel, stride, dilation and
        groups; ``feat_size`` = the (H, W) of ``conv``'s input. ``conv`` itself when aa_v = 0 (no
        attention asked for); a requested AA layer that cannot exist (aa_heads > Fout) is a
        ValueError naming the layer (``name``, else its conv's shape), its width and the heads."""
        layer = "AA layer " + (
            name
            or (
                f"on the {conv.kernel_size[0]}x{conv.kernel_size[1]} conv {conv.in_channels}->{conv.out_channels} "
                f"(stride {conv.stride[0]}, input {feat_size[0]}x{feat_size[1]})"
            )
        )
        dk, dv = self.dims(conv.out_channels, layer, conv.groups)
        if dv == 0:
            if self.v > 0:  # aa_dims never gives this; a requested layer must not vanish silently
                raise ValueError(
                    f"{layer}: aa_v={self.v} with width {conv.out_channels} and aa_heads={self.heads} "
                    "leaves no attention channels"
                )
            return conv
        return AugmentedConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride[0],
            dk=dk,
            dv=dv,
            num_heads=self.heads,
            position=self.position,
            feat_size=feat_size,
            dilation=conv.dilation[0],
            groups=conv.groups,
            bias=conv.bias is not None,
            rel_init_std=self.rel_init_std,
            backend=self.backend,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )


def pop_img_size(variant: str, kwargs: dict[str, Any]) -> tuple[int, int]:
    """``img_size`` from create_model ``kwargs`` (removed), else the pretrained cfg's input_size
    (honouring ``pretrained_cfg`` / ``pretrained_cfg_overlay`` kwargs), as (H, W)."""
    img_size = kwargs.pop("img_size", None)
    if img_size is None:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        img_size = cfg.input_size[-2:]
    return to_img_size(img_size)


def to_img_size(img_size: Any) -> tuple[int, int]:
    """``img_size`` (an int or (H, W)) as (H, W); anything else (a bool too) is a ValueError naming it."""
    size = (img_size,) * 2 if is_integer(img_size) else tuple(img_size) if isinstance(img_size, (tuple, list)) else ()
    if len(size) != 2 or not all(is_integer(s) and s >= 1 for s in size):
        raise ValueError(f"img_size must be an int or (H, W) of ints >= 1; got {img_size!r}")
    return size  # type: ignore[return-value]


def is_integer(value: Any) -> bool:
    """An int that is not a bool (``True`` from a YAML file is not 1 head)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_stages(kwarg: str, stages: Any, allowed: Sequence[int], what: str = "") -> tuple[int, ...]:
    """``stages`` (1-based) as a tuple, refused (naming ``kwarg``) unless a subset of ``allowed``."""
    got = tuple(stages) if isinstance(stages, (tuple, list)) else stages
    if not isinstance(got, tuple) or not all(is_integer(s) and s in allowed for s in got):
        raise ValueError(f"{kwarg} must be a subset of {tuple(allowed)}{what}; got {got!r}")
    return got


def grid(img_size: Sequence[int], reduction: int) -> tuple[int, int]:
    """(H, W) of a feature map at ``reduction`` of an ``img_size`` input ('same'-style
    stride-2 steps: ceil(size / reduction))."""
    return tuple(-(-s // reduction) for s in img_size)  # type: ignore[return-value]
