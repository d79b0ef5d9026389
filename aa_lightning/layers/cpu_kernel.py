"""A compiled CPU kernel for attention with a factorized (2-D relative) bias: one query row at a time.

    logits[i, j] = q_i . k_j + bias_w[i, jx] + bias_h[i, jy]        j = jy * W + jx
    out_i = sum_j softmax_j(logits[i, :]) v_j

The same function as :mod:`.chunked_attention`, but each query row's logits live in a scratch
row that stays in the CPU's L1/L2 cache: the (HW)^2 logits are never written to memory, and
the exponentials, the bias, the q.k products (dkh multiply-adds) and P V run in SIMD loops.
Forward saves the row's log-sum-exp (O(HW) memory); backward recomputes each row's probabilities
from it and accumulates every gradient in the same pass. Two C sources:

- ``factorized_attention_tiled.c``, the float32 path: built once per head-dim pair (dkh, dvh)
  with the dims as compile-time constants, so each key's vectors live in registers and four
  query rows share every key load and gradient store (1.4-2.4x faster than the generic one);
- ``factorized_attention.c``: any dims, float32 and float64 (tests, gradcheck); used for
  float64, and for float32 if the per-dims build fails.

Each is compiled on first use with the system C compiler (``$CC``, else ``cc``; well under a
second) into ``$AA_LIGHTNING_CACHE`` (default ``~/.cache/aa_lightning``), keyed by a hash
of the source, the flags and the CPU's features, and loaded with ctypes. The work is split into
``torch.get_num_threads()`` ranges of whole (batch, head) slices, run on OpenMP threads: built
with ``-fopenmp``, the library resolves ``libgomp.so.1`` to the copy torch has already loaded, so
the kernel shares torch's thread pool instead of fighting its spinning workers for the cores
(where no OpenMP build works, Python threads run the ranges; ctypes releases the GIL). No compiler, or ``AA_LIGHTNING_CPU_KERNEL=0``: :func:`available`
is False and ``backend="auto"`` uses ``chunked``. The kernel is registered as the torch
custom op ``aa_lightning::factorized_attention`` (with a fake implementation and autograd),
so ``torch.compile``, ``torch.export`` and fx see one opaque node, not a graph break.

float32 (a vectorized exp within ~2 ulp) and float64 (libm's exp).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("factorized_attention.c")
_TILED_SOURCE = Path(__file__).with_name("factorized_attention_tiled.c")
_TILED_MAX_DIM = 64  # head dims above this use the generic kernel (register tiles would spill)
# No -ffast-math: linked into a shared library it would switch the whole process to
# flush-to-zero. These flags allow the vectorized loops without that side effect.
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_NATIVE = ["-march=native"]
_OPENMP = ["-fopenmp"]
DTYPES = (torch.float32, torch.float64)


def _cache_dir() -> Path:
    root = os.environ.get("AA_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aa_lightning"
    )
    return Path(root) / "kernels"


def _compile(source: Path, target: Path, flags: list[str]) -> bool:
    """Compile ``source`` into ``target`` atomically (safe when DDP processes build at once)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")  # $CC: a path or a name
    if compiler is None:
        _log.info("aa_lightning CPU kernel: no C compiler found; using the chunked backend")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            _log.info("aa_lightning CPU kernel: %s failed on %s: %s", compiler, source.name, result.stderr[-2000:])
            return False
        os.replace(built, target)
    return True


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, long = ctypes.c_void_p, ctypes.c_long
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"aa_forward_{suffix}")
        forward.argtypes = [ptr] * 7 + [long] * 8 + [ptr, long]
        forward.restype = None
        backward = getattr(lib, f"aa_backward_{suffix}")
        backward.argtypes = [ptr] * 13 + [long] * 8 + [ptr, long]
        backward.restype = None
    lib.aa_openmp.restype = ctypes.c_int
    return lib


