"""Capture attention maps of AugmentedConv2d layers for a few query positions.

Off by default and free when off: a layer only checks ``layer.attention_capture is None``.
When on, the layer recomputes the probabilities of the chosen queries only
(:func:`attention_probabilities`, O(nq HW) per head), whatever the attention backend, and never
builds the (HW)x(HW) map. The training path (its outputs and gradients) is unchanged.

    with capture_attention(model, queries=[(0.5, 0.5), (0.2, 0.8)]) as captures:
        model(images)
    captures["layer3.0.conv2"].maps  # [B, Nh, nq, H', W'] probabilities, each map sums to 1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class AttentionCapture:
    """Where to look and what was seen.

    queries: (y, x) positions as fractions of the map in [0, 1] (resolution independent);
    mapped to the attention grid as (min(H'-1, floor(y H')), min(W'-1, floor(x W'))).
    maps: the last [B, Nh, nq, H', W'] probabilities (float32, detached); query_pixels: the
    [nq, 2] (iy, ix) grid positions they belong to.
    """

    queries: Sequence[tuple[float, float]]
    maps: Tensor | None = None
    query_pixels: Tensor | None = None
    _index_cache: dict = field(default_factory=dict, repr=False)

    def query_index(self, height: int, width: int, device: torch.device) -> Tensor:
        key = (height, width, device)
        if key not in self._index_cache:
            for y, x in self.queries:
                if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
                    raise ValueError(f"attention query positions must be fractions in [0, 1]; got {(y, x)}")
            pix = torch.tensor(
                [[min(height - 1, int(y * height)), min(width - 1, int(x * width))] for y, x in self.queries],
                device=device,
            )
            self._index_cache[key] = (pix, pix[:, 0] * width + pix[:, 1])
        pix, index = self._index_cache[key]
        self.query_pixels = pix
        return index


def augmented_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> AugmentedConv2d for every layer of ``model`` with an attention branch."""
    from .augmented_conv import AugmentedConv2d

    return {name: m for name, m in model.named_modules() if isinstance(m, AugmentedConv2d) and m.dv > 0}


@contextlib.contextmanager
def capture_attention(
    model: nn.Module, queries: Sequence[tuple[float, float]], layers: Sequence[str] | None = None
) -> Iterator[dict[str, AttentionCapture]]:
    """Switch capture on for ``layers`` (default: every AA layer) inside the ``with`` block.

    Yields name -> :class:`AttentionCapture`; after each forward its ``maps`` holds the
    [B, Nh, nq, H', W'] probabilities. A requested layer that does not exist raises a
    ValueError naming the available ones.
    """
    available = augmented_layers(model)
    names = list(available) if layers is None else list(layers)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"no AugmentedConv2d layer named {missing}; available: {list(available)}")
    captures = {n: AttentionCapture(queries) for n in names}
    for n in names:
        available[n].attention_capture = captures[n]
    try:
        yield captures
    finally:
        for n in names:
            available[n].attention_capture = None
