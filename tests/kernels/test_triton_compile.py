"""The Triton attention kernels compile for A100 (sm_80) and H100 (sm_90) without a GPU, for the
attention shapes of the zoo, in float32 and bfloat16: no register spills, shared memory within the
target's limit. Compiled kernels depend only on the block sizes and dtypes (the grid and the head
dims are runtime arguments), so each distinct variant is compiled once; the default run keeps two
representative variants on both targets, ``-m slow`` compiles them all."""

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # not a package
from triton_compile import KERNELS, compile_kernel, zoo_attention_shapes  # noqa: E402

from aa_lightning.kernels.triton.ops import block_sizes  # noqa: E402

# (H, W, dkh, dvh): aa_resnet50's stage 2 at 224 (dkh 3), aa_wrn28_10's 32x32 (dkh 20): the
# widest key-block rows and the largest zoo head dim. The full list is zoo_attention_shapes().
REPRESENTATIVE = [(28, 28, 3, 2), (32, 32, 20, 2)]


def _variants(shapes):
    seen, out = set(), []
    for h, w, dkh, dvh in shapes:
        key = block_sizes(h, w, dkh, dvh)
        if key not in seen:
            seen.add(key)
            out.append((h, w, dkh, dvh))
    return out


def _check(row, spills_allowed=False):
    assert 0 < row["shared"] <= row["shared_limit"], row
    assert row["registers"] <= 255, row
    if not spills_allowed:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("shape", REPRESENTATIVE)
@pytest.mark.parametrize("kernel", KERNELS)
def test_representative_kernels_compile_without_spills(kernel, shape, arch):
    _check(compile_kernel(kernel, *shape, torch.bfloat16, arch))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", [80, 90])
def test_every_zoo_variant_compiles(dtype, arch):
    """bfloat16 (the GPU training dtype): no spills anywhere. float32 runs exact ("ieee") products on
    the FMA units, which need more registers: it must compile and fit in shared memory; its spills
    are listed in docs/benchmarks/gpu_compile.md."""
    shapes = [(r["h"], r["w"], r["dkh"], r["dvh"]) for r in zoo_attention_shapes()]
    assert (100, 168, 3, 2) in shapes and (7, 7, 13, 6) in shapes  # detection stage 2, aa_resnet50 stage 4
    for shape in _variants(shapes):
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