def _bind_tiled(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, long = ctypes.c_void_p, ctypes.c_long
    lib.aa_tiled_forward.argtypes = [ptr] * 7 + [long] * 5 + [ptr, long, ptr, long]
    lib.aa_tiled_forward.restype = None
    lib.aa_tiled_backward.argtypes = [ptr] * 13 + [long] * 5 + [ptr, long, ptr, long]
    lib.aa_tiled_backward.restype = None
    lib.aa_tiled_scratch.argtypes = [long, long]
    lib.aa_tiled_scratch.restype = long
    lib.aa_openmp.restype = ctypes.c_int
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


def _build(source: Path, defines: tuple[str, ...] = ()) -> Optional[ctypes.CDLL]:
    """Load ``source`` built with ``defines``, compiling it into the cache first if needed."""
    if os.environ.get("AA_LIGHTNING_CPU_KERNEL", "1") == "0":
        return None
    text = source.read_bytes()
    # -march=native and -fopenmp are not accepted everywhere
    for flags in (_FLAGS + _OPENMP + _NATIVE, _FLAGS + _OPENMP, _FLAGS + _NATIVE, _FLAGS):
        flags = flags + list(defines)
        key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_signature()).hexdigest()[:16]
        target = _cache_dir() / f"{source.stem}_{key}.so"
        try:
            if target.is_file() or _compile(source, target, flags):
                return ctypes.CDLL(str(target))
        except OSError as err:  # unwritable cache, a library that does not load
            _log.info("aa_lightning CPU kernel: %s", err)
    return None


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    lib = _build(_SOURCE)
    return None if lib is None else _bind(lib)


@functools.cache
def _tiled_library(dkh: int, dvh: int) -> Optional[ctypes.CDLL]:
    """The float32 kernel built for these head dims; None where it cannot be (then the generic one runs)."""
    if not (1 <= dkh <= _TILED_MAX_DIM and 1 <= dvh <= _TILED_MAX_DIM) or _library() is None:
        return None
    lib = _build(_TILED_SOURCE, (f"-DAA_D={dkh}", f"-DAA_DV={dvh}"))
    return None if lib is None else _bind_tiled(lib)


def available() -> bool:
    """Whether the compiled kernel can be used here (compiles it on the first call)."""
    return _library() is not None


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aa_attention")


