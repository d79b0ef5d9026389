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

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .tables import autocast_dtype, relative_logit_tables

# _GEMM_NOTE: the value-side GEMMs have a tiny dimension (dkh, dvh are often 3-8). MKL runs
# [n, HW] @ [HW, d] about 3-5x slower than the same product written as [d, HW] @ [HW, n], so
# out, grad_q, grad_k and grad_v are accumulated transposed ([BH, d, HW]) and transposed once
# at the end.

# Target size in bytes of one chunk's [B*Nh, n, HW] logits; a few such buffers are alive at once.
CHUNK_BYTES = 16 * 1024 * 1024


def chunk_rows(batch_heads: int, length: int, element_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Query rows per chunk so that one [batch_heads, rows, length] buffer is about chunk_bytes."""
    return max(1, min(length, chunk_bytes // max(1, batch_heads * length * element_size)))


def chunk_logits(q: Tensor, kt: Tensor, bias_w: Tensor, bias_h: Tensor, start: int, end: int) -> Tensor:
    """[BH, n, L] logits of query rows start:end: the bias broadcast over the key grid (one
    write), then the q.k GEMM accumulated into it in place (no extra copy of the bias)."""
    bh, _, w = bias_w.shape
    h = bias_h.shape[2]
    logits = (bias_h[:, start:end, :, None] + bias_w[:, start:end, None, :]).view(bh, end - start, h * w)
    return logits.baddbmm_(q[:, start:end], kt)


class FactorizedBiasAttention(torch.autograd.Function):
    """Autograd function; see :func:`factorized_bias_attention`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor, rows: int) -> Tensor:
        kt, vt = k.transpose(1, 2), v.transpose(1, 2).contiguous()
        length = q.shape[1]
        out_t = q.new_empty(q.shape[0], v.shape[2], length)  # [BH, dv, L], see _GEMM_NOTE
        for start in range(0, length, rows):
            end = min(length, start + rows)
            probs = torch.softmax(chunk_logits(q, kt, bias_w, bias_h, start, end), dim=-1)
            out_t[:, :, start:end] = torch.bmm(vt, probs.transpose(1, 2))
        out = out_t.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, bias_w, bias_h, out)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias_w, bias_h, out = ctx.saved_tensors
        rows = ctx.rows
        bh, length, dk = q.shape
        w, h = bias_w.shape[2], bias_h.shape[2]
        kt = k.transpose(1, 2)
        kt_c, qt = kt.contiguous(), q.transpose(1, 2).contiguous()
        grad_out = grad_out.contiguous()
        # dlogits = P * (dO V^T - D) with D_i = dO_i . O_i; the -D column rides along in one GEMM:
        # [dO, -D] @ [V, 1]^T = dO V^T - D.
        grad_out_aug = torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], dim=-1)
        v_aug_t = torch.cat([v, v.new_ones(bh, length, 1)], dim=-1).transpose(1, 2)
        grad_out_t = grad_out.transpose(1, 2).contiguous()
        grad_q_t = q.new_empty(bh, dk, length)
        grad_k_t = q.new_zeros(bh, dk, length)
        grad_v_t = q.new_zeros(bh, v.shape[2], length)
        grad_bw = torch.empty_like(bias_w)
        grad_bh = torch.empty_like(bias_h)
        for start in range(0, length, rows):
            end = min(length, start + rows)
            probs = torch.softmax(chunk_logits(q, kt, bias_w, bias_h, start, end), dim=-1)
            grad_v_t.baddbmm_(grad_out_t[:, :, start:end], probs)
            d_logits = torch.bmm(grad_out_aug[:, start:end], v_aug_t).mul_(probs)
            grad_q_t[:, :, start:end] = torch.bmm(kt_c, d_logits.transpose(1, 2))
            grad_k_t.baddbmm_(qt[:, :, start:end], d_logits)
            d_grid = d_logits.view(bh, end - start, h, w)
            grad_bw[:, start:end] = d_grid.sum(dim=2)
            grad_bh[:, start:end] = d_grid.sum(dim=3)
        grads = (t.transpose(1, 2).contiguous() for t in (grad_q_t, grad_k_t, grad_v_t))
        return *grads, grad_bw, grad_bh, None


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


def attend_with_tables(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    dtype: torch.dtype,
    attention: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """The factorized path in ``dtype``: q scaled by dkh^-0.5, the per-query tables
    (:func:`~.tables.relative_logit_tables`), then ``attention(q, k, v, bias_w, bias_h)`` over
    [B Nh, HW, d] views (default :func:`factorized_bias_attention`; the generic CPU kernel takes the
    same arguments). Shapes as :func:`aa_lightning.attention.relative_attention_2d`; returns ``dtype``."""
    b, nh, h, w, dkh = q.shape
    q = q.to(dtype) * dkh**-0.5
    k, v = k.to(dtype), v.to(dtype)
    bh, length = b * nh, h * w
    s_w, s_h = relative_logit_tables(q, rel_h.to(dtype), rel_w.to(dtype))
    out = (attention or factorized_bias_attention)(
        q.reshape(bh, length, dkh),
        k.reshape(bh, length, dkh),
        v.reshape(bh, length, -1),
        s_w.reshape(bh, length, w),
        s_h.reshape(bh, length, h),
    )
    return out.reshape(b, nh, h, w, -1)


def chunked_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """``backend="chunked"``: :func:`attend_with_tables` with :func:`factorized_bias_attention`. Shapes as
    :func:`aa_lightning.attention.relative_attention_2d`; computes in the autocast dtype (else q's)."""
    device_type = q.device.type
    dtype = autocast_dtype(device_type) or q.dtype
    with torch.autocast(device_type, enabled=False):
        return attend_with_tables(q, k, v, rel_h, rel_w, dtype)
