"""Compile the Triton attention kernels for a GPU without one: registers, spills, shared memory.

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))``
builds sm_90 (``("cuda", 80, 32)``: sm_80) cubin with the ptxas that ships in the triton wheel,
which rejects what the hardware rejects; ``ptxas -v`` on the kernel's PTX reports registers and
spill bytes, the compiled kernel's metadata its shared memory. Used by
``tests/kernels/test_triton_compile.py`` and ``benchmarks/triton_compile_report.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

KERNELS = ("_fwd", "_bwd_dq", "_bwd_dkdv")
# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
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


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the single kernel in ``ptx``: ``ptxas -v`` with the options
    triton's own ptxas call uses (so the numbers are those of the cubin triton builds)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        Path(src).write_text(ptx)
        command = [
            str(_ptxas()),
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


def compile_kernel(kernel: str, h: int, w: int, dkh: int, dvh: int, dtype: torch.dtype, arch: int) -> dict:
    """Compile one kernel for sm_``arch`` (80 or 90) with the block sizes the layer would use for
    this shape; returns its block sizes, registers, spill bytes, shared memory and the limit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aa_lightning.kernels.triton import kernels as triton_kernels
    from aa_lightning.kernels.triton import ops as triton_attention

    fn = getattr(triton_kernels, kernel)
    if not isinstance(fn, triton.JITFunction):
        raise RuntimeError("compiling needs the kernels imported without TRITON_INTERPRET=1")
    blocks = triton_attention.block_sizes(h, w, dkh, dvh)
    constants = triton_attention.kernel_constants(blocks, w, dtype)
    name = _DTYPE_NAMES[dtype]
    signature = {arg: "*" + (name if kind == "x" else kind) for arg, kind in _PTR_ARGS[kernel].items()}
    signature.update({arg: "i32" for arg in ("H", "W", "D", "DV", "L")})
    signature.update({arg: "constexpr" for arg in constants})
    compiled = triton.compile(
        ASTSource(fn, signature, constants),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=blocks.warps(kernel, dtype)),
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
        num_warps=blocks.warps(kernel, dtype),
        shared=compiled.metadata.shared,
        shared_limit=SHARED_LIMIT[arch],
        **_ptxas_usage(compiled.asm["ptx"], arch),
    )
