"""Compiled CPU kernels for 2-D relative attention: a few query rows at a time, in cache.

    logits[i, j] = q_i . k_j + bias_w[i, jx] + bias_h[i, jy]        j = jy * W + jx
    bias_w[i, jx] = q_i . rel_w[jx - ix + W - 1],  bias_h[i, jy] = q_i . rel_h[jy - iy + H - 1]
    out_i = sum_j softmax_j(logits[i, :]) v_j

The same function as :mod:`aa_lightning.attention.chunked`, but each query row's logits live in scratch that
stays in the CPU's L1/L2 cache: the (HW)^2 logits are never written to memory, and the
exponentials, the bias, the q.k products (dkh multiply-adds) and P V run in SIMD loops.
Forward saves each row's log-sum-exp (O(HW) memory); backward recomputes the row's
probabilities from it and accumulates every gradient in one pass over the keys. Two C sources:

- ``factorized_attention_tiled.c``, the float32 path (:func:`cpu_kernel_relative_attention`,
  op ``aa_lightning::relative_attention``): built once per head-dim pair (dkh, dvh) with the
  dims as compile-time constants, so each key's vectors live in registers (16-float vectors
  where the CPU has AVX-512 and grid rows are wider than 8, else 8-float ones); logits in base 2
  (log2(e) folded into q), so the softmax's exponential is a cheap 2^x; four query rows share
  every key load and gradient store; the bias rows are computed from q, rel_w and rel_h
  inside the kernel (no [BH, HW, W + H] table tensors to build, copy and differentiate).
- ``factorized_attention.c`` (:func:`cpu_kernel_attention`, op
  ``aa_lightning::factorized_attention``): any dims, float32 and float64, on precomputed
  tables; used for float64 (tests, gradcheck) and for float32 where the per-dims build fails.

Each is compiled on first use (:mod:`.build`) with the system C compiler (``$CC``, else ``cc``; well under a
second per build) into ``$AA_LIGHTNING_CACHE/kernels`` (default ``~/.cache/aa_lightning``; created
with mode 0700), keyed by a hash of the source, the flags, the compiler and the CPU's features,
and loaded with ctypes -- only from a folder and a file that belong to this user and are not
group/world-writable (anything else is refused: the chunked backend runs, with a warning). A
failed build leaves a ``.failed`` file under the same key, so that DDP processes and later runs
do not retry it. The work is split
into ``torch.get_num_threads()`` ranges of whole (batch, head) slices, run on OpenMP threads:
built with ``-fopenmp``, the library resolves ``libgomp.so.1`` to the copy torch has already
loaded, so the kernel shares torch's thread pool instead of fighting its spinning workers for
the cores (where no OpenMP build works, Python threads run the ranges; ctypes releases the
GIL). Each slice is one thread's, so the result does not depend on the split. No compiler, or
``AA_LIGHTNING_CPU_KERNEL=0``: :func:`.build.available` is False and ``backend="auto"`` uses
``chunked``. Both ops are torch custom ops (with fake implementations and autograd), so
``torch.compile``, ``torch.export`` and fx see one opaque node, not a graph break.

float32 (a vectorized exp within ~2 ulp) and float64 (libm's exp). bfloat16 q, k, v (what bf16
autocast hands the op) run the build whose exp is a degree-3 polynomial (relative error 1.02e-4,
1/38 of bfloat16's rounding 2^-8, :data:`.build.BF16_EXP_DEGREE`); the products stay float32.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from . import build

_TILED_BEST_DKH, _TILED_ANY_DKH_POSITIONS = build._TILED_MAX_DIM, 196  # where the tiled kernel wins: see tiled_fits
DTYPES = (torch.float32, torch.float64)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aa_attention")


def _parts(batch_heads: int) -> int:
    """How many ranges the BH slices are split into: one per torch thread, at most one per slice."""
    return max(1, min(torch.get_num_threads(), batch_heads))


def _in_parallel(lib: ctypes.CDLL, batch_heads: int, call: Callable[[int, int, int, int], None]) -> None:
    """Run the kernel over the BH slices split into :func:`_parts` ranges through
    ``call(first, end, parts, part0)`` (ranges ``part0 .. part0 + parts - 1`` of the split, with
    their scratch): one call that runs all the ranges on OpenMP threads, or, without OpenMP, one
    call per range on Python threads."""
    parts = _parts(batch_heads)
    if parts == 1 or lib.aa_openmp():
        call(0, batch_heads, parts, 0)
        return
    bounds = [batch_heads * t // parts for t in range(parts + 1)]
    list(_pool(parts).map(lambda t: call(bounds[t], bounds[t + 1], 1, t), range(parts)))


def _pointers(tensors: list[Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _suffix(dtype: torch.dtype) -> str:
    if dtype not in DTYPES:
        raise TypeError(f"the CPU attention kernel takes float32 or float64, got {dtype}")
    return "f32" if dtype == torch.float32 else "f64"


# ---- The generic kernel, on precomputed bias tables -------------------------------------------
# Layouts: q [BH, L, D], kT [BH, D, L], vT [BH, DV, L], bias_w [BH, L, W], bias_h [BH, L, H].


def _kernel_layout(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> list[Tensor]:
    if len({t.dtype for t in (q, k, v, bias_w, bias_h)}) > 1:
        raise TypeError(
            "the CPU attention kernel takes tensors of one dtype, got "
            f"{[str(t.dtype) for t in (q, k, v, bias_w, bias_h)]}"
        )
    return [
        q.contiguous(),
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        bias_w.contiguous(),
        bias_h.contiguous(),
    ]


def _run_kernel(direction: str, tensors: list[Tensor], scratch_rows: int) -> None:
    """``aa_<direction>_<dtype>`` over all BH slices; ``tensors`` start with :func:`_kernel_layout`'s."""
    lib = build._library()
    if lib is None:
        raise RuntimeError("the aa_lightning CPU attention kernel is not available (no C compiler?)")
    q, kt, vt, bias_w, bias_h = tensors[:5]
    (batch_heads, length, d), dv, w, h = q.shape, vt.shape[1], bias_w.shape[2], bias_h.shape[2]
    function, pointers = getattr(lib, f"aa_{direction}_{_suffix(q.dtype)}"), _pointers(tensors)
    stride = scratch_rows * length
    scratch = torch.empty(_parts(batch_heads), stride, dtype=q.dtype)
    _in_parallel(
        lib,
        batch_heads,
        lambda first, end, parts, part0: function(
            *pointers, first, end, length, h, w, d, dv, parts, scratch[part0].data_ptr(), stride
        ),
    )


