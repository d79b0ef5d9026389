"""``backend="cpu_kernel"``: the relative attention on the compiled CPU kernels of :mod:`.ops`.

float32 runs the tiled kernel (the tables computed inside it, q, k, v read as they are) where it is
built and wins (:func:`.ops.use_tiled`); float64, and float32 where the per-dims build fails, run the
generic kernel on precomputed tables. Other dtypes (bf16 / fp16 autocast) compute in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_lightning.attention.chunked import attend_with_tables
from aa_lightning.attention.tables import autocast_dtype

from . import ops


@torch.compiler.assume_constant_result  # the per-head-dims float32 kernel's build, decided at trace time
def _tiled_kernel_builds(dtype: torch.dtype, dkh: int, dvh: int) -> bool:
    return ops.tiled_builds(dtype, dkh, dvh)


def _use_tiled_kernel(dtype: torch.dtype, dkh: int, dvh: int, positions: int) -> bool:
    """ops.use_tiled, split so that compile sees a guard on the (possibly symbolic) grid size and a
    constant for the build."""
    return ops.tiled_fits(dkh, positions) and _tiled_kernel_builds(dtype, dkh, dvh)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs a dispatch per call


def cpu_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """Shapes as :func:`aa_lightning.attention.relative_attention_2d`; computes in float32 (float64 for
    float64 inputs) and returns the autocast dtype (else q's)."""
    autocast = autocast_dtype("cpu")
    if autocast is None:  # nothing to switch off: no autocast context entered per call
        return _kernel_attention(q, k, v, rel_h, rel_w, q.dtype)
    with torch.autocast("cpu", enabled=False):
        return _kernel_attention(q, k, v, rel_h, rel_w, autocast)


def _kernel_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out_dtype: torch.dtype) -> Tensor:
    h, w, dkh = q.shape[2:]
    dtype = out_dtype if out_dtype in ops.DTYPES else torch.float32
    if _use_tiled_kernel(dtype, dkh, v.shape[-1], h * w):
        # tables computed in the kernel; q, k, v read as they are (scaled, cast and laid out in one pass each)
        q, k, v = (t if t.dtype in ops.TILED_READS else t.to(dtype) for t in (q, k, v))
        out = ops.cpu_kernel_relative_attention(q, k, v, _as(rel_h, dtype), _as(rel_w, dtype), scale=dkh**-0.5)
        return _as(out, out_dtype)
    out = attend_with_tables(q, k, v, rel_h, rel_w, dtype, ops.cpu_kernel_attention)  # the generic kernel
    return _as(out, out_dtype)
