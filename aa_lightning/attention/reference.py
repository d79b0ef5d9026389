"""The paper's appendix algorithm for 2-D relative attention, kept as the in-repo ground truth.

It materializes the (HW)x(HW) logits, exactly as the TF code of Bello et al. (Appendix A) does:
``relative_logits_1d`` computes ``q . r`` for every relative offset, ``rel_to_abs`` turns the
[.., L, 2L-1] relative logits into absolute [.., L, L] ones, and the result is tiled over the
other axis. Memory is O(B Nh (HW)^2): use it for testing and small maps only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rel_to_abs(x: Tensor) -> Tensor:
    """Relative to absolute logits: [B, Nh, L, 2L-1] -> [B, Nh, L, L], out[i, j] = x[i, j - i + L - 1].

    The appendix's pad-and-reshape trick: pad one zero column, flatten, pad L-1 zeros, reshape to
    [L+1, 2L-1] and keep the first L rows and the last L columns.
    """
    b, nh, length, _ = x.shape
    x = torch.cat([x, x.new_zeros(b, nh, length, 1)], dim=3)  # [B, Nh, L, 2L]
    flat = x.reshape(b, nh, length * 2 * length)
    flat = torch.cat([flat, flat.new_zeros(b, nh, length - 1)], dim=2)  # [B, Nh, 2L^2 + L - 1]
    final = flat.reshape(b, nh, length + 1, 2 * length - 1)
    return final[:, :, :length, length - 1 :]


def relative_logits_1d(q: Tensor, rel_k: Tensor, permute: tuple[int, ...]) -> Tensor:
    """Relative logits along the last spatial axis of ``q``, tiled over the other axis.

    q: [B, Nh, X, Y, dkh] (attention runs along Y); rel_k: [2Y-1, dkh].
    Returns [B, Nh, X, Y, X, Y] permuted by ``permute`` into the caller's (iy, ix, jy, jx) order.
    """
    b, nh, x_len, y_len, _ = q.shape
    rel = torch.einsum("bhxyd,md->bhxym", q, rel_k)  # [B, Nh, X, Y, 2Y-1]
    rel = rel_to_abs(rel.reshape(b, nh * x_len, y_len, 2 * y_len - 1))  # [B, Nh*X, Y, Y]
    rel = rel.reshape(b, nh, x_len, 1, y_len, y_len).expand(b, nh, x_len, x_len, y_len, y_len)
    return rel.permute(*permute)


def relative_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor | None = None, rel_w: Tensor | None = None
) -> Tensor:
    """softmax((q.k + S_H + S_W) / sqrt(dkh)) v with explicit (HW)x(HW) logits.

    q, k: [B, Nh, H, W, dkh]; v: [B, Nh, H, W, dvh]; rel_h: [2H-1, dkh]; rel_w: [2W-1, dkh].
    Returns [B, Nh, H, W, dvh].
    """
    b, nh, h, w, dkh = q.shape
    q = q * dkh**-0.5
    logits = torch.einsum("bnd,bmd->bnm", q.reshape(b * nh, h * w, dkh), k.reshape(b * nh, h * w, dkh))
    logits = logits.reshape(b, nh, h * w, h * w)
    if rel_w is not None:
        # width: rows are iy, attention along x: (iy, ix, jy, jx) = permute (0,1,2,4,3,5).
        rel_logits_w = relative_logits_1d(q, rel_w, (0, 1, 2, 4, 3, 5))
        # height: transpose q so attention runs along y: [B, Nh, W, H, d] -> (ix, iy, jx, jy).
        rel_logits_h = relative_logits_1d(q.transpose(2, 3), rel_h, (0, 1, 4, 2, 5, 3))
        logits = logits + (rel_logits_w + rel_logits_h).reshape(b, nh, h * w, h * w)
    weights = torch.softmax(logits, dim=-1)
    out = torch.matmul(weights, v.reshape(b, nh, h * w, -1))
    return out.reshape(b, nh, h, w, -1)
