"""``backend="onnx"``: the relative attention in the form an exported ONNX graph runs fastest on CPU.

The relative terms fold into an augmented dot product, as in :mod:`.fused`,

    q'_i = q_i R_i = [q_i, q_i . r^W[x - ix + W - 1] (x < W), q_i . r^H[y - iy + H - 1] (y < H)]
    k'_j = [k_j, 0, 0] + E_j = [k_j, onehot_W(jx), onehot_H(jy)]

so that q'_i . k'_j = q_i . k_j + S_W[i, j] + S_H[i, j], but built for a graph runtime:

- q' by one batched MatMul over the HW positions (``R`` [HW, dkh, dkh + W + H], from the tables),
  not two Einsums and a Concat along a width-3 axis (onnxruntime copies such a Concat element-wise);
- k' by a Pad and an Add of the constant ``E`` [HW, dkh + W + H] (no Concat, no Expand over the batch);
- one ``scaled_dot_product_attention`` with v at its own width dvh (not zero-padded to dkh + W + H):
  the exporter writes it as the ONNX ``Attention`` op at opset >= 23, which onnxruntime runs head by
  head with the (HW)^2 logits of one head in cache, and as MatMul, Softmax, MatMul below opset 23.

No constant of the graph has an (HW)x(HW) shape; the logits exist only inside the attention op.
Shapes and result as :func:`aa_lightning.attention.relative_attention_2d` (plain torch ops, any
device, differentiable); in eager PyTorch the other backends are faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tables import relative_offsets_index


def augmented_projections(rel_h: Tensor, rel_w: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """(R, E) of the module doc for a height x width grid. rel_h: [2H-1, d]; rel_w: [2W-1, d].

    R [HW, d, d + W + H]: q'_i = q_i @ R[i] (identity, then r^W[x - ix + W - 1]^T, r^H[y - iy + H - 1]^T);
    E [HW, d + W + H]: k'_j = [k_j, 0, 0] + E[j] (zeros, then onehot_W(jx), onehot_H(jy)); i = iy * W + ix.
    """
    d, dtype, device = rel_h.shape[1], rel_h.dtype, rel_h.device
    h, w = height, width
    r_w = rel_w[relative_offsets_index(w, device)].transpose(1, 2)  # [ix, d, x]
    r_h = rel_h[relative_offsets_index(h, device)].transpose(1, 2)  # [iy, d, y]
    eye = torch.eye(d, dtype=dtype, device=device)
    rows = torch.cat([eye.expand(h, w, d, d), r_w.expand(h, w, d, w), r_h[:, None].expand(h, w, d, h)], dim=-1)
    onehot = torch.cat(
        [
            torch.zeros(h, w, d, dtype=dtype, device=device),
            torch.eye(w, dtype=dtype, device=device).expand(h, w, w),
            torch.eye(h, dtype=dtype, device=device)[:, None].expand(h, w, h),
        ],
        dim=-1,
    )
    return rows.reshape(h * w, d, d + w + h), onehot.reshape(h * w, d + w + h)


def exported_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """softmax((q.k + S_H + S_W) / sqrt(dkh)) v as one SDPA over q' = q R, k' = [k, 0] + E (module doc).

    q, k: [B, Nh, H, W, dkh]; v: [B, Nh, H, W, dvh]; rel_h: [2H-1, dkh]; rel_w: [2W-1, dkh].
    Returns [B, Nh, H, W, dvh].
    """
    b, nh, h, w, dkh = q.shape
    length = h * w
    rows, onehot = augmented_projections(rel_h.to(q.dtype), rel_w.to(q.dtype), h, w)
    by_position = q.reshape(b * nh, length, dkh).transpose(0, 1)  # [HW, B Nh, dkh]
    q_aug = torch.matmul(by_position, rows).transpose(0, 1).reshape(b, nh, length, dkh + w + h)
    k_aug = F.pad(k.reshape(b, nh, length, dkh), (0, w + h)) + onehot.to(k.dtype)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v.reshape(b, nh, length, -1), scale=dkh**-0.5)
    return out.reshape(b, nh, h, w, -1)
