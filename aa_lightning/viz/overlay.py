"""Render captured attention maps as heat-map overlays on their input image (PIL, no plotting).

One figure per image: a text header, then one row per query pixel and the columns
``[input, head 1, ..., head Nh]``. Every tile marks the query's cell of the attention grid with a
cyan box. A head's [H', W'] probability map is upsampled to the tile, divided by its own maximum
(so colours compare positions *within* a map, not across heads) and blended over the image; the
label under the tile gives that maximum probability (1 / (H' W') would be a uniform map).

Used by :class:`~aa_lightning.callbacks.AttentionMapLogger` (TensorBoard) and
``python -m aa_lightning.predict`` (PNG files).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Upsample = Literal["nearest", "bilinear"]
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear")
QUERY_COLOR = (0, 255, 255)
TEXT_COLOR = (20, 20, 20)
BACKGROUND = (255, 255, 255)


def denormalize(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """[B, C, H, W] normalized images -> [0, 1] RGB: ``x * std + mean`` when both match C, else
    per-image min-max scaling (when the normalization is unknown)."""
    images = images.detach().float().cpu()
    if mean is not None and std is not None and len(mean) == len(std) == images.shape[1]:
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0, 1)


@functools.cache
def colormap_table(name: str) -> Tensor:
    """[256, 3] RGB lookup table of a matplotlib colormap (ValueError naming the choices)."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}; any matplotlib colormap, e.g. inferno, viridis, jet, magma"
        ) from None
    return torch.from_numpy(cmap(np.linspace(0.0, 1.0, 256))[:, :3]).float()


def heat_tiles(maps: Tensor, size: int, upsample: Upsample = "nearest") -> Tensor:
    """[N, H', W'] probability maps -> [N, size, size] in [0, 1], each divided by its maximum
    (NaN and infinite values, e.g. of a diverged model, are drawn as 0)."""
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}; got {upsample!r}")
    maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    maps = maps / maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    kwargs = {"align_corners": False} if upsample == "bilinear" else {}
    return F.interpolate(maps[:, None], size=(size, size), mode=upsample, **kwargs)[:, 0].clamp(0, 1)


def overlay(image: Tensor, heat: Tensor, colormap: str = "inferno", alpha: float = 0.6) -> Tensor:
    """image [3, S, S] in [0, 1], heat [N, S, S] in [0, 1] -> [N, 3, S, S]:
    (1 - alpha) image + alpha colormap(heat)."""
    table = colormap_table(colormap)
    heat = torch.nan_to_num(heat.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(0, 1)
    colored = table[(heat * 255).round().long()].permute(0, 3, 1, 2)  # [N, 3, S, S]
    return (1 - alpha) * image[None] + alpha * colored


def _to_pil(tile: Tensor) -> Image.Image:
    tile = torch.nan_to_num(tile.float(), nan=0.0).clamp(0, 1)
    return Image.fromarray((tile.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@functools.cache
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def query_box(query_pixel: Sequence[int], grid: tuple[int, int], tile_size: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) tile coordinates of attention-grid cell (iy, ix) of a grid (H', W')."""
    iy, ix = int(query_pixel[0]), int(query_pixel[1])
    h, w = grid
    return ix * tile_size / w, iy * tile_size / h, (ix + 1) * tile_size / w - 1, (iy + 1) * tile_size / h - 1


def _line_height(tile_size: int) -> int:
    return max(9, tile_size // 9) + 4


def tile_origin(row: int, col: int, *, tile_size: int, header_lines: int, pad: int = 4) -> tuple[int, int]:
    """(x, y) pixel of the top-left corner of tile (row = query, col = 0 input / 1 + head) in
    :func:`attention_figure`'s layout."""
    line = _line_height(tile_size)
    top = pad + line * (header_lines + 1)  # header lines + the column titles
    return pad + col * (tile_size + pad), top + row * (tile_size + line + pad)


def attention_figure(
    image: Tensor,
    maps: Tensor | None,
    query_pixels: Tensor | None,
    *,
    header: Sequence[str] = (),
    tile_size: int = 96,
    colormap: str = "inferno",
    alpha: float = 0.6,
    upsample: Upsample = "nearest",
    pad: int = 4,
) -> Image.Image:
    """One image's attention figure.

    image: [3, H, W] in [0, 1] (already denormalized); maps: [Nh, nq, H', W'] probabilities of
    one image (``AttentionCapture.maps[b]``); query_pixels: [nq, 2] (iy, ix) on the H' x W' grid.
    Returns an RGB PIL image: ``header`` lines, column titles, then nq rows of (1 + Nh) tiles of
    tile_size px (at :func:`tile_origin`), each with a label line under it. ``maps=None`` (a model
    without attention): the header and the input only.
    """
    line = _line_height(tile_size)
    font = _font(line - 4)
    tile_image = F.interpolate(
        image[None].float(), size=(tile_size, tile_size), mode="bilinear", align_corners=False, antialias=True
    )[0].clamp(0, 1)
    if maps is None:
        nh, nq = 0, 1
    else:
        if maps.dim() != 4 or query_pixels is None or query_pixels.shape != (maps.shape[1], 2):
            shapes = tuple(maps.shape), None if query_pixels is None else tuple(query_pixels.shape)
            raise ValueError(f"maps must be [Nh, nq, H', W'] and query_pixels [nq, 2]; got {shapes}")
        nh, nq, gh, gw = maps.shape
        heat = heat_tiles(maps.reshape(nh * nq, gh, gw), tile_size, upsample).reshape(nh, nq, tile_size, tile_size)
        peaks = maps.detach().float().flatten(2).amax(dim=2)  # [Nh, nq]

    width, height = tile_origin(nq, 1 + nh, tile_size=tile_size, header_lines=len(header), pad=pad)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([width] + [2 * pad + int(measure.textlength(text, font=font)) + 1 for text in header])
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(header):
        draw.text((pad, pad + i * line), text, fill=TEXT_COLOR, font=font)
    titles = ["input"] + [f"head {h + 1}" for h in range(nh)]
    for c, title in enumerate(titles):
        x, y = tile_origin(0, c, tile_size=tile_size, header_lines=len(header), pad=pad)
        draw.text((x, y - line), title, fill=TEXT_COLOR, font=font)
    if maps is None:
        x, y = tile_origin(0, 0, tile_size=tile_size, header_lines=len(header), pad=pad)
        canvas.paste(_to_pil(tile_image), (x, y))
        return canvas
    for r in range(nq):
        iy, ix = (int(v) for v in query_pixels[r].tolist())
        box = query_box((iy, ix), (gh, gw), tile_size)
        tiles = [tile_image] + list(overlay(tile_image, heat[:, r], colormap, alpha))
        for c, tile in enumerate(tiles):
            x, y = tile_origin(r, c, tile_size=tile_size, header_lines=len(header), pad=pad)
            canvas.paste(_to_pil(tile), (x, y))
            draw.rectangle(
                (x + box[0], y + box[1], x + box[2], y + box[3]), outline=QUERY_COLOR, width=max(1, tile_size // 48)
            )
            label = f"query ({iy},{ix})" if c == 0 else f"max {peaks[c - 1, r]:.2f}"
            draw.text((x, y + tile_size + 1), label, fill=TEXT_COLOR, font=font)
    return canvas


def pil_to_tensor(picture: Image.Image) -> Tensor:
    """RGB PIL image -> [3, H, W] float in [0, 1] (what TensorBoard's ``add_image`` takes)."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
