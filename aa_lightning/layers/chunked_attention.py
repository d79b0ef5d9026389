"""Attention with a row/column-factorized additive bias, in query chunks, recomputed in backward.

    logits[i, j] = q_i . k_j + bias_w[i, jx] + bias_h[i, jy]        j = jy * W + jx
    out_i = sum_j softmax_j(logits[i, :]) v_j

This is exactly the structure of the paper's 2-D relative logits (S_W depends on the query and
the key's column, S_H on the query and the key's row), so the bias costs O(HW (H + W)) memory
instead of O((HW)^2). Queries are processed in chunks of ``n`` rows; forward keeps no
probabilities, and backward recomputes each chunk's softmax (the FlashAttention idea, in plain
batched GEMMs), so peak memory is O(B Nh n HW) for any map size and the relative terms cost two
broadcast additions per logit rather than (H + W) extra multiply-adds.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Target size in bytes of one chunk's [B*Nh, n, HW] logits; a few such buffers are alive at once.
CHUNK_BYTES = 16 * 1024 * 1024


def chunk_rows(batch_heads: int, length: int, element_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Query rows per chunk so that one [batch_heads, rows, length] buffer is about chunk_bytes."""
    return max(1, min(length, chunk_bytes // max(1, batch_heads * length * element_size)))


def _chunk_logits(q: Tensor, kt: Tensor, bias_w: Tensor, bias_h: Tensor, start: int, end: int) -> Tensor:
    """[BH, n, L] logits of query rows start:end (bias broadcast over the key grid, then one GEMM)."""
    bh, _, w = bias_w.shape
    h = bias_h.shape[2]
    bias = (bias_h[:, start:end, :, None] + bias_w[:, start:end, None, :]).reshape(bh, end - start, h * w)
    return torch.baddbmm(bias, q[:, start:end], kt)


class FactorizedBiasAttention(torch.autograd.Function):
    """Autograd function; see :func:`factorized_bias_attention`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor, rows: int) -> Tensor:
        kt = k.transpose(1, 2)
        length = q.shape[1]
        out = q.new_empty(q.shape[0], length, v.shape[2])
        for start in range(0, length, rows):
            end = min(length, start + rows)
            probs = torch.softmax(_chunk_logits(q, kt, bias_w, bias_h, start, end), dim=-1)
            out[:, start:end] = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, bias_w, bias_h)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias_w, bias_h = ctx.saved_tensors
        rows = ctx.rows
        bh, length, _ = q.shape
        w, h = bias_w.shape[2], bias_h.shape[2]
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        grad_bw = torch.empty_like(bias_w)
        grad_bh = torch.empty_like(bias_h)
        for start in range(0, length, rows):
            end = min(length, start + rows)
            probs = torch.softmax(_chunk_logits(q, kt, bias_w, bias_h, start, end), dim=-1)
            d_out = grad_out[:, start:end]
            grad_v.baddbmm_(probs.transpose(1, 2), d_out)
            d_probs = torch.bmm(d_out, vt)
            d_logits = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
            grad_q[:, start:end] = torch.bmm(d_logits, k)
            grad_k.baddbmm_(d_logits.transpose(1, 2), q[:, start:end])
            d_grid = d_logits.view(bh, end - start, h, w)
            grad_bw[:, start:end] = d_grid.sum(dim=2)
            grad_bh[:, start:end] = d_grid.sum(dim=3)
        return grad_q, grad_k, grad_v, grad_bw, grad_bh, None


def factorized_bias_attention(
    q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor, rows: int | None = None
) -> Tensor:
    """softmax_j(q_i . k_j + bias_w[i, jx] + bias_h[i, jy]) v_j, chunked over queries.

    q, k: [BH, L, d] (q already scaled); v: [BH, L, dv]; bias_w: [BH, L, W]; bias_h: [BH, L, H]
    with L = H * W in row-major order. Returns [BH, L, dv]. ``rows``: queries per chunk
    (default: about CHUNK_BYTES per logits buffer).
    """
    if rows is None:
        rows = chunk_rows(q.shape[0], q.shape[1], q.element_size())
    return FactorizedBiasAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), bias_w.contiguous(), bias_h.contiguous(), rows
    )
