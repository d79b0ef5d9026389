"""Building and loading the CPU attention kernels: the C compiler, the per-user cache, ctypes bindings.

Each C source beside this file is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into ``$AA_LIGHTNING_CACHE/kernels`` (default ``~/.cache/aa_lightning``; mode 0700), keyed by a hash of the
source, the flags, the compiler and the CPU's features, and loaded with ctypes only from a folder and a
file that belong to this user and are not group/world-writable. A failed build leaves a ``.failed`` file
under the same key, so DDP processes and later runs do not retry it. :mod:`.ops` runs what this builds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from aa_lightning.atomic_files import write_text_atomic

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("factorized_attention.c")
_TILED_SOURCE = Path(__file__).with_name("factorized_attention_tiled.c")
_TILED_MAX_DIM = 64  # head dims above this use the generic kernel
# No -ffast-math: linked into a shared library it would switch the whole process to
# flush-to-zero. These flags allow the vectorized loops without that side effect.
_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_NATIVE = ["-march=native"]
_OPENMP = ["-fopenmp"]


def _cache_dir() -> Path:
    root = os.environ.get("AA_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aa_lightning"
    )
    return Path(root) / "kernels"


_ANNOUNCED: set[str] = set()
_CHUNKED = "attention runs on the slower chunked backend"  # what runs without the generic kernel


def _fallback(consequence: str, reason: str) -> None:
    """Announce at WARNING, once per process for each ``consequence``, that a compiled kernel is
    not used and why (the first reason met is the one given)."""
    if consequence not in _ANNOUNCED:
        _ANNOUNCED.add(consequence)
        _log.warning("aa_lightning CPU kernel: %s; %s", reason, consequence)


def _unsafe(path: Path) -> str | None:
    """Why ``path`` (the cache folder or a library in it) must not be trusted, or None: it is
    owned by another user or is group/world-writable, so someone else could have put the code
    there that ctypes would run in this process."""
    if not hasattr(os, "getuid"):  # Windows: no POSIX owner or mode bits to check
        return None
    st = path.lstat()
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return f"{path} is neither a regular file nor a folder"
    return None


def _safe_cache_dir(consequence: str) -> Path | None:
    """The cache folder, created with mode 0700 if missing; None (after a warning) if it cannot be
    created or is not safe to load code from (:func:`_unsafe`)."""
    folder = _cache_dir()
    try:
        for path in (folder.parent, folder):  # only the folders this project owns get mode 0700
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = _unsafe(folder)
    except OSError as err:
        reason = f"cannot use the cache folder {folder}: {err}"
    if reason is not None:
        _fallback(consequence, f"refusing the kernel cache: {reason}")
        return None
    return folder


def _compiler() -> str | None:
    """The C compiler: ``$CC`` (a path or a name), else cc, gcc or clang on the PATH."""
    name = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return None if name is None else (shutil.which(name) or name)


def _compiler_identity(compiler: str) -> bytes:
    """The compiler's path, size and mtime: part of the cache key, so a failed build is retried
    with another or an upgraded compiler, and a library is never taken for another compiler's."""
    try:
        st = os.stat(compiler)
        return f"{compiler} {st.st_size} {st.st_mtime_ns}".encode()
    except OSError:
        return compiler.encode()


