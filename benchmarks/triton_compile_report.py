"""Registers, spills, shared memory and block sizes of the Triton attention kernels, compiled for
the GPUs users train on, on a machine without a GPU (``triton.compile`` + the wheel's ptxas):
sm_75 (T4), sm_80 (A100), sm_86 (RTX 3090 / A10 / A40), sm_89 (RTX 4090 / L4), sm_90 (H100),
sm_100 (B200), sm_120 (RTX 5090), each in its training dtype (float16 on sm_75, which has no
bfloat16 tensor cores; bfloat16 elsewhere) and in float32.

One row per (attention shape, dtype, target, kernel); the shapes come from the models themselves
(:func:`triton_compile.zoo_attention_shapes`), plus the extremes the kernels accept (head dim 128,
a 128 x 200 grid). Exit status 1 when a zoo shape's kernel spills in its target's training dtype,
or uses more shared memory than its target allows one block (in any dtype); the extremes are
listed, not judged (a launch the GPU refuses falls back to the chunked backend).

Usage:  python benchmarks/triton_compile_report.py --out-dir docs/benchmarks
        python benchmarks/triton_compile_report.py --smoke      # one shape, sm_75 + sm_120 (seconds)
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
DTYPE_CHOICES = ["training", "float32", "bfloat16", "float16"]


def parse_args(argv=None) -> argparse.Namespace:
    from triton_compile import TARGETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument(
        "--dtypes", nargs="+", default=["training", "float32"], choices=DTYPE_CHOICES, help="training: per target"
    )
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="gpu_compile")
    p.add_argument("--smoke", action="store_true", help="one shape, sm_75 and sm_120, training dtype; writes nothing")
    return p.parse_args(argv)


def problems(row: dict) -> list[str]:
    """What fails the report for ``row``: a zoo shape spilling in its target's training dtype, or
    any zoo kernel over its target's shared memory per block."""
    if row["extreme"]:
        return []
    found = []
    if row["shared"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared']} > {row['shared_limit']} bytes")
    if row["training_dtype"] and (row["spill_stores"] or row["spill_loads"]):
        found.append(f"spills {row['spill_stores']} / {row['spill_loads']} bytes in the training dtype")
    return found


def summary_table(rows: list[dict]) -> str:
    """Per target and dtype: builds, builds that spill (zoo shapes / extremes), most shared memory vs the limit."""
    lines = [
        "| target | GPUs | dtype | zoo builds | zoo builds that spill (most bytes) | most shared KiB, zoo (limit) | "
        "extremes that spill | extremes over the shared limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["arch"], r["dtype"]) for r in rows)
    for arch, dtype in keys:
        group = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype]
        zoo, extreme = [r for r in group if not r["extreme"]], [r for r in group if r["extreme"]]
        spilling = [r for r in zoo if r["spill_stores"] or r["spill_loads"]]
        most = max((r["spill_stores"] for r in spilling), default=0)
        first = group[0]
        training = " (training)" if first["training_dtype"] else ""
        lines.append(
            f"| {arch} | {first['gpus']} | {dtype}{training} | {len(zoo)} | {len(spilling)}"
            f"{f' ({most})' if spilling else ''} | "
            f"{max(r['shared'] for r in zoo) / 1024:.1f} ({first['shared_limit'] // 1024}) | "
            f"{sum(1 for r in extreme if r['spill_stores'] or r['spill_loads'])} of {len(extreme)} | "
            f"{sum(1 for r in extreme if r['shared'] > r['shared_limit'])} of {len(extreme)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from triton_compile import KERNELS, TARGETS, compile_kernel, zoo_attention_shapes

    shapes = [dict(h=28, w=28, dkh=3, dvh=2, models="smoke")] if args.smoke else zoo_attention_shapes() + EXTREMES
    archs, dtypes = ([75, 120], ["training"]) if args.smoke else (args.archs, args.dtypes)
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            for arch in archs:
                target = TARGETS[arch]
                dtype = target.training_dtype if dtype_name == "training" else getattr(torch, dtype_name)
                if dtype_name != "training" and dtype == target.training_dtype and "training" in dtypes:
                    continue  # already compiled as the training dtype
                for kernel in KERNELS:
                    row = compile_kernel(kernel, shape["h"], shape["w"], shape["dkh"], shape["dvh"], dtype, arch)
                    row.update(
                        models=shape["models"],
                        gpus=target.gpus,
                        training_dtype=dtype == target.training_dtype,
                        extreme=shape in EXTREMES,
                    )
                    row["problems"] = problems(row)
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    table = [
        "| H x W | dkh / dvh | used by | dtype | target | kernel | BLOCK_M x BLOCK_N (rows x cols) | "
        "padded dims | warps | registers | spill bytes (st / ld) | shared KiB (limit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = " **FAILS**" if r["problems"] else ""
        table.append(
            f"| {r['h']} x {r['w']} | {r['dkh']} / {r['dvh']} | {r['models']} | {r['dtype']} | {r['arch']} | "
            f"`{r['kernel']}` | {r['block_m']} x {r['block_n']} ({r['rows']} x {r['block_n'] // r['rows']}) | "
            f"{r['dp']} / {r['dvp']} | {r['num_warps']} | {r['registers']} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.1f} ({r['shared_limit'] // 1024}){flag} |"
        )
    import triton

    failing = [r for r in rows if r["problems"]]
    verdict = (
        f"FAILS: {len(failing)} zoo builds spill in the training dtype or exceed shared memory."
        if failing
        else "Every zoo build fits its target's shared memory per block; none spills in the training dtype."
    )
    header = (
        f"{date.today()}, triton {triton.__version__}, torch {torch.__version__}, compiled on "
        f"{platform.machine()} without a GPU (ptxas from the triton wheel: ptxas for sm_75-sm_90, "
        f"ptxas-blackwell for sm_100 / sm_120, as triton picks them). {verdict}"
    )
    tables = summary_table(rows) + "\n\n" + "\n".join(table)
    if not args.smoke:
        write_report(
            args.out_dir, args.name, header, rows, tables, command=command_line("triton_compile_report.py", argv)
        )
    else:
        print(tables)
    for r in failing:
        print(f"FAIL {r['arch']} {r['dtype']} {r['h']}x{r['w']} dkh {r['dkh']} {r['kernel']}: {r['problems']}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
