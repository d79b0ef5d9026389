"""Triton kernels for 2-D relative attention, FlashAttention-2 style (see :mod:`.triton_attention`).

    logits[i, j] = q_i . k_j + q_i . rel_w[jx - ix + W - 1] + q_i . rel_h[jy - iy + H - 1]
    out_i = sum_j softmax_j(logits[i, :]) v_j            i = iy * W + ix, j = jy * W + jx

q is already scaled by dkh^-0.5. One program per (block of BLOCK_M queries, batch-head); keys are
streamed in blocks of R grid rows x WP columns (WP a power of two, the whole padded row when W <= 32,
else a column chunk of 32), so the relative terms of a block are two broadcasts, never an (HW)^2
tensor:

- ``bias_w`` [BLOCK_M, WP] = q_i . rel_w[jx - ix + W - 1]: it does not depend on the key row, so
  it is computed once per column chunk (the outer loop) and broadcast over the block's R rows;
- ``bias_h`` [BLOCK_M, R] = q_i . rel_h[jy - iy + H - 1] for the block's R rows, broadcast over WP.

Forward keeps an online softmax and saves each row's log-sum-exp. Backward recomputes the
probabilities in two passes without atomics: :func:`_bwd_dq` per query block (dq and the
relative-logit gradients ``grad_bias_w`` [L, W] = sum over key rows and ``grad_bias_h`` [L, H] = sum
over key columns, from which torch finishes the gradients of q, rel_h and rel_w), and
:func:`_bwd_dkdv` per key block. Head dims are padded (masked loads) to DP / DVP, powers of two
>= 16, the smallest that ``tl.dot`` takes. Accumulation is float32; float32 inputs use exact
("ieee") dot products.

Whether these are compiled or interpreted is decided when this module is imported
(``TRITON_INTERPRET=1`` runs them on CPU tensors, for the tests).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bias_w(q_base, rel_w, offs_m, mask_m, ix, col0, W, D, WP: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, WP] float32: q_i . rel_w[jx - ix + W - 1] for key columns jx = col0 .. col0 + WP - 1
    (0 for jx >= W)."""
    jx = col0 + tl.arange(0, WP)
    row = (jx[None, :] - ix[:, None] + W - 1) * D
    mask = mask_m[:, None] & (jx[None, :] < W)
    acc = tl.zeros((BLOCK_M, WP), dtype=tl.float32)
    for d in range(D):
        q_d = tl.load(q_base + offs_m * D + d, mask=mask_m, other=0.0).to(tl.float32)
        acc += q_d[:, None] * tl.load(rel_w + row + d, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _bias_h(q32, rel_h, mask_m, iy, row0, H, D, offs_d, R: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, R] float32: q_i . rel_h[jy - iy + H - 1] for the key rows jy = row0 .. row0 + R - 1."""
    rows = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for r in range(R):
        mask = (mask_m & (row0 + r < H))[:, None] & (offs_d[None, :] < D)
        rel = tl.load(rel_h + (row0 + r - iy + H - 1)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        acc = tl.where(rows[None, :] == r, tl.sum(q32 * rel.to(tl.float32), 1)[:, None], acc)
    return acc


@triton.jit
def _over_rows(x, R: tl.constexpr, WP: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, WP] -> [BLOCK_M, R * WP]: the same columns for each of the block's R key rows."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (BLOCK_M, R, WP)), (BLOCK_M, R * WP))


@triton.jit
def _over_columns(x, R: tl.constexpr, WP: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, R] -> [BLOCK_M, R * WP]: each key row's value over its WP columns."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (BLOCK_M, R, WP)), (BLOCK_M, R * WP))


@triton.jit
def _load_rows(base, rows, row_mask, offs, n):
    """[len(rows), len(offs)] block of a row-major [*, n] matrix at ``base``: rows ``rows`` (where ``row_mask``),
    columns ``offs`` below ``n`` (the head-dim padding reads 0)."""
    return tl.load(base + rows[:, None] * n + offs[None, :], mask=row_mask[:, None] & (offs[None, :] < n), other=0.0)


@triton.jit
def _block_logits(
    q,
    q32,
    k,
    bias_w_rows,
    rel_h,
    mask_m,
    iy,
    row0,
    H,
    D,
    offs_d,
    R: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_M, R * WP] float32 logits of a query block against a key block: q . k + the key columns'
    ``bias_w_rows`` (already broadcast over the block's rows) + q . rel_h of the block's key rows."""
    bias_h = _bias_h(q32, rel_h, mask_m, iy, row0, H, D, offs_d, R, BLOCK_M)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) + bias_w_rows + _over_columns(bias_h, R, WP, BLOCK_M)


@triton.jit
def _key_block(row0, col0, H, W, WP: tl.constexpr, R: tl.constexpr):
    """Flat key indices [R * WP] of grid rows row0 .. row0 + R - 1, columns col0 .. col0 + WP - 1,
    and which of them exist."""
    n = tl.arange(0, R * WP)
    jy = row0 + n // WP
    jx = col0 + n % WP
    return jy * W + jx, (jx < W) & (jy < H)


