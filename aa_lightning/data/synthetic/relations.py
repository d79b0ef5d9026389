"""A built-in image data set whose classes are a *spatial relation between two far-apart shapes*.

Every 32x32 RGB image holds two shapes of random colours on a noisy background with a few
distractor dots: a filled square (the anchor) and a hollow "plus" (the target). The class is the
direction from the anchor to the target, quantized into ``num_classes`` equal angular sectors
(class ``c`` covers angles around ``c * 360 / num_classes`` degrees, counter-clockwise from "to
the right"); the two shapes are 10 to 20 pixels apart. No local patch decides the class: a
network must find both shapes and relate their positions across the image, which is what
global self-attention is for (and what a small receptive field cannot do).

Angles are drawn within ``angle_margin`` of each sector's centre so that neighbouring classes
are separable. Everything is generated from one ``seed`` (numpy PCG64), so the same arguments
always give the same bytes.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
SHAPE_RADIUS = 2  # shapes are (2r+1) x (2r+1) = 5x5 pixels
BORDER = 2  # free pixels between a shape and the edge: a pad-4 random crop hides at most 2 of its 5 columns
MIN_DISTANCE, MAX_DISTANCE = 10.0, 20.0


def relation_class_names(num_classes: int) -> list[str]:
    """``["plus_at_000deg_of_square", "plus_at_036deg_of_square", ...]``: one name per sector."""
    return [f"plus_at_{round(c * 360 / num_classes):03d}deg_of_square" for c in range(num_classes)]


def _square(canvas: np.ndarray, cy: int, cx: int, color: np.ndarray) -> None:
    r = SHAPE_RADIUS
    canvas[cy - r : cy + r + 1, cx - r : cx + r + 1] = color


def _plus(canvas: np.ndarray, cy: int, cx: int, color: np.ndarray) -> None:
    r = SHAPE_RADIUS
    canvas[cy - r : cy + r + 1, cx] = color
    canvas[cy, cx - r : cx + r + 1] = color


def _bright_color(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour: one channel near 1, the others anywhere (never dark)."""
    color = rng.uniform(0.0, 1.0, size=3)
    color[rng.integers(3)] = rng.uniform(0.85, 1.0)
    return np.maximum(color, 0.35)


def _place(rng: np.random.Generator, angle: float) -> tuple[int, int, int, int]:
    """Anchor and target centres (y, x) with the target at ``angle`` from the anchor."""
    lo, hi = SHAPE_RADIUS + BORDER, IMAGE_SIZE - 1 - SHAPE_RADIUS - BORDER
    while True:
        distance = rng.uniform(MIN_DISTANCE, MAX_DISTANCE)
        dx = int(round(distance * np.cos(angle)))
        dy = int(round(-distance * np.sin(angle)))  # image rows grow downwards
        x_lo, x_hi = max(lo, lo - dx), min(hi, hi - dx)
        y_lo, y_hi = max(lo, lo - dy), min(hi, hi - dy)
        if x_lo <= x_hi and y_lo <= y_hi:
            ax, ay = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
            return ay, ax, ay + dy, ax + dx


def render_relation_images(
    num_images: int, num_classes: int = 10, seed: int = 0, angle_margin: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] (HWC, RGB) and labels int64 [N], classes balanced.

    ``angle_margin``: the fraction of a sector's width left empty on each side (0.3 with 10
    classes: angles within +-10.8 degrees of the sector centre, 14.4 degrees between classes).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= angle_margin < 0.5:
        raise ValueError(f"angle_margin must be in [0, 0.5), got {angle_margin}")
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = rng.permutation(np.arange(num_images) % num_classes).astype(np.int64)
    sector = 2 * np.pi / num_classes
    half_width = sector * (0.5 - angle_margin)
    images = np.empty((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    for i, label in enumerate(labels):
        # background: a dim base colour, a random linear gradient, pixel noise
        base = rng.uniform(0.05, 0.4, size=3)
        gy, gx = rng.uniform(-0.15, 0.15, size=2)
        canvas = base + (gy * yy + gx * xx)[..., None] + rng.normal(0.0, 0.05, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        # distractors: a few single bright pixels
        for _ in range(int(rng.integers(2, 5))):
            canvas[rng.integers(IMAGE_SIZE), rng.integers(IMAGE_SIZE)] = _bright_color(rng)
        angle = label * sector + rng.uniform(-half_width, half_width)
        ay, ax, ty, tx = _place(rng, angle)
        _square(canvas, ay, ax, _bright_color(rng))
        _plus(canvas, ty, tx, _bright_color(rng))
        images[i] = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return images, labels
