"""The compiled CPU kernel backend: when it is used, its thread split, and its fallbacks.

Its numbers are checked with every other backend in test_relative_attention.py (float64 loop
reference, gradcheck, float32 gradients, bf16 autocast); here the float32 kernel built per head
dims is checked on the shapes its tiling makes awkward (padded grid rows, partial row tiles)."""

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.attention_loop_reference import loop_relative_attention, make_inputs

from aa_lightning.attention import relative_attention_2d, resolve_backend
from aa_lightning.kernels.cpu import build as cpu_build
from aa_lightning.kernels.cpu import ops as cpu_kernel

needs_kernel = pytest.mark.skipif(not cpu_build.available(), reason="no C compiler here")


@needs_kernel
def test_auto_uses_the_kernel_on_cpu_and_not_elsewhere():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu_kernel"
    assert resolve_backend("auto", torch.device("cuda")) in ("triton", "chunked")  # test_relative_attention.py
    with pytest.raises(ValueError, match="'cpu_kernel' runs on CPU tensors only"):
        resolve_backend("cpu_kernel", torch.device("cuda"))


@needs_kernel
def test_threads_split_the_batch_heads_without_changing_a_bit():
    """B Nh = 3 slices over 1, 2 and 3 threads: each thread owns whole slices, so the k and v
    gradients are accumulated in the same order whatever the split."""
    inputs = make_inputs(1, 3, 4, 5, 3, 2, dtype=torch.float32, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = relative_attention_2d(*inputs, backend="cpu_kernel")
            results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


TILED_SHAPES = [  # (B, Nh, H, W, dkh, dvh)
    (2, 1, 5, 9, 3, 2),  # W = 9: grid rows padded to 16 columns; L = 45: a partial tile of 1 row
    (1, 2, 4, 8, 13, 6),  # W = 8: no padding; dkh 13 > 8
    (1, 1, 7, 3, 2, 7),  # dvh > dkh; L = 21: a partial tile of 1 row
    (1, 2, 3, 5, 1, 1),  # one-dim heads
    (1, 1, 1, 1, 2, 2),  # a single position
    (1, 1, 6, 5, 20, 2),  # dkh 20 (aa_wrn28_10); L = 30: a partial tile of 2 rows
    (1, 1, 3, 17, 16, 2),  # dkh 16 on 16-float vectors, W = 17: rows padded to 32; L = 51: a partial tile
    (1, 1, 5, 7, 16, 3),  # dkh 16, 8-float vectors: 5 key vectors, logits two at a time and an odd last one
    (1, 2, 3, 11, 13, 3),  # W = 11: 16-float vectors on AVX-512, split backward
    (1, 1, 2, 20, 3, 2),  # W = 20: padded to 32 columns for 16-float vectors, to 24 for 8-float ones
]


@needs_kernel
@pytest.mark.parametrize("shape", TILED_SHAPES)
def test_float32_kernel_against_float64_references(shape):
    """Output against the loop reference; every input's gradient against the float64 reference
    backend (itself gradchecked against finite differences)."""
    assert cpu_kernel.use_tiled(torch.float32, shape[4], shape[5], shape[2] * shape[3])
    inputs32 = make_inputs(*shape, dtype=torch.float32, requires_grad=True)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs32]
    out = relative_attention_2d(*inputs32, backend="cpu_kernel")
    expected = loop_relative_attention(*(t.detach() for t in inputs64))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    got = torch.autograd.grad((out * weights.float()).sum(), inputs32)
    want = torch.autograd.grad((relative_attention_2d(*inputs64, backend="reference") * weights).sum(), inputs64)
    for name, g, w in zip(("q", "k", "v", "rel_h", "rel_w"), got, want):
        assert g.abs().sum() > 0 or (shape[2:4] == (1, 1) and name != "v"), name  # one key: only v matters
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_read_exactly_into_float32(dtype):
    """The tiled op reads bfloat16 / float16 q, k, v (what autocast hands it) into float32 as it
    lays them out, scale included: its float32 output and the tables' gradients match float64 on
    the same rounded inputs to float32 accuracy (float16), or to the bfloat16 path's exponential
    (relative error <= 1.02e-4, 1/38 of bfloat16's rounding 2^-8: rtol 3e-4); the q, k, v
    gradients come back in their dtype."""
    q, k, v, rel_h, rel_w = make_inputs(2, 2, 5, 9, 3, 2, dtype=torch.float32)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    tables = [rel_h.requires_grad_(), rel_w.requires_grad_()]
    exact = [t.detach().double().requires_grad_() for t in (*low, *tables)]
    scale = 0.7  # not the loop's dkh**-0.5: the op's own scale argument
    out = cpu_kernel.cpu_kernel_relative_attention(*low, *tables, scale=scale)
    rescaled = [exact[0] * (scale / 3**-0.5), *exact[1:]]  # the references scale q by dkh**-0.5
    assert out.dtype == torch.float32
    rtol, atol = (3e-4, 3e-5) if dtype == torch.bfloat16 else (1e-5, 2e-6)  # the bfloat16 path's exp
    torch.testing.assert_close(
        out.double(), loop_relative_attention(*(t.detach() for t in rescaled)), rtol=rtol, atol=atol
    )
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    got = torch.autograd.grad((out.double() * weights).sum(), [*low, *tables])
    want = torch.autograd.grad((relative_attention_2d(*rescaled, backend="reference") * weights).sum(), exact)
    eps = torch.finfo(dtype).eps
    for name, g, w, t in zip(("q", "k", "v", "rel_h", "rel_w"), got, want, (*low, *tables)):
        assert g.dtype == t.dtype, name
        tables = (1e-3, 1e-4) if dtype == torch.bfloat16 else (1e-4, 1e-5)  # float32 grads, bfloat16 path's exp
        rtol, atol = (eps, eps * w.abs().max().item()) if t.dtype == dtype else tables  # rounded to dtype
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernel
@pytest.mark.parametrize("h, w", [(1, 64), (8, 8)])  # 16-float vectors on AVX-512; 8-float ones
def test_the_bfloat16_path_exponential_is_within_its_bound_and_float32_keeps_its_own(h, w):
    """bfloat16 q, k, v run the build whose exp is the short polynomial; float32 ones the degree-6
    one. Probabilities of 64 positions against float64 softmax: the bfloat16 path within 1.02e-4
    relative (and not bit-equal to float32's), float32 within float32 accuracy."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, h, w, 1, generator=g).mul(2).bfloat16().float()  # exactly representable in both
    k = torch.randn(1, 1, h, w, 1, generator=g).mul(2).bfloat16().float()
    v = torch.eye(64).reshape(1, 1, h, w, 64)  # out_i = the probabilities of row i
    rel_h, rel_w = torch.zeros(2 * h - 1, 1), torch.zeros(2 * w - 1, 1)
    want = torch.softmax(q.double().reshape(64, 1) * k.double().reshape(1, 64), dim=-1)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        t = [x.to(dtype) for x in (q, k, v)]
        outs[dtype] = cpu_kernel.cpu_kernel_relative_attention(*t, rel_h, rel_w).reshape(64, 64).double()
    torch.testing.assert_close(outs[torch.float32], want, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(outs[torch.bfloat16], want, rtol=1.1e-4 * 2, atol=1e-12)  # p and its row sum
    assert not torch.equal(outs[torch.float32], outs[torch.bfloat16])


@needs_kernel
def test_float64_activations_under_bfloat16_autocast_run_in_float32():
    """The tiled op reads float32, bfloat16 and float16; other dtypes under autocast are cast to
    float32 first (as before the op read low-precision inputs itself) rather than refused."""
    inputs = make_inputs(1, 2, 4, 5, 3, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relative_attention_2d(*inputs, backend="cpu_kernel")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), loop_relative_attention(*inputs), rtol=0.01, atol=0.01)


@needs_kernel
def test_tiled_and_generic_float32_kernels_agree(monkeypatch):
    """The per-dims float32 kernel (tables computed inside) against the generic one on
    precomputed tables (what runs when the per-dims build fails)."""
    inputs = make_inputs(2, 2, 6, 11, 4, 3, dtype=torch.float32, requires_grad=True)
    results = []
    for tiled in (True, False):
        if not tiled:
            monkeypatch.setattr(cpu_kernel, "tiled_builds", lambda dtype, dkh, dvh: False)
        out = relative_attention_2d(*inputs, backend="cpu_kernel")
        results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert cpu_build._tiled_library(cpu_build._TILED_MAX_DIM + 1, 2) is None  # huge heads: generic


@needs_kernel
def test_wide_vectors_where_the_cpu_has_avx512_and_the_rows_fill_them():
    """16-float vectors (rows padded to 16 columns) on AVX-512 CPUs for grids wider than 8; the
    numbers of that build are checked by the W = 9, 11 and 20 shapes above."""
    wide = cpu_build._has_avx512()
    assert cpu_build._vector_width(cpu_build._tiled_library_for(3, 2, 9)) == (16 if wide else 8)
    assert cpu_build._vector_width(cpu_build._tiled_library_for(3, 2, 8)) == 8


@needs_kernel
@pytest.mark.parametrize("width", [9, 8])  # 16-float vectors on AVX-512, 8-float ones
def test_the_build_for_compilers_without_shufflevector_gives_the_same_bits(monkeypatch, width):
    """gcc < 12 has no __builtin_shufflevector: the horizontal sums then use __builtin_shuffle at
    full width, pairing the lanes in the same order, so both builds agree bit for bit."""
    inputs = make_inputs(2, 2, 5, width, 3, 2, dtype=torch.float32, requires_grad=True)
    out = relative_attention_2d(*inputs, backend="cpu_kernel")
    expected = [out, *torch.autograd.grad(out.square().sum(), inputs)]
    built = []

    def portable(dkh: int, dvh: int, wide: bool = False, bf16: bool = False):
        assert not bf16  # float32 inputs
        flags = (f"-DAA_D={dkh}", f"-DAA_DV={dvh}", *(("-DAA_VW=16",) if wide else ()), "-DAA_NO_SHUFFLEVECTOR")
        lib = cpu_build._build(cpu_build._TILED_SOURCE, "(test)", flags)
        built.append(lib)
        return cpu_build._bind_tiled(lib)

    monkeypatch.setattr(cpu_build, "_tiled_library", portable)
    out = relative_attention_2d(*inputs, backend="cpu_kernel")
    got = [out, *torch.autograd.grad(out.square().sum(), inputs)]
    assert built and all(lib is not None for lib in built)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@needs_kernel
def test_the_kernels_refuse_mixed_or_unsupported_dtypes():
    q = torch.randn(1, 2, 3, 4, 2)
    rel_h, rel_w = torch.randn(5, 2), torch.randn(7, 2)
    with pytest.raises(TypeError, match="float32 tensors"):
        cpu_kernel.cpu_kernel_relative_attention(q, q, q, rel_h.double(), rel_w)
    with pytest.raises(TypeError, match="float32 tensors"):
        cpu_kernel.cpu_kernel_relative_attention(q.double(), q, q, rel_h, rel_w)
    flat = q.reshape(2, 12, 2)
    with pytest.raises(TypeError, match="one dtype"):
        cpu_kernel.cpu_kernel_attention(flat, flat, flat.double(), torch.randn(2, 12, 4), torch.randn(2, 12, 3))


@needs_kernel
def test_the_tiled_kernel_is_used_where_it_is_the_faster_one():
    assert cpu_kernel.use_tiled(torch.float32, 3, 2, 28 * 28)  # aa_resnet50 stage 2
    assert cpu_kernel.use_tiled(torch.float32, 24, 12, 7 * 7)  # small grids: any head dims
    assert cpu_kernel.use_tiled(torch.float32, 20, 2, 32 * 32)  # aa_wrn28_10 group 1: the split backward
    assert not cpu_kernel.use_tiled(torch.float64, 3, 2, 28 * 28)  # float64: the generic kernel


@needs_kernel
def test_python_threads_run_the_ranges_where_openmp_is_missing(monkeypatch):
    """Without an OpenMP build each range is one call on a Python thread: the same bits."""
    inputs = make_inputs(2, 3, 5, 6, 3, 2, dtype=torch.float32, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(2)
        for openmp in (True, False):
            if not openmp:
                for lib in (cpu_build._library(), cpu_build._tiled_library(3, 2)):
                    monkeypatch.setattr(lib, "aa_openmp", lambda: 0)
            out = relative_attention_2d(*inputs, backend="cpu_kernel")
            results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_kernel
def test_large_logits_stay_finite():
    """Rows whose logits reach +-80 (exp would overflow float32 without the max shift)."""
    q, k, v, rel_h, rel_w = make_inputs(1, 2, 6, 6, 4, 3, dtype=torch.float32)
    q = q * 20
    out = relative_attention_2d(q, k, v, rel_h, rel_w, backend="cpu_kernel")
    ref = relative_attention_2d(q.double(), k.double(), v.double(), rel_h.double(), rel_w.double(), backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_loading_the_kernel_leaves_denormals_alone():
    """Built without -ffast-math: loading it must not switch the process to flush-to-zero."""
    cpu_build.available()
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 0.5).item() > 0


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


CHECK = (
    "import torch; from aa_lightning.attention import resolve_backend; "
    "from aa_lightning.kernels.cpu import build as cpu_build; "
    "print(cpu_build.available(), resolve_backend('auto', torch.device('cpu')))"
)


def test_without_a_working_compiler_auto_falls_back_to_chunked(tmp_path):
    assert _run(CHECK, CC="false", AA_LIGHTNING_CACHE=str(tmp_path)) == "False chunked"


def test_the_kernel_can_be_switched_off(tmp_path):
    assert _run(CHECK, AA_LIGHTNING_CPU_KERNEL="0") == "False chunked"


@needs_kernel
def test_a_fresh_cache_builds_the_kernel(tmp_path):
    """Into folders that only this user can read, list or write (mode 0700)."""
    cache = tmp_path / "new"
    assert _run(CHECK, AA_LIGHTNING_CACHE=str(cache)) == "True cpu_kernel"
    assert len(list((cache / "kernels").glob("factorized_attention_*.so"))) == 1
    for folder in (cache, cache / "kernels"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def _build_in(cache: Path, monkeypatch) -> object:
    """cpu_build._build of the generic kernel with ``cache`` as $AA_LIGHTNING_CACHE, as a fresh process would."""
    monkeypatch.setenv("AA_LIGHTNING_CACHE", str(cache))
    monkeypatch.setattr(cpu_build, "_ANNOUNCED", set())
    return cpu_build._build(cpu_build._SOURCE, cpu_build._CHUNKED)


def _unsafe_file(library: Path, monkeypatch) -> str:
    library.chmod(0o775)
    return "group- or world-writable"


def _world_writable_file(library: Path, monkeypatch) -> str:
    library.chmod(0o757)
    return "group- or world-writable"


def _unsafe_folder(library: Path, monkeypatch) -> str:
    library.parent.chmod(0o777)
    return "group- or world-writable"


def _another_users_file(library: Path, monkeypatch) -> str:
    if os.getuid() != 0:
        pytest.skip("only root can give a file to another user")
    os.chown(library, 65534, -1)
    return "owned by uid 65534"


def _another_users_folder(library: Path, monkeypatch) -> str:
    monkeypatch.setattr(os, "getuid", lambda: os.stat(library).st_uid + 1)  # seen as another user
    return "not by this user"


@needs_kernel
@pytest.mark.parametrize(
    "tamper", [_unsafe_file, _world_writable_file, _unsafe_folder, _another_users_file, _another_users_folder]
)
def test_a_library_others_could_have_written_is_refused(tamper, tmp_path, monkeypatch, caplog):
    """A cached library (or its folder) that another user owns or may write is never loaded or
    replaced: the chunked backend runs, and a WARNING names the file and why."""
    built = Path(cpu_build._library()._name)  # the same key in any cache folder: copy, don't compile
    (tmp_path / "kernels").mkdir(mode=0o700)
    library = tmp_path / "kernels" / built.name
    shutil.copy(built, library)
    assert _build_in(tmp_path, monkeypatch) is not None
    content = library.read_bytes()
    why = tamper(library, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=cpu_build.__name__):
        assert _build_in(tmp_path, monkeypatch) is None
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert why in record.getMessage() and "kernels" in record.getMessage() and "chunked" in record.getMessage()
    assert library.read_bytes() == content  # not overwritten
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # nothing built beside it
    if tamper is _unsafe_file:  # a fresh process: auto falls back to chunked
        assert _run(CHECK, AA_LIGHTNING_CACHE=str(tmp_path)) == "False chunked"


def test_a_failed_build_is_remembered_and_announced_once(tmp_path, monkeypatch, caplog):
    """A compiler that fails runs once per flag set, not once per process (DDP ranks, later runs);
    each process announces the fallback once at WARNING; another compiler builds afresh."""
    calls = tmp_path / "calls"
    failing = tmp_path / "cc-that-fails"
    failing.write_text(f'#!/bin/sh\necho x >> {calls}\necho "no such luck" >&2\nexit 1\n')
    failing.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CC", str(failing))
    with caplog.at_level(logging.INFO, logger=cpu_build.__name__):
        assert _build_in(cache, monkeypatch) is None
    attempts = len(calls.read_text().splitlines())
    assert attempts == 4  # with / without -fopenmp and -march=native
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not build factorized_attention.c" in warnings[0], warnings
    failed = list((cache / "kernels").glob("*.failed"))
    assert len(failed) == 4 and all("no such luck" in f.read_text() for f in failed)
    # the next process (another DDP rank, a later run): no compiler run, one warning on stderr
    code = CHECK + "; cpu_build._build(cpu_build._SOURCE, cpu_build._CHUNKED)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "AA_LIGHTNING_CACHE": str(cache), "CC": str(failing)},
    )
    assert result.stdout.strip() == "False chunked", result.stderr[-2000:]
    assert result.stderr.count("could not build factorized_attention.c") == 1, result.stderr
    assert len(calls.read_text().splitlines()) == attempts
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if real is not None and cpu_build.available():
        monkeypatch.setenv("CC", real)
        assert _build_in(cache, monkeypatch) is not None


@needs_kernel
def test_a_compiler_without_openmp_still_builds_both_kernels(tmp_path):
    """A cc that refuses -fopenmp (Apple's clang, say): both kernels build without it, run their
    ranges on Python threads, and agree with the float64 reference backend."""
    real = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    compiler.chmod(0o755)
    code = (
        "import torch; from helpers.attention_loop_reference import make_inputs; "
        "from aa_lightning.attention import relative_attention_2d; "
        "from aa_lightning.kernels.cpu import build as cpu_build, ops as cpu_kernel; torch.set_num_threads(2); "
        "x = make_inputs(1, 2, 4, 5, 3, 2, dtype=torch.float32); "
        "err = (relative_attention_2d(*x, backend='cpu_kernel').double() "
        "- relative_attention_2d(*(t.double() for t in x), backend='reference')).abs().max().item(); "
        "print(cpu_build._library().aa_openmp(), cpu_build._tiled_library(3, 2).aa_openmp(), err < 1e-5)"
    )
    tests = Path(__file__).resolve().parents[1]  # tests/: the subprocess imports helpers.* like pytest does
    path = os.pathsep.join(p for p in (str(tests.parent), str(tests), os.environ.get("PYTHONPATH")) if p)
    out = _run(code, CC=str(compiler), AA_LIGHTNING_CACHE=str(tmp_path), PYTHONPATH=path)
    assert out == "0 0 True"


@needs_kernel
def test_the_tiled_op_frees_the_qkv_output_after_forward():
    """Backward reads the layouts forward made, so q, k, v (views of the qkv convolution's output, as
    AugmentedConv2d makes them) are not saved: that tensor is freed after forward, and backward still
    reaches the convolution's input."""
    import gc
    import weakref

    b, nh, h, w, d, dv = 2, 2, 4, 4, 3, 2
    x = torch.randn(b, 4, h, w, requires_grad=True)
    qkv = torch.nn.Conv2d(4, nh * (2 * d + dv), 1)(x)
    alive = weakref.ref(qkv)
    q, k, v = (t.reshape(b, nh, -1, h, w).permute(0, 1, 3, 4, 2) for t in qkv.split([nh * d, nh * d, nh * dv], 1))
    rel_h = torch.randn(2 * h - 1, d, requires_grad=True)
    rel_w = torch.randn(2 * w - 1, d, requires_grad=True)
    out = relative_attention_2d(q, k, v, rel_h, rel_w, backend="cpu_kernel")
    del qkv, q, k, v
    gc.collect()
    assert alive() is None
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
