"""An independent float64 loop implementation of the paper's equation, for tests only.

l_ij = q_i . (k_j + r^W[jx - ix + W - 1] + r^H[jy - iy + H - 1]) / sqrt(dkh)
out_i = sum_j softmax_j(l_i) v_j
"""

import math

import torch


def loop_relative_attention(q, k, v, rel_h=None, rel_w=None):
    """q, k: [B, Nh, H, W, dkh]; v: [B, Nh, H, W, dvh] -> [B, Nh, H, W, dvh] in float64."""
    q, k, v = q.double(), k.double(), v.double()
    b_size, heads, height, width, dkh = q.shape
    out = torch.zeros(*q.shape[:4], v.shape[-1], dtype=torch.float64)
    for b in range(b_size):
        for n in range(heads):
            for iy in range(height):
                for ix in range(width):
                    qi = q[b, n, iy, ix]
                    logits = []
                    for jy in range(height):
                        for jx in range(width):
                            key = k[b, n, jy, jx].clone()
                            if rel_w is not None:
                                key = key + rel_w[jx - ix + width - 1].double() + rel_h[jy - iy + height - 1].double()
                            logits.append(float(qi @ key) / math.sqrt(dkh))
                    peak = max(logits)
                    weights = [math.exp(x - peak) for x in logits]
                    total = sum(weights)
                    acc = torch.zeros(v.shape[-1], dtype=torch.float64)
                    for j, wgt in enumerate(weights):
                        acc += wgt / total * v[b, n, j // width, j % width]
                    out[b, n, iy, ix] = acc
    return out


def make_inputs(b, nh, h, w, dkh, dvh, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(b, nh, h, w, dkh, generator=g, dtype=dtype),
        torch.randn(b, nh, h, w, dkh, generator=g, dtype=dtype),
        torch.randn(b, nh, h, w, dvh, generator=g, dtype=dtype),
        torch.randn(2 * h - 1, dkh, generator=g, dtype=dtype) * 0.5,
        torch.randn(2 * w - 1, dkh, generator=g, dtype=dtype) * 0.5,
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]