@torch.library.custom_op("aa_lightning::factorized_attention", mutates_args=(), device_types="cpu")
def factorized_attention_op(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> tuple[Tensor, Tensor]:
    """q, k: [BH, L, D] (q scaled); v: [BH, L, DV]; bias_w [BH, L, W]; bias_h [BH, L, H].
    Returns (out [BH, L, DV], log-sum-exp of each logits row [BH, L])."""
    q, kt, vt, bias_w, bias_h = _kernel_layout(q, k, v, bias_w, bias_h)
    out = q.new_empty(q.shape[0], q.shape[1], vt.shape[1])
    lse = q.new_empty(q.shape[0], q.shape[1])
    _run_kernel("forward", [q, kt, vt, bias_w, bias_h, out, lse], scratch_rows=1)
    return out, lse


@factorized_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1])


@torch.library.custom_op("aa_lightning::factorized_attention_backward", mutates_args=(), device_types="cpu")
def factorized_attention_backward_op(
    q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (q, k, v, bias_w, bias_h) of :func:`factorized_attention_op`'s ``out``."""
    q, kt, vt, bias_w, bias_h = _kernel_layout(q, k, v, bias_w, bias_h)
    out, lse, grad_out = out.contiguous(), lse.contiguous(), grad_out.contiguous()
    grad_q, grad_kt, grad_vt, grad_bw, grad_bh = (t.new_empty(t.shape) for t in (q, kt, vt, bias_w, bias_h))
    _run_kernel(
        "backward",
        [q, kt, vt, bias_w, bias_h, out, lse, grad_out, grad_q, grad_kt, grad_vt, grad_bw, grad_bh],
        scratch_rows=2,
    )
    return grad_q, grad_kt.transpose(1, 2).contiguous(), grad_vt.transpose(1, 2).contiguous(), grad_bw, grad_bh


@factorized_attention_backward_op.register_fake
def _(q, k, v, bias_w, bias_h, out, lse, grad_out):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, bias_w, bias_h))  # contiguous, as the real op's


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, bias_w, bias_h, out, lse = ctx.saved_tensors
    return factorized_attention_backward_op(q, k, v, bias_w, bias_h, out, lse, grad_out)


factorized_attention_op.register_autograd(_backward, setup_context=_setup_context)


