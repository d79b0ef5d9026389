"""Registers, spills, shared memory and block sizes of the Triton attention kernels, compiled for
A100 (sm_80) and H100 (sm_90) on a machine without a GPU (``triton.compile`` + the wheel's ptxas).

One row per (attention shape of the zoo, dtype, target, kernel); the shapes come from the models
themselves (:func:`triton_compile.zoo_attention_shapes`), plus the extremes the
kernels accept (head dim 128, a 128 x 200 grid).

Usage:  python benchmarks/triton_compile_report.py --out-dir docs/benchmarks
        python benchmarks/triton_compile_report.py --smoke      # one shape, sm_90, bf16 (seconds)
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date

import torch
from report import command_line, write_report

EXTREMES = [
    dict(h=128, w=200, dkh=128, dvh=128, models="limit: grid 128x200, head dim 128"),
    dict(h=64, w=64, dkh=64, dvh=64, models="head dim 64"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="gpu_compile")
    p.add_argument("--smoke", action="store_true", help="one shape, sm_90, bfloat16; prints, writes nothing")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from triton_compile import KERNELS, compile_kernel, zoo_attention_shapes

    shapes = [dict(h=28, w=28, dkh=3, dvh=2, models="smoke")] if args.smoke else zoo_attention_shapes() + EXTREMES
    archs, dtypes = ([90], ["bfloat16"]) if args.smoke else (args.archs, args.dtypes)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for arch in archs:
                for kernel in KERNELS:
                    row = compile_kernel(
                        kernel, shape["h"], shape["w"], shape["dkh"], shape["dvh"], getattr(torch, dtype), arch
                    )
                    row["models"] = shape["models"]
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    table = [
        "| H x W | dkh / dvh | used by | dtype | target | kernel | BLOCK_M x BLOCK_N (rows x cols) | "
        "padded dims | warps | registers | spill bytes (st / ld) | shared KiB (limit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['h']} x {r['w']} | {r['dkh']} / {r['dvh']} | {r['models']} | {r['dtype']} | {r['arch']} | "
            f"`{r['kernel']}` | {r['block_m']} x {r['block_n']} ({r['rows']} x {r['block_n'] // r['rows']}) | "
            f"{r['dp']} / {r['dvp']} | {r['num_warps']} | {r['registers']} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.1f} ({r['shared_limit'] // 1024}) |"
        )
    import triton

    header = (
        f"{date.today()}, triton {triton.__version__}, torch {torch.__version__}, compiled on "
        f"{platform.machine()} without a GPU (ptxas from the triton wheel)."
    )
    if not args.smoke:
        write_report(
            args.out_dir,
            args.name,
            header,
            rows,
            "\n".join(table),
            command=command_line("triton_compile_report.py", argv),
        )
    else:
        print("\n".join(table))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
