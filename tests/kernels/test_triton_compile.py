"""The Triton attention kernels compile without a GPU for the GPUs users train on (sm_75 T4, sm_80,
sm_86, sm_89, sm_90, sm_100, sm_120: ``triton_compile.TARGETS``), for the attention shapes of the
zoo: no register spills in each target's training dtype (float16 on sm_75, bfloat16 elsewhere),
shared memory within the target's limit in every dtype. Compiled kernels depend only on the block
sizes, the dtype and whether rows are split into column chunks (the grid and the head dims are
runtime arguments), so each distinct variant is compiled once; the default run keeps the 28 x 28
dkh 3 and the wrn 32 x 32 dkh 20 variants on sm_75 (the target with the most choices of its own)
and 28 x 28 on sm_100 / sm_120 (ptxas-blackwell), ``-m slow`` compiles them all on every target."""

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # not a package
from triton_compile import KERNELS, TARGETS, compile_kernel, ptxas_path, zoo_attention_shapes  # noqa: E402

from aa_lightning.kernels.triton.ops import block_sizes, kernel_constants  # noqa: E402

# (H, W, dkh, dvh): aa_resnet50's stage 2 at 224 (dkh 3), aa_wrn28_10's 32x32 (dkh 20): the
# widest key-block rows and the largest zoo head dim. The full list is zoo_attention_shapes().
REPRESENTATIVE = [(28, 28, 3, 2), (32, 32, 20, 2)]


def _variants(shapes, dtype, arch):
    """One shape per distinct compiled variant (block sizes and constexprs of the three kernels)."""
    seen, out = set(), []
    for h, w, dkh, dvh in shapes:
        key = []
        for kernel in KERNELS:
            blocks = block_sizes(h, w, dkh, dvh, kernel, dtype, arch)
            key.append((blocks, tuple(sorted(kernel_constants(blocks, w, dtype).items()))))
        if tuple(key) not in seen:
            seen.add(tuple(key))
            out.append((h, w, dkh, dvh))
    return out


def _check(row, spills_allowed=False):
    assert 0 < row["shared"] <= row["shared_limit"], row
    assert row["registers"] <= 255, row
    if not spills_allowed:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


@pytest.mark.parametrize(
    "arch, shape",
    [(75, REPRESENTATIVE[0]), (75, REPRESENTATIVE[1]), (100, REPRESENTATIVE[0]), (120, REPRESENTATIVE[0])],
    ids=str,
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_representative_kernels_compile_without_spills(kernel, shape, arch):
    """In the target's training dtype, with the block sizes the layer uses on that target (sm_75's
    float16 backward spilled 284 and 924 bytes with the sm_80 blocks)."""
    _check(compile_kernel(kernel, *shape, TARGETS[arch].training_dtype, arch))


def test_blackwell_is_compiled_by_the_ptxas_that_takes_its_ptx():
    """triton emits PTX 9.x for sm_100 / sm_120, which only the wheel's ptxas-blackwell reads."""
    assert ptxas_path(120).endswith("ptxas-blackwell") and ptxas_path(100).endswith("ptxas-blackwell")
    assert ptxas_path(90).endswith("ptxas") and ptxas_path(75) == ptxas_path(90)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["training", torch.float32])
@pytest.mark.parametrize("arch", list(TARGETS))
def test_every_zoo_variant_compiles(dtype, arch):
    """The training dtype: no spills anywhere. float32 runs exact ("ieee") products on the FMA units,
    which need more registers: it must compile and fit in shared memory; its spills are listed in
    docs/benchmarks/gpu_compile.md."""
    dtype = TARGETS[arch].training_dtype if dtype == "training" else dtype
    shapes = [(r["h"], r["w"], r["dkh"], r["dvh"]) for r in zoo_attention_shapes()]
    assert (100, 168, 3, 2) in shapes and (7, 7, 13, 6) in shapes  # detection stage 2, aa_resnet50 stage 4
    for shape in _variants(shapes, dtype, arch):
        for kernel in KERNELS:
            _check(compile_kernel(kernel, *shape, dtype, arch), spills_allowed=dtype == torch.float32)


def test_ptxas_rejects_what_the_hardware_rejects():
    """The compile check is not vacuous: a tl.dot with K = 8 < 16 fails to compile for sm_90."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def small_dot(X, Y, K: tl.constexpr):
        r = tl.arange(0, 16)
        k = tl.arange(0, K)
        a = tl.load(X + r[:, None] * K + k[None, :])
        tl.store(Y + r[:, None] * 16 + r[None, :], tl.dot(a, tl.trans(a)))

    signature = {"X": "*bf16", "Y": "*fp32", "K": "constexpr"}
    triton.compile(ASTSource(small_dot, signature, {"K": 16}), target=GPUTarget("cuda", 90, 32))
    with pytest.raises(Exception):  # noqa: B017  (triton raises its own compilation errors, not one public type)
        triton.compile(ASTSource(small_dot, signature, {"K": 8}), target=GPUTarget("cuda", 90, 32))
