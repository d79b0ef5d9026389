"""From the paper's ratios to valid AAConv dimensions.

k = dk / Fout (key depth ratio), v = dv / Fout (attention channel ratio), Nh heads,
dkh = dk / Nh, dvh = dv / Nh (Bello et al., Section 3.3).
"""

from __future__ import annotations

import math


def _round_to_heads(value: float, num_heads: int) -> int:
    """Nearest multiple of num_heads (halves round up)."""
    return int(math.floor(value / num_heads + 0.5)) * num_heads


def aa_dims(out_channels: int, k: float, v: float, num_heads: int, min_dkh: int = 1) -> tuple[int, int]:
    """(dk, dv) for an AAConv with Fout = ``out_channels`` channels.

    Rounding: dv = round(v * Fout / Nh) * Nh and dk = round(k * Fout / Nh) * Nh (nearest
    multiple of Nh, halves up), then
      - v = 1.0 gives dv = Fout exactly (the fully attentional layer; Fout must divide by Nh),
      - any v > 0 gives at least one value channel per head (dv >= Nh),
      - dk >= max(min_dkh, 1) * Nh (the paper keeps >= 20 key dims per head on the CIFAR WRN),
      - v = 0 gives (0, 0): a plain convolution,
      - v > 0 with Nh > Fout is a ValueError (the layer cannot have one channel per head).
    Example: Fout = 256, k = 0.2, v = 0.1, Nh = 8 -> dk = 48 (dkh 6), dv = 24 (dvh 3).
    """
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1; got {out_channels}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"v (attention channel ratio dv/Fout) must be in [0, 1]; got {v}")
    if k <= 0.0 and v > 0.0:
        raise ValueError(f"k (key depth ratio dk/Fout) must be > 0 when v > 0; got {k}")
    if v == 0.0:
        return 0, 0
    if num_heads > out_channels:
        raise ValueError(
            f"num_heads = {num_heads} exceeds the layer's width Fout = {out_channels}: an AA layer needs at "
            f"least one attention channel per head (dv >= Nh), so it cannot exist; use num_heads <= {out_channels}"
        )
    if v == 1.0:
        if out_channels % num_heads:
            raise ValueError(f"v = 1.0 needs dv = Fout = {out_channels} divisible by num_heads = {num_heads}")
        dv = out_channels
    else:
        dv = min(max(_round_to_heads(v * out_channels, num_heads), num_heads), out_channels // num_heads * num_heads)
    dk = max(_round_to_heads(k * out_channels, num_heads), max(min_dkh, 1) * num_heads)
    return dk, dv
