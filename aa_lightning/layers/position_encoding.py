"""Absolute 2-D position encodings for the attention input (the paper's Section 4.5 ablation).

- ``sine``: the Image Transformer's 2-D extension of the Transformer's sinusoids: the first half
  of the channels encodes the row y, the second half the column x, each as interleaved
  sin/cos pairs at frequencies 1 / 10000^(2i / (C/2)). Added to the attention input.
- ``coord``: CoordConv (Liu et al. 2018): two channels with y and x scaled to [-1, 1],
  concatenated to the attention input.
Both are computed for the runtime size, so they work at any H, W.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sine_1d(positions: Tensor, channels: int) -> Tensor:
    """[len(positions), channels] interleaved sin/cos encodings (channels may be odd)."""
    half = (channels + 1) // 2
    freqs = torch.exp(
        -torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) * 2 / max(channels, 1)
    )
    angles = positions.float()[:, None] * freqs[None, :]
    enc = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(positions), 2 * half)
    return enc[:, :channels]


def sine_position_encoding_2d(
    height: int, width: int, channels: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """[channels, H, W] 2-D sinusoidal encoding: channels[:C//2] encode y, channels[C//2:] encode x."""
    c_y = channels // 2
    c_x = channels - c_y
    enc_y = _sine_1d(torch.arange(height), c_y)  # [H, c_y]
    enc_x = _sine_1d(torch.arange(width), c_x)  # [W, c_x]
    grid = torch.cat(
        [enc_y[:, None, :].expand(height, width, c_y), enc_x[None, :, :].expand(height, width, c_x)], dim=-1
    )
    return grid.permute(2, 0, 1).to(device=device, dtype=dtype)


def add_sine_position_encoding(x: Tensor) -> Tensor:
    """x + 2-D sine encoding; x: [B, C, H, W]."""
    return x + sine_position_encoding_2d(x.shape[2], x.shape[3], x.shape[1], x.dtype, x.device)


def coord_channels(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[2, H, W]: (y, x) coordinates scaled to [-1, 1] (0 for a size-1 axis)."""
    ys = torch.linspace(-1.0, 1.0, height) if height > 1 else torch.zeros(1)
    xs = torch.linspace(-1.0, 1.0, width) if width > 1 else torch.zeros(1)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
    return grid.to(device=device, dtype=dtype)


def concat_coord_channels(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C + 2, H, W] with CoordConv's (y, x) channels appended."""
    coords = coord_channels(x.shape[2], x.shape[3], x.dtype, x.device)
    return torch.cat([x, coords.expand(x.shape[0], -1, -1, -1)], dim=1)
