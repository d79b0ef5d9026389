"""Compile the Triton attention kernels for a GPU without one: registers, spills, shared memory.

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cap, 32))``
builds the cubin of compute capability ``cap`` (75 = sm_75 ... 120 = sm_120) with the ptxas that
ships in the triton wheel, which rejects what the hardware rejects. Registers and spill bytes come
from ``ptxas -v`` run again on the kernel's PTX with the ptxas triton itself picks for that target
(``get_ptxas``: ``ptxas-blackwell`` from sm_100 on; the older ``ptxas`` rejects the PTX triton
emits there, "Unsupported .version 9.3") and the options of triton's own call, so they are those of
the cubin triton built; the compiled kernel's metadata gives its shared memory. Used by
``tests/kernels/test_triton_compile.py`` and ``benchmarks/triton_compile_report.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

KERNELS = ("_fwd", "_bwd_dq", "_bwd_dkdv")


@dataclass(frozen=True)
class Target:
    """A GPU generation users train on: compute capability, example parts, the dtype they train in
    (no bfloat16 tensor cores before sm_80) and the shared memory one block may use (opt-in maximum)."""

    capability: int
    gpus: str
    training_dtype: torch.dtype
    shared_limit: int

    @property
    def arch(self) -> str:
        return f"sm_{self.capability}"


# Shared memory per block, opt-in maximum: the CUDA C++ Programming Guide's table of technical
# specifications per compute capability (7.5: 64 KB; 8.0: 163 KB; 8.6, 8.9: 99 KB; 9.0: 227 KB;
# 10.0: 227 KB; 12.0: 99 KB), as CUTLASS records them (cutlass.utils SMEM_CAPACITY_MAP; C++
# cutlass::arch::sm100_smem_capacity_bytes = 232448, sm120_smem_capacity_bytes = 101376).
TARGETS = {
    t.capability: t
    for t in (
        Target(75, "T4 (Colab, Kaggle)", torch.float16, 64 * 1024),
        Target(80, "A100", torch.bfloat16, 163 * 1024),
        Target(86, "RTX 3090 / A10 / A40", torch.bfloat16, 99 * 1024),
        Target(89, "RTX 4090 / L4", torch.bfloat16, 99 * 1024),
        Target(90, "H100 / H200", torch.bfloat16, 227 * 1024),
        Target(100, "B200 / GB200", torch.bfloat16, 227 * 1024),
        Target(120, "RTX 5090 / RTX PRO 6000", torch.bfloat16, 99 * 1024),
    )
}
SHARED_LIMIT = {cap: t.shared_limit for cap, t in TARGETS.items()}
_PTR_ARGS = {  # pointer arguments: "x" = the input dtype, else fixed
    "_fwd": dict(Q="x", K="x", V="x", REL_H="fp32", REL_W="fp32", OUT="x", LSE="fp32"),
    "_bwd_dq": dict(
        Q="x",
        K="x",
        V="x",
        REL_H="fp32",
        REL_W="fp32",
        DO="x",
        LSE="fp32",
        DELTA="fp32",
        DQ="fp32",
        GRAD_BW="fp32",
        GRAD_BH="fp32",
    ),
    "_bwd_dkdv": dict(
        Q="x", K="x", V="x", REL_H="fp32", REL_W="fp32", DO="x", LSE="fp32", DELTA="fp32", DK="fp32", DV_OUT="fp32"
    ),
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def zoo_attention_shapes() -> list[dict]:
    """(H, W, dkh, dvh) of every relative-attention layer of the zoo: aa_resnet50 / aa_resnet101
    at 224, aa_wrn28_10 at 32, aa_resnet50 / aa_resnet101 backbones at 800x1333 (padded to 800x1344,
    as torchvision's detection transform pads to a multiple of 32). One row per distinct shape."""
    import timm

    import aa_lightning  # noqa: F401  (registers the models)
    from aa_lightning.layers import AugmentedConv2d

    rows: dict[tuple[int, int, int, int], list[str]] = {}
    for name, kwargs, label in [
        ("aa_resnet50", {}, "aa_resnet50@224"),
        ("aa_resnet101", {}, "aa_resnet101@224"),
        ("aa_wrn28_10", {}, "aa_wrn28_10@32"),
        ("aa_resnet50", dict(img_size=(800, 1344)), "detection aa_resnet50/101@800x1333"),
    ]:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        for layer in model.modules():
            if isinstance(layer, AugmentedConv2d) and layer.rel_h is not None:
                key = ((layer.rel_h.shape[0] + 1) // 2, (layer.rel_w.shape[0] + 1) // 2, layer.dkh, layer.dvh)
                if label not in rows.setdefault(key, []):
                    rows[key].append(label)
    return [dict(h=h, w=w, dkh=dkh, dvh=dvh, models=", ".join(labels)) for (h, w, dkh, dvh), labels in rows.items()]


def ptxas_path(arch: int) -> str:
    """The ptxas triton compiles sm_``arch`` with (``ptxas-blackwell`` of the wheel from sm_100 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the single kernel in ``ptx``: ``ptxas -v`` with the options
    triton's own ptxas call uses (so the numbers are those of the cubin triton builds)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        Path(src).write_text(ptx)
        command = [
            ptxas_path(arch),
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            src,
            "-o",
            os.path.join(tmp, "kernel.cubin"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return dict(registers=registers, spill_stores=stores, spill_loads=loads)


def compile_kernel(kernel: str, h: int, w: int, dkh: int, dvh: int, dtype: torch.dtype, arch: int, blocks=None) -> dict:
    """Compile one kernel for sm_``arch`` (a key of :data:`TARGETS`) with the block sizes the layer
    would use for this shape on that target (or ``blocks``); returns its block sizes, registers,
    spill bytes, shared memory and the target's limit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aa_lightning.kernels.triton import kernels as triton_kernels
    from aa_lightning.kernels.triton import ops as triton_attention

    fn = getattr(triton_kernels, kernel)
    if not isinstance(fn, triton.JITFunction):
        raise RuntimeError("compiling needs the kernels imported without TRITON_INTERPRET=1")
    blocks = blocks or triton_attention.block_sizes(h, w, dkh, dvh, kernel, dtype, arch)
    constants = triton_attention.kernel_constants(blocks, w, dtype)
    name = _DTYPE_NAMES[dtype]
    signature = {arg: "*" + (name if kind == "x" else kind) for arg, kind in _PTR_ARGS[kernel].items()}
    signature.update({arg: "i32" for arg in ("H", "W", "D", "DV", "L")})
    signature.update({arg: "constexpr" for arg in constants})
    compiled = triton.compile(
        ASTSource(fn, signature, constants),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=blocks.num_warps),
    )
    return dict(
        kernel=kernel,
        arch=f"sm_{arch}",
        dtype=name,
        h=h,
        w=w,
        dkh=dkh,
        dvh=dvh,
        block_m=blocks.block_m,
        block_n=blocks.block_n,
        rows=blocks.rows,
        dp=blocks.dp,
        dvp=blocks.dvp,
        num_warps=blocks.num_warps,
        shared=compiled.metadata.shared,
        shared_limit=TARGETS[arch].shared_limit,
        **_ptxas_usage(compiled.asm["ptx"], arch),
    )