@triton.jit
def _fwd(
    Q,
    K,
    V,
    REL_H,
    REL_W,
    OUT,
    LSE,
    H,
    W,
    D,
    DV,
    L,
    DP: tl.constexpr,
    DVP: tl.constexpr,
    WP: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = Q + bh * L * D, K + bh * L * D, V + bh * L * DV
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    iy, ix = offs_m // W, offs_m % W
    offs_d, offs_dv = tl.arange(0, DP), tl.arange(0, DVP)
    q = _load_rows(q_base, offs_m, mask_m, offs_d, D)
    q32 = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DVP), dtype=tl.float32)
    for col0 in range(0, W, WP):  # column chunks outside: bias_w is computed once per chunk
        bias_w = _over_rows(_bias_w(q_base, REL_W, offs_m, mask_m, ix, col0, W, D, WP, BLOCK_M), R, WP, BLOCK_M)
        for row0 in range(0, H, R):
            key, key_mask = _key_block(row0, col0, H, W, WP, R)
            k = _load_rows(k_base, key, key_mask, offs_d, D)
            s = _block_logits(q, q32, k, bias_w, REL_H, mask_m, iy, row0, H, D, offs_d, R, WP, BLOCK_M, PRECISION)
            s = tl.where(key_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_base, key, key_mask, offs_dv, DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + bh * L * DV + offs_m[:, None] * DV + offs_dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mask_m[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(LSE + bh * L + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    REL_H,
    REL_W,
    DO,
    LSE,
    DELTA,
    DQ,
    GRAD_BW,
    GRAD_BH,
    H,
    W,
    D,
    DV,
    L,
    DP: tl.constexpr,
    DVP: tl.constexpr,
    WP: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    q_base, k_base, v_base = Q + bh * L * D, K + bh * L * D, V + bh * L * DV
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    iy, ix = offs_m // W, offs_m % W
    offs_d, offs_dv = tl.arange(0, DP), tl.arange(0, DVP)
    q = _load_rows(q_base, offs_m, mask_m, offs_d, D)
    q32 = q.to(tl.float32)
    do = _load_rows(DO + bh * L * DV, offs_m, mask_m, offs_dv, DV)
    lse = tl.load(LSE + bh * L + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, DP), dtype=tl.float32)
    rows = tl.arange(0, R)
    for col0 in range(0, W, WP):
        if CHUNKED:  # the previous chunk's GRAD_BH stores (by whichever threads own them) before these loads
            tl.debug_barrier()
        bias_w = _over_rows(_bias_w(q_base, REL_W, offs_m, mask_m, ix, col0, W, D, WP, BLOCK_M), R, WP, BLOCK_M)
        grad_bw = tl.zeros((BLOCK_M, WP), dtype=tl.float32)
        for row0 in range(0, H, R):
            key, key_mask = _key_block(row0, col0, H, W, WP, R)
            k = _load_rows(k_base, key, key_mask, offs_d, D)
            v = _load_rows(v_base, key, key_mask, offs_dv, DV)
            s = _block_logits(q, q32, k, bias_w, REL_H, mask_m, iy, row0, H, D, offs_d, R, WP, BLOCK_M, PRECISION)
            p = tl.where(key_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            ds3 = tl.reshape(ds, (BLOCK_M, R, WP))
            grad_bw += tl.sum(ds3, 1)
            # row sums: GRAD_BH [BH, L, H] accumulates the column chunks (this program owns its queries' rows)
            grad_bh = GRAD_BH + (bh * L + offs_m[:, None]) * H + (row0 + rows)[None, :]
            bh_mask = mask_m[:, None] & (row0 + rows < H)[None, :]
            if CHUNKED:  # W > WP: add to the earlier chunks' sums (a constexpr: costs registers)
                tl.store(grad_bh, tl.load(grad_bh, mask=bh_mask & (col0 > 0), other=0.0) + tl.sum(ds3, 2), mask=bh_mask)
            else:
                tl.store(grad_bh, tl.sum(ds3, 2), mask=bh_mask)
        jx = col0 + tl.arange(0, WP)
        tl.store(
            GRAD_BW + bh * L * W + offs_m[:, None] * W + jx[None, :], grad_bw, mask=mask_m[:, None] & (jx < W)[None, :]
        )
    tl.store(DQ + bh * L * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    REL_H,
    REL_W,
    DO,
    LSE,
    DELTA,
    DK,
    DV_OUT,
    H,
    W,
    D,
    DV,
    L,
    DP: tl.constexpr,
    DVP: tl.constexpr,
    WP: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    q_base = Q + bh * L * D
    chunks = tl.cdiv(W, WP)
    row0 = (tl.program_id(0) // chunks) * R
    col0 = (tl.program_id(0) % chunks) * WP
    key, key_mask = _key_block(row0, col0, H, W, WP, R)
    offs_d, offs_dv = tl.arange(0, DP), tl.arange(0, DVP)
    k_mask, v_mask = key_mask[:, None] & (offs_d[None, :] < D), key_mask[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K + bh * L * D + key[:, None] * D + offs_d[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + bh * L * DV + key[:, None] * DV + offs_dv[None, :], mask=v_mask, other=0.0)
    dk = tl.zeros((R * WP, DP), dtype=tl.float32)
    dv = tl.zeros((R * WP, DVP), dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        iy, ix = offs_m // W, offs_m % W
        q = _load_rows(q_base, offs_m, mask_m, offs_d, D)
        do = _load_rows(DO + bh * L * DV, offs_m, mask_m, offs_dv, DV)
        lse = tl.load(LSE + bh * L + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_m, mask=mask_m, other=0.0)
        bias_w = _bias_w(q_base, REL_W, offs_m, mask_m, ix, col0, W, D, WP, BLOCK_M)
        bias_h = _bias_h(q.to(tl.float32), REL_H, mask_m, iy, row0, H, D, offs_d, R, BLOCK_M)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) + _over_rows(bias_w, R, WP, BLOCK_M)
        s += _over_columns(bias_h, R, WP, BLOCK_M)
        p = tl.where(mask_m[:, None] & key_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + bh * L * D + key[:, None] * D + offs_d[None, :], dk, mask=k_mask)
    tl.store(DV_OUT + bh * L * DV + key[:, None] * DV + offs_dv[None, :], dv, mask=v_mask)
