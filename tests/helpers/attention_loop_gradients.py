"""The loop reference of tests/helpers/attention_loop_reference.py written with differentiable float64 tensor
ops, so autograd gives independent gradients for q, k, v, rel_h and rel_w (tests only).

    l_ij = q_i . (k_j + r^W[jx - ix + W - 1] + r^H[jy - iy + H - 1]) / sqrt(dkh)
    out_i = sum_j softmax_j(l_i) v_j
"""

import math

import torch


def loop_relative_attention_autograd(q, k, v, rel_h, rel_w):
    """q, k: [B, Nh, H, W, dkh]; v: [B, Nh, H, W, dvh] (float64, may require grad) -> [B, Nh, H, W, dvh]."""
    b_size, heads, height, width, dkh = q.shape
    rows = []
    for b in range(b_size):
        for n in range(heads):
            keys = k[b, n].reshape(height * width, dkh)
            values = v[b, n].reshape(height * width, -1)
            for iy in range(height):
                for ix in range(width):
                    rel = torch.stack(
                        [
                            rel_w[jx - ix + width - 1] + rel_h[jy - iy + height - 1]
                            for jy in range(height)
                            for jx in range(width)
                        ]
                    )
                    logits = (keys + rel) @ q[b, n, iy, ix] / math.sqrt(dkh)
                    weights = torch.exp(logits - logits.max().detach())
                    rows.append((weights / weights.sum()) @ values)
    return torch.stack(rows).reshape(*q.shape[:4], v.shape[-1])
