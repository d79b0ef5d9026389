"""Decoded PIL images as the uint8 RGB arrays every pipeline of this project takes."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: PIL modes of 16-bit (and 32-bit integer) single-channel images, e.g. 16-bit greyscale PNG / TIFF
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a decoded image.

    16-bit greyscale (PIL modes ``I;16*``, and ``I``) is read at its full 16-bit range and scaled
    to 8 bits (``round(v / 257)``: 65535 -> 255, 32768 -> 128), where PIL's ``convert("RGB")``
    clips every value above 255 to white. 16-bit RGB(A) PNGs are already scaled by PIL's decoder.
    """
    if image.mode in WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))
