"""A compiled CPU kernel for attention with a factorized (2-D relative) bias: one query row at a time.

    logits[i, j] = q_i . k_j + bias_w[i, jx] + bias_h[i, jy]        j = jy * W + jx
    out_i = sum_j softmax_j(logits[i, :]) v_j

The same function as :mod:`.chunked_attention`, but each query row's logits live in a scratch
row that stays in the CPU's L1/L2 cache: the (HW)^2 logits are never written to memory, and
the exponentials, the bias, the q.k products (dkh multiply-adds) and P V run in one SIMD loop
nest (``factorized_attention.c``). Forward saves the row's log-sum-exp (O(HW) memory); backward
recomputes each row's probabilities from it and accumulates every gradient in the same pass.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``; about
a second) into ``$AA_LIGHTNING_CACHE`` (default ``~/.cache/aa_lightning``), keyed by a hash
of the source, the flags and the CPU's features, and loaded with ctypes; the work is split across
``torch.get_num_threads()`` Python threads (ctypes releases the GIL), one range of
(batch, head) slices each. No compiler, or ``AA_LIGHTNING_CPU_KERNEL=0``: :func:`available`
is False and ``backend="auto"`` uses ``chunked``. The kernel is registered as the torch
custom op ``aa_lightning::factorized_attention`` (with a fake implementation and autograd),
so ``torch.compile``, ``torch.export`` and fx see one opaque node, not a graph break.

float32 (a vectorized exp within ~2 ulp) and float64 (libm's exp; for tests and gradcheck).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("factorized_attention.c")
# No -ffast-math: linked into a shared library it would switch the whole process to
# flush-to-zero. These flags allow the vectorized loops without that side effect.
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_NATIVE = ["-march=native"]
DTYPES = (torch.float32, torch.float64)


def _cache_dir() -> Path:
    root = os.environ.get("AA_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aa_lightning"
    )
    return Path(root) / "kernels"


def _compile(target: Path, flags: list[str]) -> bool:
    """Compile the source into ``target`` atomically (safe when DDP processes build at once)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")  # $CC: a path or a name
    if compiler is None:
        _log.info("aa_lightning CPU kernel: no C compiler found; using the chunked backend")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            _log.info("aa_lightning CPU kernel: %s failed: %s", compiler, result.stderr[-2000:])
            return False
        os.replace(built, target)
    return True


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, long = ctypes.c_void_p, ctypes.c_long
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"aa_forward_{suffix}")
        forward.argtypes = [ptr] * 7 + [long] * 7 + [ptr]
        forward.restype = None
        backward = getattr(lib, f"aa_backward_{suffix}")
        backward.argtypes = [ptr] * 13 + [long] * 7 + [ptr]
        backward.restype = None
    return lib


def _cpu_signature() -> bytes:
    """What -march=native depends on: the CPU's feature flags (Linux), else its name. Part of
    the cache key, so a cache shared by different machines (an NFS home on a cluster) never
    hands one CPU a library built for another's instruction set."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return f"{sys.platform} {platform.machine()} {platform.processor()}".encode()


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("AA_LIGHTNING_CPU_KERNEL", "1") == "0":
        return None
    source = _SOURCE.read_bytes()
    for flags in (_FLAGS + _NATIVE, _FLAGS):  # -march=native is not accepted everywhere
        key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_signature()).hexdigest()[:16]
        target = _cache_dir() / f"factorized_attention_{key}.so"
        try:
            if target.is_file() or _compile(target, flags):
                return _bind(ctypes.CDLL(str(target)))
        except OSError as err:  # unwritable cache, a library that does not load
            _log.info("aa_lightning CPU kernel: %s", err)
    return None


def available() -> bool:
    """Whether the compiled kernel can be used here (compiles it on the first call)."""
    return _library() is not None


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aa_attention")


def _kernel_layout(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> tuple[Tensor, ...]:
    """The kernel's contiguous layouts: q [BH, L, D], kT [BH, D, L], vT [BH, DV, L], bias_w, bias_h."""
    return (q.contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            bias_w.contiguous(), bias_h.contiguous())


def _run_kernel(direction: str, tensors: list[Tensor], scratch_rows: int) -> None:
    """Run ``aa_<direction>_<dtype>`` over all BH slices, split into one range per thread, each
    thread with its own scratch of ``scratch_rows`` rows of L values. ``tensors`` start with
    q, kT, vT, bias_w, bias_h in :func:`_kernel_layout`'s layouts."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the aa_lightning CPU attention kernel is not available (no C compiler?)")
    q, kt, vt, bias_w, bias_h = tensors[:5]
    (batch_heads, length, d), dv, w, h = q.shape, vt.shape[1], bias_w.shape[2], bias_h.shape[2]
    function = getattr(lib, f"aa_{direction}_{_suffix(q.dtype)}")
    workers = max(1, min(torch.get_num_threads(), batch_heads))
    bounds = [batch_heads * t // workers for t in range(workers + 1)]
    scratch = torch.empty(workers, scratch_rows * length, dtype=q.dtype)
    pointers = [t.data_ptr() for t in tensors]

    def work(t: int) -> None:
        function(*pointers, bounds[t], bounds[t + 1], length, h, w, d, dv, scratch[t].data_ptr())

    if workers == 1:
        work(0)
    else:
        list(_pool(workers).map(work, range(workers)))


def _suffix(dtype: torch.dtype) -> str:
    if dtype not in DTYPES:
        raise TypeError(f"the CPU attention kernel takes float32 or float64, got {dtype}")
    return "f32" if dtype == torch.float32 else "f64"


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
    _run_kernel("backward", [q, kt, vt, bias_w, bias_h, out, lse, grad_out, grad_q, grad_kt, grad_vt, grad_bw, grad_bh],
                scratch_rows=2)
    return grad_q, grad_kt.transpose(1, 2).contiguous(), grad_vt.transpose(1, 2).contiguous(), grad_bw, grad_bh


@factorized_attention_backward_op.register_fake
def _(q, k, v, bias_w, bias_h, out, lse, grad_out):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, bias_w, bias_h))  # contiguous, as the real op's


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
    q, k, v, bias_w, bias_h, out, lse = ctx.saved_tensors
    return factorized_attention_backward_op(q, k, v, bias_w, bias_h, out, lse, grad_out)


factorized_attention_op.register_autograd(_backward, setup_context=_setup_context)


def cpu_kernel_attention(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> Tensor:
    """softmax_j(q_i . k_j + bias_w[i, jx] + bias_h[i, jy]) v_j with the compiled kernel.

    q, k: [BH, L, d] (q already scaled); v: [BH, L, dv]; bias_w: [BH, L, W]; bias_h: [BH, L, H];
    L = H * W row-major. Returns [BH, L, dv]. The log-sum-exp output carries no gradient.
    """
    return factorized_attention_op(q, k, v, bias_w, bias_h)[0]
