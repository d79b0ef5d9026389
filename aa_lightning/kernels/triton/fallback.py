"""The Triton ops on the ``chunked`` backend when the GPU refuses a kernel launch (out of resources).

A GPU may refuse a kernel that compiled: more shared memory than the block may have (triton's
:class:`triton.OutOfResources`, raised when the kernel is loaded), or more registers or threads than
the launch may use (``cuLaunchKernel``'s ``CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES``, which triton's
launcher raises as a ``RuntimeError`` "Triton Error [CUDA]: too many resources requested for
launch"). The ops then compute the same outputs with the chunked backend's forward and backward
(:class:`aa_lightning.attention.chunked.FactorizedBiasAttention`, called directly: the ops' bodies run
below autograd), warn once naming the shape and the GPU, and send later calls of that shape on that
GPU straight here.
"""

from __future__ import annotations

import warnings

import torch
import triton
from torch import Tensor

from aa_lightning.attention.chunked import FactorizedBiasAttention, chunk_logits, chunk_rows
from aa_lightning.attention.tables import relative_logit_tables

# cuGetErrorString(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES), as triton's launcher puts it in its RuntimeError
_LAUNCH_OUT_OF_RESOURCES = "too many resources requested for launch"
_REFUSED: set[tuple] = set()  # shape_key()s a GPU refused


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is the hardware refusing a launch for its resources (not a bug to surface)."""
    if isinstance(error, triton.OutOfResources):
        return True
    return isinstance(error, RuntimeError) and _LAUNCH_OUT_OF_RESOURCES in str(error)


def shape_key(q: Tensor, v: Tensor) -> tuple:
    """What the kernels' launch parameters depend on: the device, (H, W, dkh, dvh) and the dtype."""
    return (str(q.device), *q.shape[1:], v.shape[3], q.dtype)


def refused(q: Tensor, v: Tensor) -> bool:
    """Whether the GPU of ``q`` refused this shape before (its calls then go straight to chunked)."""
    return shape_key(q, v) in _REFUSED


def _gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device.type} (triton interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}, sm_{major}{minor})"


def refuse(q: Tensor, v: Tensor, kernel: str, error: BaseException) -> None:
    """Remember that the GPU refused this shape and warn, once per shape and GPU."""
    key = shape_key(q, v)
    if key in _REFUSED:
        return
    _REFUSED.add(key)
    _, h, w, dkh = q.shape
    warnings.warn(
        f"the Triton attention kernel {kernel} for H x W = {h} x {w}, dkh {dkh}, dvh {v.shape[3]}, "
        f"{str(q.dtype).removeprefix('torch.')} was refused by the GPU {_gpu_name(q.device)}: {error}. "
        "This shape falls back to backend 'chunked' from now on (same result, more memory and time); "
        "set the backend to 'chunked' to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )


class _Saved:
    """What ``FactorizedBiasAttention`` keeps on its autograd context, for calling it directly."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors


def _factorized(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> tuple[_Saved, tuple]:
    """The chunked backend's forward on the ops' [BH, H, W, d] grids (q already scaled): its context
    (with the output) and the [BH, L, *] views of its inputs."""
    bh, h, w, d = q.shape
    length = h * w
    s_w, s_h = relative_logit_tables(q[None], rel_h, rel_w)
    flat = (
        q.reshape(bh, length, d).contiguous(),
        k.reshape(bh, length, d).contiguous(),
        v.reshape(bh, length, -1).contiguous(),
        s_w.reshape(bh, length, w).contiguous(),
        s_h.reshape(bh, length, h).contiguous(),
    )
    ctx = _Saved()
    rows = chunk_rows(bh, length, q.element_size())
    with torch.no_grad():
        FactorizedBiasAttention.forward(ctx, *flat, rows)
    ctx.rows = rows
    return ctx, flat


def forward(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> tuple[Tensor, Tensor]:
    """The forward op's outputs (out in q's dtype, float32 log-sum-exp [BH, H, W]) by the chunked backend."""
    ctx, (q_flat, k_flat, _, bias_w, bias_h) = _factorized(q, k, v, rel_h, rel_w)
    out = ctx.saved_tensors[-1]
    bh, h, w, _ = q.shape
    lse = torch.empty(bh, h * w, dtype=torch.float32, device=q.device)
    kt = k_flat.transpose(1, 2)
    for start in range(0, h * w, ctx.rows):  # the log-sum-exp of each logits row, chunk by chunk
        end = min(h * w, start + ctx.rows)
        lse[:, start:end] = chunk_logits(q_flat, kt, bias_w, bias_h, start, end).float().logsumexp(-1)
    return out.reshape(bh, h, w, -1), lse.reshape(bh, h, w)


def backward(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward op's float32 outputs (dq, dk, dv, grad_bias_w [BH, H, W, W], grad_bias_h
    [BH, H, W, H]) by the chunked backend's backward (its forward recomputed)."""
    ctx, _ = _factorized(q, k, v, rel_h, rel_w)
    bh, h, w, d = q.shape
    grad_out = grad_out.to(q.dtype).reshape(bh, h * w, -1).contiguous()
    with torch.no_grad():
        dq, dk, dv, grad_bw, grad_bh, _ = FactorizedBiasAttention.backward(ctx, grad_out)
    grads = (dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape))
    grads += (grad_bw.reshape(bh, h, w, w), grad_bh.reshape(bh, h, w, h))
    return tuple(t.float() for t in grads)
