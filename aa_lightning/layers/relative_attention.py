"""2-D relative self-attention, the functional core of AAConv (Bello et al., Section 3.1-3.2).

    O_h = softmax((Q_h K_h^T + S_H + S_W) / sqrt(dkh)) V_h
    S_W[i, j] = q_i . r^W[jx - ix + W - 1],   S_H[i, j] = q_i . r^H[jy - iy + H - 1]

over the HW positions of a row-major flattened map (i = iy * W + ix). Every backend computes the
same function; they differ in speed and memory:

- ``"reference"``: the paper's appendix algorithm, explicit (HW)x(HW) logits (ground truth).
- ``"chunked"``: S_W and S_H are factorized as per-query tables ``q_i . r^W`` [HW, W] and
  ``q_i . r^H`` [HW, H]; attention runs in query chunks with a recomputing backward
  (:mod:`.chunked_attention`). O(HW (H + W)) memory beyond one chunk; plain torch ops.
- ``"cpu_kernel"``: the same factorization in small C kernels compiled on first use
  (:mod:`.cpu_kernel`): a few query rows at a time in cache, the (HW)^2 logits never written
  to memory, a recomputing backward from the saved log-sum-exp; in float32 the tables are
  computed inside the kernel, built per head-dim pair. CPU only; computes in float32 (float64
  for float64 inputs). The CPU default when a C compiler is available.
- ``"triton"``: the same factorization in FlashAttention-2-style Triton kernels
  (:mod:`.triton_attention`): the relative logits computed per block of queries inside the
  kernel, online softmax, a recomputing backward; nothing of size (HW)^2 in memory. CUDA;
  float32 / bfloat16 / float16 (other dtypes compute in float32). The CUDA default.
- ``"fused"``: the relative terms fold into an augmented dot product
  ``q'_i = [q_i, q_i . r^W[x - ix + W - 1] (x < W), q_i . r^H[y - iy + H - 1] (y < H)]``,
  ``k'_j = [k_j, onehot_W(jx), onehot_H(jy)]`` so ``q'_i . k'_j = q_i . k_j + S_W + S_H``, run by
  torch's ``scaled_dot_product_attention`` (v zero-padded to the augmented width). Plain torch
  ops on any device, so it exports to ONNX (:mod:`aa_lightning.export`); it costs dkh + H + W
  multiply-adds per logit, and above head dim 256 SDPA falls back to its (HW)^2 math path.
- ``"auto"``: ``cpu_kernel`` on CPU (``chunked`` where it cannot be compiled); ``triton`` on CUDA
  (``chunked`` where triton is not installed); ``fused`` on other devices (MPS, XPU).

Content-only attention (no tables) always goes through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernel
from .chunked_attention import factorized_bias_attention
from .relative_attention_reference import relative_attention_reference

Backend = Literal["auto", "reference", "chunked", "cpu_kernel", "triton", "fused"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "cpu_kernel", "triton", "fused")


@torch.compiler.assume_constant_result  # compile/export: decided once at trace time, no graph break
def _cpu_kernel_available() -> bool:
    return cpu_kernel.available()


@torch.compiler.assume_constant_result  # the same for the per-head-dims float32 kernel's build
def _tiled_kernel_builds(dtype: torch.dtype, dkh: int, dvh: int) -> bool:
    return cpu_kernel.tiled_builds(dtype, dkh, dvh)


@torch.compiler.assume_constant_result  # decided once at trace time
def _triton_available() -> bool:
    """Whether triton can be imported (it comes with torch's Linux CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def _use_tiled_kernel(dtype: torch.dtype, dkh: int, dvh: int, positions: int) -> bool:
    """cpu_kernel.use_tiled, split so that compile sees a guard on the (possibly symbolic) grid
    size and a constant for the build."""
    return cpu_kernel.tiled_fits(dkh, positions) and _tiled_kernel_builds(dtype, dkh, dvh)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``"auto"`` stands for on ``device`` (others pass through)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "cpu_kernel" and device.type != "cpu":
        raise ValueError(f"backend 'cpu_kernel' runs on CPU tensors only; got {device.type} (use 'auto' or 'fused')")
    if backend == "triton" and not _triton_available():
        raise ValueError(
            "backend 'triton' needs the triton package (it comes with torch's Linux CUDA wheels); "
            "use 'auto' or 'chunked'"
        )
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton" if _triton_available() else "chunked"
    if device.type != "cpu":
        return "fused"
    return "cpu_kernel" if _cpu_kernel_available() else "chunked"


def relative_offsets_index(size: int, device: torch.device | None = None) -> Tensor:
    """[size, size] long tensor idx[i, j] = j - i + size - 1: the table row of offset j - i."""
    pos = torch.arange(size, device=device)
    return pos[None, :] - pos[:, None] + (size - 1)


def relative_logit_tables(q: Tensor, rel_h: Tensor, rel_w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-query relative logits, factorized by key column and key row.

    q: [B, Nh, H, W, d]; rel_h: [2H-1, d]; rel_w: [2W-1, d].
    Returns (s_w, s_h): s_w[b, n, iy, ix, jx] = q . rel_w[jx - ix + W - 1]  -> [B, Nh, H, W, W]
                        s_h[b, n, iy, ix, jy] = q . rel_h[jy - iy + H - 1]  -> [B, Nh, H, W, H]
    so that S_W[i, j] = s_w[i, jx] and S_H[i, j] = s_h[i, jy]. Cost O(HW (H + W) d).
    """
    h, w = q.shape[2], q.shape[3]
    r_w = rel_w.to(q.dtype)[relative_offsets_index(w, q.device)]  # [W(ix), W(jx), d]
    r_h = rel_h.to(q.dtype)[relative_offsets_index(h, q.device)]  # [H(iy), H(jy), d]
    s_w = torch.einsum("bnyxd,xjd->bnyxj", q, r_w)
    s_h = torch.einsum("bnyxd,yjd->bnyxj", q, r_h)
    return s_w, s_h


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


def _content_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, nh, h, w, dkh = q.shape
    flat = lambda t: t.reshape(b, nh, h * w, t.shape[-1])  # noqa: E731
    out = _sdpa_equal_dims(flat(q), flat(k), flat(v), scale=dkh**-0.5)
    return out.reshape(b, nh, h, w, -1)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    b, nh, h, w, dkh = q.shape
    s_w, s_h = relative_logit_tables(q, rel_h, rel_w)
    q_aug = torch.cat([q, s_w, s_h], dim=-1).reshape(b, nh, h * w, dkh + w + h)
    onehot_w = torch.eye(w, dtype=k.dtype, device=k.device).expand(h, w, w)  # [jy, jx, W]
    onehot_h = torch.eye(h, dtype=k.dtype, device=k.device)[:, None, :].expand(h, w, h)  # [jy, jx, H]
    k_aug = torch.cat([k, torch.cat([onehot_w, onehot_h], dim=-1).expand(b, nh, h, w, w + h)], dim=-1)
    out = _sdpa_equal_dims(q_aug, k_aug.reshape(b, nh, h * w, dkh + w + h), v.reshape(b, nh, h * w, -1), dkh**-0.5)
    return out.reshape(b, nh, h, w, -1)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _factorized_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, kernel: bool) -> Tensor:
    """The chunked and cpu_kernel backends: per-query tables, then the factorized-bias attention.
    Computes in the autocast dtype (else q's); the kernel in float32 unless that is float64."""
    b, nh, h, w, dkh = q.shape
    device_type = q.device.type
    out_dtype = _autocast_dtype(device_type) or q.dtype
    dtype = out_dtype if not kernel or out_dtype in cpu_kernel.DTYPES else torch.float32
    with torch.autocast(device_type, enabled=False):
        if kernel and _use_tiled_kernel(dtype, dkh, v.shape[-1], h * w):
            # tables computed in the kernel; q, k, v read as they are (scaled, cast and laid out in one pass each)
            q, k, v = (t if t.dtype in cpu_kernel.TILED_READS else t.to(dtype) for t in (q, k, v))
            out = cpu_kernel.cpu_kernel_relative_attention(q, k, v, rel_h.to(dtype), rel_w.to(dtype), scale=dkh**-0.5)
            return out.to(out_dtype)
        q = q.to(dtype) * dkh**-0.5
        k, v = k.to(dtype), v.to(dtype)
        bh, length = b * nh, h * w
        s_w, s_h = relative_logit_tables(q, rel_h.to(dtype), rel_w.to(dtype))
        attention = cpu_kernel.cpu_kernel_attention if kernel else factorized_bias_attention
        out = attention(
            q.reshape(bh, length, dkh),
            k.reshape(bh, length, dkh),
            v.reshape(bh, length, -1),
            s_w.reshape(bh, length, w),
            s_h.reshape(bh, length, h),
        )
    return out.to(out_dtype).reshape(b, nh, h, w, -1)


def _triton_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """The triton backend: computes in the autocast dtype (else q's), float32 for other dtypes."""
    from . import triton_attention  # imports triton: only when this backend runs

    b, nh, h, w, dkh = q.shape
    out_dtype = _autocast_dtype(q.device.type) or q.dtype
    dtype = out_dtype if out_dtype in triton_attention.DTYPES else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        grid = lambda t: t.to(dtype).reshape(b * nh, h, w, t.shape[-1])  # noqa: E731
        out = triton_attention.triton_relative_attention(grid(q) * dkh**-0.5, grid(k), grid(v), rel_h, rel_w)
    return out.to(out_dtype).reshape(b, nh, h, w, -1)


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
    if backend == "reference":
        return relative_attention_reference(q, k, v, rel_h, rel_w)
    if rel_h is None:
        return _content_attention(q, k, v)
    if backend in ("chunked", "cpu_kernel"):
        return _factorized_attention(q, k, v, rel_h, rel_w, kernel=backend == "cpu_kernel")
    if backend == "triton":
        return _triton_attention(q, k, v, rel_h, rel_w)
    return _fused_attention(q, k, v, rel_h, rel_w)


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
