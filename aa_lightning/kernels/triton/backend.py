"""``backend="triton"``: the relative attention on the Triton kernels of :mod:`.ops` (CUDA).

triton is imported on the first call only (:mod:`.ops` imports it), so the package imports without it.
Computes in the autocast dtype (else q's); dtypes the kernels do not take compute in float32.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from aa_lightning.attention.tables import autocast_dtype


def available() -> bool:
    """Whether triton can be imported (it comes with torch's Linux CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def triton_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """Shapes as :func:`aa_lightning.attention.relative_attention_2d`."""
    from . import ops  # imports triton: only when this backend runs

    b, nh, h, w, dkh = q.shape
    out_dtype = autocast_dtype(q.device.type) or q.dtype
    dtype = out_dtype if out_dtype in ops.DTYPES else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        grid = lambda t: t.to(dtype).reshape(b * nh, h, w, t.shape[-1])  # noqa: E731
        out = ops.triton_relative_attention(grid(q) * dkh**-0.5, grid(k), grid(v), rel_h, rel_w)
    return out.to(out_dtype).reshape(b, nh, h, w, -1)
