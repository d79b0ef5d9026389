"""2-D relative self-attention, the functional core of AAConv (Bello et al., Section 3.1-3.2).

    O_h = softmax((Q_h K_h^T + S_H + S_W) / sqrt(dkh)) V_h
    S_W[i, j] = q_i . r^W[jx - ix + W - 1],   S_H[i, j] = q_i . r^H[jy - iy + H - 1]

over the HW positions of a row-major flattened map (i = iy * W + ix). Every backend computes the
same function; they differ in speed and memory:

- ``"reference"``: the paper's appendix algorithm, explicit (HW)x(HW) logits (ground truth).
- ``"chunked"``: S_W and S_H are factorized as per-query tables ``q_i . r^W`` [HW, W] and
  ``q_i . r^H`` [HW, H]; attention runs in query chunks with a recomputing backward
  (:mod:`.chunked`). O(HW (H + W)) memory beyond one chunk; plain torch ops.
- ``"cpu_kernel"``: the same factorization in small C kernels compiled on first use
  (:mod:`aa_lightning.kernels.cpu`): a few query rows at a time in cache, the (HW)^2 logits never written
  to memory, a recomputing backward from the saved log-sum-exp; in float32 the tables are
  computed inside the kernel, built per head-dim pair. CPU only; computes in float32 (float64
  for float64 inputs). The CPU default when a C compiler is available.
- ``"triton"``: the same factorization in FlashAttention-2-style Triton kernels
  (:mod:`aa_lightning.kernels.triton`): the relative logits computed per block of queries inside the
  kernel, online softmax, a recomputing backward; nothing of size (HW)^2 in memory. CUDA;
  float32 / bfloat16 / float16 (other dtypes compute in float32). The CUDA default.
- ``"fused"``: the relative terms fold into an augmented dot product
  ``q'_i = [q_i, q_i . r^W[x - ix + W - 1] (x < W), q_i . r^H[y - iy + H - 1] (y < H)]``,
  ``k'_j = [k_j, onehot_W(jx), onehot_H(jy)]`` so ``q'_i . k'_j = q_i . k_j + S_W + S_H``, run by
  torch's ``scaled_dot_product_attention`` (v zero-padded to the augmented width). Plain torch
  ops on any device, so it exports to ONNX (:mod:`aa_lightning.export`); it costs dkh + H + W
  multiply-adds per logit, and above head dim 256 SDPA falls back to its (HW)^2 math path.
- ``"onnx"``: the same augmented dot product built for a graph runtime (:mod:`.exported`): q' by one
  MatMul over positions with a [HW, dkh, dkh + W + H] table, k' by a Pad and an Add, one SDPA with v
  at its own width, which torch's exporter writes as the ONNX ``Attention`` op (opset >= 23). The
  ONNX export's default (:mod:`aa_lightning.export`); plain torch ops, slower than the others in eager.
- ``"auto"``: ``cpu_kernel`` on CPU (``chunked`` where it cannot be compiled); ``triton`` on CUDA
  (``chunked`` where triton is not installed); ``fused`` on other devices (MPS, XPU).

Content-only attention (no tables) always goes through ``scaled_dot_product_attention``. The backends are
looked up by name in :mod:`.registry`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import content_attention
from .registry import Backend, get_backend, resolve_backend
from .tables import relative_offsets_index


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor | None, rel_w: Tensor | None) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.dim() != 5 or v.shape[:4] != q.shape[:4]:
        raise ValueError(
            "q, k must be [B, Nh, H, W, dkh] and v [B, Nh, H, W, dvh]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together or not at all")
    if rel_h is not None:
        h, w, dkh = q.shape[2], q.shape[3], q.shape[4]
        if tuple(rel_h.shape) != (2 * h - 1, dkh) or tuple(rel_w.shape) != (2 * w - 1, dkh):
            raise ValueError(
                f"rel_h must be [2H-1, dkh] = [{2 * h - 1}, {dkh}] and rel_w [2W-1, dkh] = [{2 * w - 1}, {dkh}]; "
                f"got rel_h {tuple(rel_h.shape)}, rel_w {tuple(rel_w.shape)}"
            )


def relative_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> Tensor:
    """Multi-head 2-D attention with optional relative position logits.

    q, k: [B, Nh, H, W, dkh] (q unscaled); v: [B, Nh, H, W, dvh]; rel_h: [2H-1, dkh];
    rel_w: [2W-1, dkh] (both or neither). Returns [B, Nh, H, W, dvh] =
    softmax((q.k + S_H + S_W) / sqrt(dkh)) v over all HW keys. ``backend``: see the module doc.
    """
    _check_inputs(q, k, v, rel_h, rel_w)
    if q.shape[0] == 0:  # an empty batch: an empty output from every backend, still in the autograd graph
        tables = [t.sum() for t in (rel_h, rel_w) if t is not None]
        return v + 0 * sum(tables, q.sum() + k.sum())
    backend = resolve_backend(backend, q.device)
    if rel_h is None and backend != "reference":
        return content_attention(q, k, v)
    return get_backend(backend).run(q, k, v, rel_h, rel_w)


def attention_probabilities(
    q: Tensor, k: Tensor, rel_h: Tensor | None, rel_w: Tensor | None, query_index: Tensor
) -> Tensor:
    """Attention probabilities of a few queries over all keys, without the full (HW)^2 map.

    q, k: [B, Nh, H, W, dkh]; rel_h/rel_w as in :func:`relative_attention_2d`; query_index: [nq]
    flat indices i = iy * W + ix. Returns [B, Nh, nq, H, W], each [H, W] map summing to 1.
    Cost O(nq HW dkh): the same logits the attention uses, recomputed for the chosen rows only.
    """
    b, nh, h, w, dkh = q.shape
    q_sel = q.reshape(b, nh, h * w, dkh)[:, :, query_index] * dkh**-0.5  # [B, Nh, nq, dkh]
    logits = torch.einsum("bnqd,bnkd->bnqk", q_sel, k.reshape(b, nh, h * w, dkh)).reshape(b, nh, -1, h, w)
    if rel_h is not None:
        iy, ix = query_index // w, query_index % w
        r_w = rel_w.to(q.dtype)[relative_offsets_index(w, q.device)[ix]]  # [nq, W(jx), d]
        r_h = rel_h.to(q.dtype)[relative_offsets_index(h, q.device)[iy]]  # [nq, H(jy), d]
        logits = logits + torch.einsum("bnqd,qjd->bnqj", q_sel, r_w)[:, :, :, None, :]
        logits = logits + torch.einsum("bnqd,qjd->bnqj", q_sel, r_h)[:, :, :, :, None]
    return torch.softmax(logits.reshape(b, nh, -1, h * w).float(), dim=-1).reshape(b, nh, -1, h, w)