def _in_parallel(lib: ctypes.CDLL, batch_heads: int, scratch_floats: int, dtype: torch.dtype,
                 call: Callable[[int, int, int, int, int], None]) -> None:
    """Run the kernel over the BH slices split into ``torch.get_num_threads()`` ranges (at most
    one per slice), each with its own ``scratch_floats`` of scratch, through
    ``call(first, end, parts, scratch_pointer, scratch_stride)``: one call that runs the ranges
    on OpenMP threads, or without OpenMP one call per range on Python threads."""
    parts = max(1, min(torch.get_num_threads(), batch_heads))
    scratch = torch.empty(parts, scratch_floats, dtype=dtype)
    if parts == 1 or lib.aa_openmp():
        call(0, batch_heads, parts, scratch.data_ptr(), scratch_floats)
        return
    bounds = [batch_heads * t // parts for t in range(parts + 1)]
    list(_pool(parts).map(lambda t: call(bounds[t], bounds[t + 1], 1, scratch[t].data_ptr(), scratch_floats), range(parts)))


def _pointers(tensors: list[Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


# The generic kernel: q [BH, L, D], kT [BH, D, L], vT [BH, DV, L], bias_w [BH, L, W], bias_h [BH, L, H].

def _generic_layout(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> list[Tensor]:
    return [q.contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            bias_w.contiguous(), bias_h.contiguous()]


def _run_generic(direction: str, tensors: list[Tensor], scratch_rows: int) -> None:
    """``aa_<direction>_<dtype>`` over all BH slices; ``tensors`` start with the generic layout."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the aa_lightning CPU attention kernel is not available (no C compiler?)")
    q, kt, vt, bias_w, bias_h = tensors[:5]
    (batch_heads, length, d), dv, w, h = q.shape, vt.shape[1], bias_w.shape[2], bias_h.shape[2]
    function, pointers = getattr(lib, f"aa_{direction}_{_suffix(q.dtype)}"), _pointers(tensors)
    _in_parallel(lib, batch_heads, scratch_rows * length, q.dtype,
                 lambda first, end, parts, scratch, stride: function(*pointers, first, end, length, h, w, d, dv,
                                                                      parts, scratch, stride))


# The tiled float32 kernel: the key grid's rows padded to Wp (a multiple of 8) columns, which
# get probability 0: kT [BH, D, H, Wp] and vT [BH, DV, H, Wp] zero there, bias_w [BH, L, Wp] -inf.

def _tiled_for(q: Tensor, k: Tensor, v: Tensor) -> Optional[ctypes.CDLL]:
    return _tiled_library(k.shape[2], v.shape[2]) if q.dtype == torch.float32 else None


def _padded_width(w: int) -> int:
    return -(-w // 8) * 8


def _tiled_layout(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> list[Tensor]:
    (batch_heads, _, d), dv, h, w = k.shape, v.shape[2], bias_h.shape[2], bias_w.shape[2]
    pad = (0, _padded_width(w) - w)
    grid = lambda t, c: F.pad(t.transpose(1, 2).reshape(batch_heads, c, h, w), pad).contiguous()  # noqa: E731
    return [q.contiguous(), grid(k, d), grid(v, dv), F.pad(bias_w, pad, value=-math.inf).contiguous(), bias_h.contiguous()]


def _run_tiled(lib: ctypes.CDLL, direction: str, tensors: list[Tensor]) -> None:
    """``aa_tiled_<direction>`` over all BH slices; ``tensors`` start with the tiled layout."""
    q, kt, vt, bias_w, bias_h = tensors[:5]
    (batch_heads, _, d), dv, h, w, wp = q.shape, vt.shape[1], bias_h.shape[2], bias_h.shape[1] // bias_h.shape[2], kt.shape[3]
    zeros = q.new_zeros(wp + h + d + dv)
    function, pointers = getattr(lib, f"aa_tiled_{direction}"), _pointers(tensors)
    _in_parallel(lib, batch_heads, lib.aa_tiled_scratch(h, wp), q.dtype,
                 lambda first, end, parts, scratch, stride: function(*pointers, first, end, h, w, wp, zeros.data_ptr(),
                                                                      parts, scratch, stride))


def _suffix(dtype: torch.dtype) -> str:
    if dtype not in DTYPES:
        raise TypeError(f"the CPU attention kernel takes float32 or float64, got {dtype}")
    return "f32" if dtype == torch.float32 else "f64"


@torch.library.custom_op("aa_lightning::factorized_attention", mutates_args=(), device_types="cpu")
def factorized_attention_op(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> tuple[Tensor, Tensor]:
    """q, k: [BH, L, D] (q scaled); v: [BH, L, DV]; bias_w [BH, L, W]; bias_h [BH, L, H].
    Returns (out [BH, L, DV], log-sum-exp of each logits row [BH, L])."""
    _suffix(q.dtype)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = q.new_empty(q.shape[0], q.shape[1])
    tiled = _tiled_for(q, k, v)
    if tiled is not None:
        _run_tiled(tiled, "forward", [*_tiled_layout(q, k, v, bias_w, bias_h), out, lse])
    else:
        _run_generic("forward", [*_generic_layout(q, k, v, bias_w, bias_h), out, lse], scratch_rows=1)
    return out, lse


@factorized_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1])


@torch.library.custom_op("aa_lightning::factorized_attention_backward", mutates_args=(), device_types="cpu")
def factorized_attention_backward_op(
    q: Tensor, k: Tensor, v: Tensor, bias_w: Tensor, bias_h: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (q, k, v, bias_w, bias_h) of :func:`factorized_attention_op`'s ``out``."""
    saved = [out.contiguous(), lse.contiguous(), grad_out.contiguous()]
    tiled = _tiled_for(q, k, v)
    layout = _tiled_layout(q, k, v, bias_w, bias_h) if tiled is not None else _generic_layout(q, k, v, bias_w, bias_h)
    grads = [t.new_empty(t.shape) for t in layout]
    if tiled is not None:
        _run_tiled(tiled, "backward", [*layout, *saved, *grads])
    else:
        _run_generic("backward", [*layout, *saved, *grads], scratch_rows=2)
    grad_q, grad_kt, grad_vt, grad_bw, grad_bh = grads
    w = bias_w.shape[2]
    if tiled is not None:  # back from the padded grid: [BH, C, H, Wp] -> [BH, L, C]
        unpad = lambda g: g[..., :w].permute(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1])  # noqa: E731
        return grad_q, unpad(grad_kt), unpad(grad_vt), grad_bw[..., :w].contiguous(), grad_bh
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