def cpu_kernel_attention(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> Tensor:
    """softmax_j(q_i . k_j + bias_w[i, jx] + bias_h[i, jy]) v_j with the generic compiled kernel.

    q, k: [BH, L, d] (q already scaled); v: [BH, L, dv]; bias_w: [BH, L, W]; bias_h: [BH, L, H];
    L = H * W row-major. Returns [BH, L, dv]. The log-sum-exp output carries no gradient.
    """
    return factorized_attention_op(q, k, v, bias_w, bias_h)[0]


# ---- The tiled float32 kernel, with the relative tables computed inside -------------------------
# The kernel's layouts, made by _tiled_inputs from the op's [B, Nh, H, W, d] inputs: q [BH, H, W, D]
# (scaled); kT [BH, D, Ls], vT [BH, DV, Ls]: each row the H x Wp key grid (its rows padded to Wp, a
# multiple of the vector width, 8 or 16, columns; the kernel gives those probability 0), then
# padding to the kernel's row stride Ls; all padding zero. rel_w [2W-1, D], rel_h [2H-1, D].


def tiled_fits(dkh: int, positions: int) -> bool:
    """Whether the tiled kernel beats the generic one for this head dim on a grid of ``positions``.

    It keeps 4 query rows x dkh products per key vector in registers; from dkh 9 its backward
    splits the per-key work into passes with few live vectors (see the C source), so that it
    wins at every head dim it is built for, large grids included. The thresholds come from
    ``benchmarks/kernel_benchmark.py`` (measurements in docs/benchmarks.md, "Which float32
    kernel runs"). Plain arithmetic, so torch.compile with dynamic shapes turns it into a guard."""
    return dkh <= _TILED_BEST_DKH or positions <= _TILED_ANY_DKH_POSITIONS


def tiled_builds(dtype: torch.dtype, dkh: int, dvh: int) -> bool:
    """Whether the tiled kernel can run these inputs: float32, and its build for (dkh, dvh)
    succeeds here (the first call per pair compiles it)."""
    return dtype == torch.float32 and build._tiled_library(dkh, dvh) is not None


def use_tiled(dtype: torch.dtype, dkh: int, dvh: int, positions: int) -> bool:
    """Whether ``backend="cpu_kernel"`` runs :func:`cpu_kernel_relative_attention` for these
    inputs (:func:`tiled_fits` and :func:`tiled_builds`); otherwise the generic kernel runs."""
    return tiled_fits(dkh, positions) and tiled_builds(dtype, dkh, dvh)


def _padded_width(w: int, vw: int = 8) -> int:
    return -(-w // vw) * vw


def _to_rows(t: Tensor, row_stride: int, vw: int) -> Tensor:
    """[B, Nh, H, W, C] (any strides, any float dtype) -> float32 [B Nh, C, row_stride]: each
    channel's H x Wp grid, zero-padded. One copy (that also casts); only the padding is zeroed
    (the columns W..Wp of each grid row, and the tail after the grid)."""
    b, nh, h, w, c = t.shape
    wp = _padded_width(w, vw)
    rows = t.new_empty(b * nh, c, row_stride, dtype=torch.float32)
    grid = rows[:, :, : h * wp].view(b, nh, c, h, wp)
    grid[..., :w].copy_(t.permute(0, 1, 4, 2, 3))
    if wp > w:
        grid[..., w:].zero_()
    rows[:, :, h * wp :].zero_()
    return rows


def _from_rows(t: Tensor, h: int, w: int, vw: int, dtype: torch.dtype) -> Tensor:
    """[B Nh, C, row_stride] -> [B Nh, C, H, W] in ``dtype`` (contiguous: one copy)."""
    wp = _padded_width(w, vw)
    return t[:, :, : h * wp].unflatten(2, (h, wp))[..., :w].to(dtype, copy=True)


def _run_tiled(lib: ctypes.CDLL, direction: str, tensors: list[Tensor]) -> None:
    """``aa_tiled_<direction>`` over all BH slices; ``tensors``: the kernel's array arguments in its order."""
    q, kt, vt = tensors[:3]  # q [BH, H, W, D], kt [BH, D, Ls], vt [BH, DV, Ls]
    (batch_heads, h, w, d), dv, wp = q.shape, vt.shape[1], _padded_width(q.shape[2], build._vector_width(lib))
    function, pointers = getattr(lib, f"aa_tiled_{direction}"), _pointers(tensors)
    zeros = q.new_zeros(wp + h + d + dv)
    stride = lib.aa_tiled_scratch(h, wp)
    scratch = torch.empty(_parts(batch_heads), stride, dtype=q.dtype)
    _in_parallel(
        lib,
        batch_heads,
        lambda first, end, parts, part0: function(
            *pointers, first, end, h, w, wp, zeros.data_ptr(), parts, scratch[part0].data_ptr(), stride
        ),
    )


TILED_READS = (torch.float32, torch.bfloat16, torch.float16)  # q, k, v dtypes the tiled op reads into float32


def _tiled_inputs(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float
) -> tuple[ctypes.CDLL, list[Tensor]]:
    """The library for these inputs and the kernel's first five arguments in its layouts: q scaled
    [B Nh, H, W, D], kT, vT, rel_w, rel_h; all float32, each made in one pass from the caller's
    tensors (any strides: the permuted views of the qkv convolution's output)."""
    tables_ok = rel_h.dtype == rel_w.dtype == torch.float32
    if not tables_ok or not all(t.dtype in TILED_READS for t in (q, k, v)):
        raise TypeError(
            "the tiled CPU attention kernel takes float32 tensors (q, k, v may also be bfloat16 or "
            f"float16); got {[str(t.dtype) for t in (q, k, v, rel_h, rel_w)]}"
        )
    b, nh, h, w, d = q.shape
    lib = build._tiled_library_for(d, v.shape[4], w, bf16=q.dtype == torch.bfloat16)
    if lib is None:
        raise RuntimeError(
            f"the tiled CPU attention kernel for dkh {d}, dvh {v.shape[4]} is not available "
            "(no C compiler, AA_LIGHTNING_CPU_KERNEL=0, or head dims above 64)"
        )
    vw = build._vector_width(lib)
    row_stride = lib.aa_tiled_row_stride(h, _padded_width(w, vw))
    scaled = q.new_empty(b * nh, h, w, d, dtype=torch.float32)
    if q.dtype == torch.float32:
        torch.mul(q, scale, out=scaled.view(q.shape))
    else:  # scaled in float32 (a mul into a float32 `out` would round q * scale to q's dtype first)
        scaled.view(q.shape).copy_(q)
        scaled.mul_(scale)
    rows = [_to_rows(k, row_stride, vw), _to_rows(v, row_stride, vw)]
    return lib, [scaled, *rows, rel_w.contiguous(), rel_h.contiguous()]


def _row_stride(h: int, wp: int) -> int:
    """``aa_tiled_row_stride`` of the C source, as plain arithmetic for the fake implementation
    (symbolic sizes under torch.compile); the real op checks that the two agree."""
    return h * wp + 16


def _layout_vector_width(d: int, dv: int, w: int, bf16: bool) -> int:
    """The vector width of the build :func:`_tiled_inputs` picks (fake implementation: no library in hand)."""
    lib = build._tiled_library_for(d, dv, w, bf16=bf16)
    return 8 if lib is None else build._vector_width(lib)


@torch.library.custom_op("aa_lightning::relative_attention", mutates_args=(), device_types="cpu")
def relative_attention_op(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q, k: [B, Nh, H, W, D] (unscaled: the logits use scale q); v: [B, Nh, H, W, DV]; any
    strides; float32, bfloat16 or float16 (computed in float32; bfloat16 with the short-polynomial
    exponential of the bfloat16 path, relative error <= 1.02e-4). rel_h [2H-1, D], rel_w [2W-1, D]:
    float32. Returns float32 (out [B, Nh, H, W, DV], log-sum-exp of each logits row [B, Nh, H, W],
    and the kernel's layouts of the inputs that backward reads instead of making them again:
    scale q [B Nh, H, W, D], kT [B Nh, D, Ls], vT [B Nh, DV, Ls])."""
    b, nh, h, w, d = q.shape
    out = q.new_empty(b, nh, h, w, v.shape[4], dtype=torch.float32)
    lse = q.new_empty(b, nh, h, w, dtype=torch.float32)
    lib, inputs = _tiled_inputs(q, k, v, rel_h, rel_w, scale)
    if inputs[1].shape[2] != _row_stride(h, _padded_width(w, build._vector_width(lib))):
        raise RuntimeError("ops._row_stride disagrees with the C source's aa_tiled_row_stride")
    _run_tiled(lib, "forward", [*inputs, out, lse])
    return out, lse, *inputs[:3]


@relative_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float):
    b, nh, h, w, d = q.shape
    dv = v.shape[4]
    vw = _layout_vector_width(d, dv, w, q.dtype == torch.bfloat16)
    stride = _row_stride(h, _padded_width(w, vw))
    return (
        q.new_empty(b, nh, h, w, dv, dtype=torch.float32),
        q.new_empty(b, nh, h, w, dtype=torch.float32),
        q.new_empty(b * nh, h, w, d, dtype=torch.float32),
        q.new_empty(b * nh, d, stride, dtype=torch.float32),
        q.new_empty(b * nh, dv, stride, dtype=torch.float32),
    )


@torch.library.custom_op("aa_lightning::relative_attention_backward", mutates_args=(), device_types="cpu")
def relative_attention_backward_op(
    scaled_q: Tensor,
    kt: Tensor,
    vt: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    scale: float,
    bf16: bool,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`relative_attention_op`'s ``out``, from its layouts (scaled_q, kt, vt; ``bf16``:
    the inputs were bfloat16, run that path's build): float32 q, k, v, each [B Nh, C, H, W] (head
    dim first, as the qkv convolution lays out its channels: the caller's permute back is a view;
    q's scale applied in the same pass), rel_h, rel_w."""
    bh, h, w, d = scaled_q.shape
    dv = vt.shape[1]
    lib = build._tiled_library_for(d, dv, w, bf16=bf16)
    if lib is None:
        raise RuntimeError(f"the tiled CPU attention kernel for dkh {d}, dvh {dv} is not available")
    inputs = [scaled_q, kt, vt, rel_w.contiguous(), rel_h.contiguous()]
    grads = [torch.empty_like(t) for t in inputs[:3]]
    grad_rel = [scaled_q.new_empty(bh, *t.shape) for t in (rel_w, rel_h)]  # per slice
    grad_out = grad_out.to(torch.float32).contiguous()
    _run_tiled(lib, "backward", [*inputs, out.contiguous(), lse.contiguous(), grad_out, *grads, *grad_rel])
    grad_q, grad_kt, grad_vt = grads
    vw = build._vector_width(lib)
    grad_q_first = scaled_q.new_empty(bh, d, h, w)
    torch.mul(grad_q.permute(0, 3, 1, 2), scale, out=grad_q_first)
    return (
        grad_q_first,
        _from_rows(grad_kt, h, w, vw, torch.float32),
        _from_rows(grad_vt, h, w, vw, torch.float32),
        grad_rel[1].sum(0),
        grad_rel[0].sum(0),
    )


@relative_attention_backward_op.register_fake
def _(scaled_q, kt, vt, rel_h, rel_w, scale, bf16, out, lse, grad_out):
    bh, h, w, d = scaled_q.shape
    return (
        scaled_q.new_empty(bh, d, h, w),
        scaled_q.new_empty(bh, d, h, w),
        scaled_q.new_empty(bh, vt.shape[1], h, w),
        torch.empty_like(rel_h, memory_format=torch.contiguous_format),
        torch.empty_like(rel_w, memory_format=torch.contiguous_format),
    )


def _relative_setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_h, rel_w, scale = inputs
    out, lse, scaled_q, kt, vt = output
    ctx.scale, ctx.dtypes, ctx.batch = scale, (q.dtype, k.dtype, v.dtype), q.shape[0]
    ctx.bf16 = q.dtype == torch.bfloat16
    ctx.mark_non_differentiable(lse, scaled_q, kt, vt)
    ctx.set_materialize_grads(False)  # no zeros made for the outputs without a gradient
    # the layouts, not q, k, v: backward does not make them again, and q, k, v (views of the qkv
    # convolution's output) are not kept alive, so the memory is about the same
    ctx.save_for_backward(scaled_q, kt, vt, rel_h, rel_w, out, lse)


def _relative_backward(ctx, grad_out: Tensor | None, *unused_grads):
    scaled_q, kt, vt, rel_h, rel_w, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = relative_attention_backward_op(scaled_q, kt, vt, rel_h, rel_w, ctx.scale, ctx.bf16, out, lse, grad_out)
    # [B Nh, C, H, W] -> [B, Nh, H, W, C] views, in the inputs' dtypes
    grad_q, grad_k, grad_v = (
        g.unflatten(0, (ctx.batch, -1)).permute(0, 1, 3, 4, 2).to(dtype)
        for g, dtype in zip(grads[:3], ctx.dtypes, strict=True)
    )
    return grad_q, grad_k, grad_v, grads[3], grads[4], None


relative_attention_op.register_autograd(_relative_backward, setup_context=_relative_setup_context)


def cpu_kernel_relative_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float = 1.0
) -> Tensor:
    """softmax_j(scale q_i . (k_j + rel_w[jx - ix + W - 1] + rel_h[jy - iy + H - 1])) v_j with the
    tiled float32 kernel (:func:`use_tiled` says when it runs).

    q, k: [B, Nh, H, W, dkh]; v: [B, Nh, H, W, dvh] (any strides; float32, or bfloat16 / float16
    read into float32); rel_h: [2H-1, dkh]; rel_w: [2W-1, dkh] (float32). Returns float32
    [B, Nh, H, W, dvh]. The log-sum-exp output carries no gradient.
    """
    return relative_attention_op(q, k, v, rel_h, rel_w, scale)[0]