def _compile(compiler: str, source: Path, target: Path, flags: list[str]) -> bool:
    """Compile ``source`` into ``target`` atomically (safe when DDP processes build at once). A
    failure is recorded in ``target`` with the suffix ``.failed`` (the compiler's message), so
    that other processes, and later runs, do not retry the same build."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True, text=True, check=False
            )
            returncode, message = result.returncode, result.stderr[-2000:]
        except OSError as err:  # $CC names no runnable program
            returncode, message = -1, str(err)
        if returncode != 0:
            _log.info("aa_lightning CPU kernel: %s failed on %s: %s", compiler, source.name, message)
            write_text_atomic(
                target.with_suffix(".failed"),
                f"{compiler} {' '.join(flags)} {source} (exit {returncode}):\n{message}\n",
            )
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
    for size in (lib.aa_tiled_scratch, lib.aa_tiled_row_stride):
        size.argtypes = [long, long]
        size.restype = long
    if hasattr(lib, "aa_tiled_vector_width"):
        lib.aa_tiled_vector_width.argtypes = []
        lib.aa_tiled_vector_width.restype = long
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


def _build(source: Path, consequence: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Load ``source`` built with ``defines``, compiling it into the cache first if needed.

    The cache folder and a cached library are used only if they belong to this user and are not
    group/world-writable; a build that failed before (same source, flags, compiler and CPU) is
    not retried (delete its ``.failed`` file to retry). Where nothing loads, the fallback is
    announced once per process at WARNING with ``consequence`` (what runs instead)."""
    if os.environ.get("AA_LIGHTNING_CPU_KERNEL", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        _fallback(consequence, "no C compiler found (set $CC)")
        return None
    folder = _safe_cache_dir(consequence)
    if folder is None:
        return None
    text = source.read_bytes()
    failed = []
    # -march=native and -fopenmp are not accepted everywhere
    for flags in (_FLAGS + _OPENMP + _NATIVE, _FLAGS + _OPENMP, _FLAGS + _NATIVE, _FLAGS):
        flags = flags + list(defines)
        key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_signature() + _compiler_identity(compiler))
        target = folder / f"{source.stem}_{key.hexdigest()[:16]}.so"
        try:
            if target.with_suffix(".failed").exists() and not target.exists():
                failed.append(target.with_suffix(".failed"))
                continue
            if not target.exists() and not _compile(compiler, source, target, flags):
                failed.append(target.with_suffix(".failed"))
                continue
            reason = _unsafe(target)
            if reason is not None:
                _fallback(consequence, f"refusing to load {reason}")
                return None
            return ctypes.CDLL(str(target))
        except OSError as err:  # unwritable cache, a library that does not load
            _log.info("aa_lightning CPU kernel: %s", err)
            failed.append(target)
    _fallback(
        consequence,
        f"{compiler} could not build {source.name} (see {failed[-1]}; delete the .failed files beside it to retry)",
    )
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _build(_SOURCE, _CHUNKED)
    return None if lib is None else _bind(lib)


BF16_EXP_DEGREE = 3  # the bfloat16 path's exponential: see vexp2 in factorized_attention_tiled.c


@functools.cache
def _tiled_library(dkh: int, dvh: int, wide: bool = False, bf16: bool = False) -> ctypes.CDLL | None:
    """The float32 kernel built for these head dims (``wide``: on 16-float AVX-512 vectors instead
    of 8; ``bf16``: the bfloat16 path's build, whose exponential is the short polynomial, its error
    below bfloat16's rounding); None where it cannot be (then the generic one runs)."""
    if not (1 <= dkh <= _TILED_MAX_DIM and 1 <= dvh <= _TILED_MAX_DIM) or _library() is None:
        return None
    lib = _build(
        _TILED_SOURCE,
        "float32 attention runs on the generic compiled kernel",
        (
            f"-DAA_D={dkh}",
            f"-DAA_DV={dvh}",
            *(("-DAA_VW=16",) if wide else ()),
            *((f"-DAA_EXP_DEGREE={BF16_EXP_DEGREE}",) if bf16 else ()),
        ),
    )
    return None if lib is None else _bind_tiled(lib)


@functools.cache
def _has_avx512() -> bool:
    return b" avx512f " in _cpu_signature().replace(b"\n", b" ")


def _tiled_library_for(dkh: int, dvh: int, w: int, bf16: bool = False) -> ctypes.CDLL | None:
    """The build for a grid ``w`` columns wide: 16-float vectors where the CPU has AVX-512 and a
    grid row fills more than 8 of them (narrower rows would be half padding), else 8-float ones;
    ``bf16``: the bfloat16 path's build (:func:`_tiled_library`)."""
    wide = _has_avx512() and w > 8
    return (wide and _tiled_library(dkh, dvh, True, bf16)) or _tiled_library(dkh, dvh, False, bf16)


def _vector_width(lib: ctypes.CDLL) -> int:
    """Floats per vector of a tiled build: the grid rows are padded to a multiple of it."""
    try:
        return lib.aa_tiled_vector_width()
    except AttributeError:  # a build from before the width was a parameter (benchmarks' --against)
        return 8


def available() -> bool:
    """Whether the compiled kernel can be used here (compiles it on the first call)."""
    return _library() is not None
