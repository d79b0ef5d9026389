"""``backend="fused"`` and content-only attention: torch's ``scaled_dot_product_attention``.

The relative terms fold into an augmented dot product
``q'_i = [q_i, q_i . r^W[x - ix + W - 1] (x < W), q_i . r^H[y - iy + H - 1] (y < H)]``,
``k'_j = [k_j, onehot_W(jx), onehot_H(jy)]`` so ``q'_i . k'_j = q_i . k_j + S_W + S_H``, run by SDPA
(v zero-padded to the augmented width). Plain torch ops on any device, so it exports to ONNX
(:mod:`aa_lightning.export`); it costs dkh + H + W multiply-adds per logit, and above head dim 256
SDPA falls back to its (HW)^2 math path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tables import relative_logit_tables


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _sdpa_equal_dims(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """SDPA over [B, Nh, L, d], zero-padded to equal head dims and made contiguous in d, the
    two conditions of torch's fused kernels (otherwise it silently falls back to the
    (HW)^2-materializing math path)."""
    dv = v.shape[-1]
    dim = max(q.shape[-1], dv)
    q, k, v = (_pad_last(t, dim).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out[..., :dv]


def content_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q . k / sqrt(dkh)) v without relative logits. q, k: [B, Nh, H, W, dkh]; v: [B, Nh, H, W, dvh]."""
    b, nh, h, w, dkh = q.shape
    flat = lambda t: t.reshape(b, nh, h * w, t.shape[-1])  # noqa: E731
    out = _sdpa_equal_dims(flat(q), flat(k), flat(v), scale=dkh**-0.5)
    return out.reshape(b, nh, h, w, -1)


def fused_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """The relative attention as one SDPA call over the augmented q', k' (module doc). Shapes as
    :func:`aa_lightning.attention.relative_attention_2d`."""
    b, nh, h, w, dkh = q.shape
    s_w, s_h = relative_logit_tables(q, rel_h, rel_w)
    q_aug = torch.cat([q, s_w, s_h], dim=-1).reshape(b, nh, h * w, dkh + w + h)
    onehot_w = torch.eye(w, dtype=k.dtype, device=k.device).expand(h, w, w)  # [jy, jx, W]
    onehot_h = torch.eye(h, dtype=k.dtype, device=k.device)[:, None, :].expand(h, w, h)  # [jy, jx, H]
    k_aug = torch.cat([k, torch.cat([onehot_w, onehot_h], dim=-1).expand(b, nh, h, w, w + h)], dim=-1)
    out = _sdpa_equal_dims(q_aug, k_aug.reshape(b, nh, h * w, dkh + w + h), v.reshape(b, nh, h * w, -1), dkh**-0.5)
    return out.reshape(b, nh, h, w, -1)
