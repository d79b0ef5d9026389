"""``backend="triton"``: 2-D relative attention as FlashAttention-2-style Triton kernels (CUDA).

The kernels (:mod:`.kernels`) compute the relative logits per block of queries from
``q . rel_w`` and ``q . rel_h`` and add them by key column and key row, so nothing of size (HW)^2
is ever materialized; forward saves the log-sum-exp, backward recomputes the probabilities in a
dq pass and a dk/dv pass (no atomics, so the result is deterministic). The dq pass also returns
the gradients of the per-query relative logits summed over key rows ([L, W]) and key columns
([L, H]); the last, cheap step of the chain rule to q, rel_h and rel_w runs in torch.

Block sizes are chosen per kernel, input dtype and GPU target (:func:`block_sizes`, from the kernels
compiled for sm_75 ... sm_120 without a GPU). A launch the GPU refuses (out of resources) computes
the op with the chunked backend instead (:mod:`.fallback`), inside the op, so it holds under
``torch.compile`` too.

Both kernels are wrapped as torch custom ops (``aa_lightning::triton_relative_attention`` and its
backward), with fake implementations and autograd, so ``torch.compile`` sees one opaque node.
triton is imported lazily by :mod:`.backend`; with ``TRITON_INTERPRET=1`` set before
:mod:`.kernels` is imported the same kernels run on CPU tensors (the tests do this, with
:func:`aa_lightning.compat.triton.patch_interpreter_bfloat16_dot`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from aa_lightning.attention.tables import relative_offsets_index

from . import fallback
from . import kernels as triton_kernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = ("_fwd", "_bwd_dq", "_bwd_dkdv")
_BLOCK_N = 64  # keys per block
_MAX_WP = 32  # columns per key block: W padded to a power of two, or 32-column chunks of wider rows
_MAX_ROWS = 4  # grid rows per key block (more spill in the bias loops at W <= 8)
# Per-target exceptions to the sm_80 / sm_90 choices, from the spills of the kernels compiled for
# each target (benchmarks/triton_compile_report.py; docs/benchmarks/gpu_compile.md):
_DKDV_8_WARPS = (75, 86, 89)  # the 16-bit dk/dv pass: 8 warps here (4 spill, up to 932 bytes on sm_75), else 4
_DKDV_HALF_QUERIES = (120,)  # the 16-bit dk/dv pass at padded head dims of 16: 32 queries (64 spill 24 bytes)
_DKDV_WIDE_8_WARPS = (100,)  # the 16-bit dk/dv pass, 32 columns at padded head dim 32: 8 warps (4 spill 12 bytes)
_FWD_4_WARPS = (100,)  # the 16-bit forward: 4 warps on sm_100 (8 spill 20 bytes at 14 x 14, dkh 6)
_HALF_KEY_BLOCKS = (75,)  # forward and dq pass: 32-key blocks on sm_75 (64 spill, up to 284 bytes)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Blocks:
    """Static launch parameters of one kernel for one (H, W, dkh, dvh, dtype, target): queries per
    program (per step in the dk/dv pass), the columns WP and grid rows R of a key block
    (BLOCK_N = R * WP keys), padded head dims, warps."""

    block_m: int
    wp: int
    rows: int
    dp: int
    dvp: int
    num_warps: int

    @property
    def block_n(self) -> int:
        return self.rows * self.wp

    def column_chunks(self, w: int) -> int:
        return -(-w // self.wp)


def _warps(kernel: str, dtype: torch.dtype, capability: int | None, blocks: Blocks) -> int:
    """8 warps (4 spill in the dq pass; float32's exact products spill far more with 4), except for
    16-bit inputs: the dk/dv pass (but on sm_75 / sm_86 / sm_89, and on sm_100 for 32-column key
    blocks at padded head dim 32) and the sm_100 forward take 4 (with 8, ptxas caps them at 128
    registers and spills)."""
    if dtype == torch.float32:
        return 8
    if kernel == "_bwd_dkdv" and capability not in _DKDV_8_WARPS:
        return 8 if capability in _DKDV_WIDE_8_WARPS and blocks.wp == 32 and blocks.dp == 32 else 4
    if kernel == "_fwd" and capability in _FWD_4_WARPS:
        return 4
    return 8


def block_sizes(
    h: int,
    w: int,
    dkh: int,
    dvh: int,
    kernel: str = "_fwd",
    dtype: torch.dtype = torch.bfloat16,
    capability: int | None = None,
) -> Blocks:
    """Block sizes of ``kernel`` (one of :data:`KERNELS`) for ``dtype`` inputs on a GPU of compute
    capability ``capability`` (75 = sm_75 ... 120 = sm_120; None: unknown, the sm_80 / sm_90 choices),
    chosen from static facts (registers, spills and shared memory of the kernels compiled for each
    target: ``benchmarks/triton_compile_report.py``); a GPU autotune may refine them later.

    A key block is R grid rows x WP columns: W padded to a power of two up to 32 columns (wider
    rows are split into 32-column chunks; 64 spill registers in the dq pass), then as many rows as
    fill 64 keys (32 for the forward and dq pass on sm_75), at most 4 (at least 16 keys, the
    smallest ``tl.dot`` operand). Head dims are padded to powers of two >= 16. 64 queries per
    program for padded head dims of 16, else 32 (the q / dq tiles grow; at 32 the sm_80 dq pass
    spills with 64; 32 for the 16-bit dk/dv pass on sm_120). Warps: :func:`_warps`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    wp = min(_next_pow2(w), _MAX_WP)
    keys = _BLOCK_N // 2 if capability in _HALF_KEY_BLOCKS and kernel != "_bwd_dkdv" else _BLOCK_N
    block_n = max(wp, min(keys, wp * _next_pow2(h), wp * _MAX_ROWS), 16)
    dp, dvp = max(16, _next_pow2(dkh)), max(16, _next_pow2(dvh))
    block_m = max(16, min(64 if max(dp, dvp) <= 16 else 32, _next_pow2(h * w)))
    if kernel == "_bwd_dkdv" and dtype != torch.float32 and capability in _DKDV_HALF_QUERIES and block_m == 64:
        block_m = 32
    blocks = Blocks(block_m, wp, block_n // wp, dp, dvp, num_warps=8)
    return dataclasses.replace(blocks, num_warps=_warps(kernel, dtype, capability, blocks))


def kernel_constants(blocks: Blocks, w: int, dtype: torch.dtype) -> dict:
    """The kernels' constexpr arguments for ``blocks``, grid width ``w`` and input ``dtype``."""
    return dict(
        DP=blocks.dp,
        DVP=blocks.dvp,
        WP=blocks.wp,
        R=blocks.rows,
        BLOCK_M=blocks.block_m,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",  # exact float32 products, no TF32
        CHUNKED=blocks.column_chunks(w) > 1,
    )


def _check(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> None:
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"the Triton attention kernels take q, k, v of one dtype among {DTYPES}; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    interpreted = not isinstance(triton_kernels._fwd, triton_kernels.triton.JITFunction)
    if q.device.type != "cuda" and not interpreted:
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors; got {q.device.type} "
            "(TRITON_INTERPRET=1 runs the kernels on CPU for testing)"
        )


def capability(device: torch.device) -> int | None:
    """The compute capability of a CUDA ``device`` as 10 * major + minor (None elsewhere: the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _launch(kernel: str, q: Tensor, v: Tensor, *args: Tensor) -> None:
    """Launch ``kernel`` over q's grid with its block sizes for q's shape, dtype and GPU; ``args``
    are the kernel's tensors, the sizes (H, W, D, DV, L) follow from q and v."""
    batch_heads, h, w, d = q.shape
    dv = v.shape[3]
    blocks = block_sizes(h, w, d, dv, kernel, q.dtype, capability(q.device))
    if kernel == "_bwd_dkdv":  # one program per key block (grid rows x column chunk)
        programs = -(-h // blocks.rows) * blocks.column_chunks(w)
    else:  # one program per query block
        programs = -(-h * w // blocks.block_m)
    getattr(triton_kernels, kernel)[(programs, batch_heads)](
        *args, h, w, d, dv, h * w, **kernel_constants(blocks, w, q.dtype), num_warps=blocks.num_warps
    )


@torch.library.custom_op("aa_lightning::triton_relative_attention", mutates_args=())
def triton_relative_attention_op(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor
) -> tuple[Tensor, Tensor]:
    """q, k: [BH, H, W, D] (q scaled); v: [BH, H, W, DV]; rel_h [2H-1, D]; rel_w [2W-1, D].
    Returns (out [BH, H, W, DV] in q's dtype, float32 log-sum-exp of each logits row [BH, H, W]).
    A launch the GPU refuses falls back to the chunked backend (:mod:`.fallback`)."""
    _check(q, k, v, rel_h, rel_w)
    batch_heads, h, w, d = q.shape
    dv = v.shape[3]
    q, k, v, rel_h, rel_w = (t.contiguous() for t in (q, k, v, rel_h, rel_w))
    if fallback.refused(q, v):
        return fallback.forward(q, k, v, rel_h, rel_w)
    out = q.new_empty(batch_heads, h, w, dv)
    lse = q.new_empty(batch_heads, h, w, dtype=torch.float32)
    try:
        _launch("_fwd", q, v, q, k, v, rel_h, rel_w, out, lse)
    except (triton.OutOfResources, RuntimeError) as error:
        if not fallback.is_refusal(error):
            raise
        fallback.refuse(q, v, "_fwd", error)
        return fallback.forward(q, k, v, rel_h, rel_w)
    return out, lse


@triton_relative_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(*q.shape[:3], v.shape[3]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("aa_lightning::triton_relative_attention_backward", mutates_args=())
def triton_relative_attention_backward_op(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """float32 (dq through the content logits, dk, dv, grad_bias_w [BH, H, W, W], grad_bias_h
    [BH, H, W, H]): the gradients of the per-query relative logits q . rel_w (by key column) and
    q . rel_h (by key row)."""
    _check(q, k, v, rel_h, rel_w)
    batch_heads, h, w, d = q.shape
    q, k, v, rel_h, rel_w, lse = (t.contiguous() for t in (q, k, v, rel_h, rel_w, lse))
    grad_out = grad_out.to(q.dtype).contiguous()
    if fallback.refused(q, v):
        return fallback.backward(q, k, v, rel_h, rel_w, grad_out)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # D_i = dO_i . O_i
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32), torch.empty(v.shape, **f32)
    grad_bw, grad_bh = torch.empty(batch_heads, h, w, w, **f32), torch.empty(batch_heads, h, w, h, **f32)
    inputs = (q, k, v, rel_h, rel_w, grad_out, lse, delta)
    for kernel, outputs in (("_bwd_dq", (dq, grad_bw, grad_bh)), ("_bwd_dkdv", (dk, dv))):
        try:
            _launch(kernel, q, v, *inputs, *outputs)
        except (triton.OutOfResources, RuntimeError) as error:
            if not fallback.is_refusal(error):
                raise
            fallback.refuse(q, v, kernel, error)
            return fallback.backward(q, k, v, rel_h, rel_w, grad_out)
    return dq, dk, dv, grad_bw, grad_bh


@triton_relative_attention_backward_op.register_fake
def _(q, k, v, rel_h, rel_w, out, lse, grad_out):
    f32 = dict(dtype=torch.float32)
    b, h, w = q.shape[:3]
    return (
        q.new_empty(q.shape, **f32),
        q.new_empty(k.shape, **f32),
        q.new_empty(v.shape, **f32),
        q.new_empty(b, h, w, w, **f32),
        q.new_empty(b, h, w, h, **f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    """The kernels' gradients, then the chain rule through bias_w[i, jx] = q_i . rel_w[jx - ix + W - 1]
    and bias_h[i, jy] = q_i . rel_h[jy - iy + H - 1] in O(HW (H + W) d) torch ops."""
    q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
    dq, dk, dv, grad_bw, grad_bh = triton_relative_attention_backward_op(q, k, v, rel_h, rel_w, out, lse, grad_out)
    h, w, d = q.shape[1], q.shape[2], q.shape[3]
    index_w, index_h = relative_offsets_index(w, q.device), relative_offsets_index(h, q.device)
    q32 = q.float()
    dq = dq + torch.einsum("byxj,xjd->byxd", grad_bw, rel_w.float()[index_w])
    dq = dq + torch.einsum("byxj,yjd->byxd", grad_bh, rel_h.float()[index_h])
    grad_rel_w = q32.new_zeros(2 * w - 1, d).index_add_(
        0, index_w.reshape(-1), torch.einsum("byxj,byxd->xjd", grad_bw, q32).reshape(-1, d)
    )
    grad_rel_h = q32.new_zeros(2 * h - 1, d).index_add_(
        0, index_h.reshape(-1), torch.einsum("byxj,byxd->yjd", grad_bh, q32).reshape(-1, d)
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_rel_h.to(rel_h.dtype), grad_rel_w.to(rel_w.dtype)


triton_relative_attention_op.register_autograd(_backward, setup_context=_setup_context)


def triton_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """softmax_j(q_i . (k_j + rel_w[jx - ix + W - 1] + rel_h[jy - iy + H - 1])) v_j with the Triton kernels.

    q, k: [BH, H, W, dkh] (q already scaled); v: [BH, H, W, dvh], one dtype of :data:`DTYPES`;
    rel_h: [2H-1, dkh]; rel_w: [2W-1, dkh] (any float dtype). Returns [BH, H, W, dvh] in q's dtype.
    """
    return triton_relative_attention_op(q, k, v, rel_h, rel_w)[0]
