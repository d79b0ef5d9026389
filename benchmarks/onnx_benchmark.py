"""Inference of the AA models and their baselines in onnxruntime (the exported graph) beside torch eager.

For every pair, each model runs as torch eager (eval, no_grad, the default attention backend) and
as its ONNX export in onnxruntime (CPUExecutionProvider); the AA model once per ``--forms`` entry
(the attention backend the graph was exported with, ``backend@opset``). All runners of a pair take
turns round by round (``--rounds`` rounds of ``--steps`` batches), so machine noise hits them alike;
the median round is reported, and the ratio AA / baseline within the same runtime beside the
range and median of the rounds' ratios (round t of both ran side by side: on a shared machine the
median of those is the steadier figure). Threads: ``--threads`` for torch and for onnxruntime's intra-op pool.

Usage:
  python benchmarks/onnx_benchmark.py --out-dir docs/benchmarks --name onnx_cpu
  python benchmarks/onnx_benchmark.py --pairs aa_resnet50:resnet50 --forms onnx@23 onnx@18 fused@18
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
from report import command_line, write_report

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.export import ONNX_BACKENDS, export_onnx


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pairs", nargs="+", default=["aa_resnet50:resnet50", "aa_wrn28_10:wrn28_10"], help="aa_model:baseline"
    )
    p.add_argument(
        "--forms",
        nargs="+",
        default=["onnx@23", "fused@18"],
        help="backend@opset of the AA model's export, one onnxruntime row each (default: the export "
        "default and the form before issue 24)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="onnx")
    args = p.parse_args(argv)
    for form in args.forms:
        backend, _, opset = form.partition("@")
        if backend not in ONNX_BACKENDS or not opset.isdigit():
            p.error(f"--forms {form!r}: expected backend@opset with backend one of {ONNX_BACKENDS}")
    return args


def ort_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runners(aa: str, base: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """[{model, runtime, run, check}] for the pair: eager and onnxruntime, every AA export form."""
    found = []
    for name in (aa, base):
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        size = model.pretrained_cfg["input_size"]
        x = torch.randn(args.batch, *size)
        with torch.no_grad():
            expected = model(x).numpy()

        def eager(model=model, x=x):
            with torch.no_grad():
                return model(x)

        found.append({"model": name, "runtime": "torch eager", "input": f"{size[1]}x{size[2]}", "run": eager})
        for form in args.forms if name == aa else ["-"]:
            backend, _, opset = form.partition("@") if name == aa else ("onnx", "", "23")
            path = folder / f"{name}_{backend}_{opset}.onnx"
            export_onnx(model, path, size[-1], backend=backend, opset=int(opset))
            session, feed = ort_session(path, args.threads), {"images": x.numpy()}
            # relative to the largest logit: a freshly initialized model's logits are small
            difference = float(np.abs(session.run(None, feed)[0] - expected).max() / np.abs(expected).max())
            found.append(
                {
                    "model": name,
                    "runtime": "onnxruntime" + (f" ({backend}, opset {opset})" if name == aa else ""),
                    "input": f"{size[1]}x{size[2]}",
                    "max_relative_difference": difference,
                    "run": lambda session=session, feed=feed: session.run(None, feed),
                }
            )
    return found


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            aa, base = pair.split(":")
            found = runners(aa, base, args, Path(tmp))
            for r in found:
                r["run"]()  # warm-up
            rounds = [[] for _ in found]
            for _ in range(args.rounds):
                for r, times in zip(found, rounds):  # alternate: every runner gets one round before any gets the next
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        r["run"]()
                    times.append(args.steps * args.batch / (time.perf_counter() - start))
            for r, times in zip(found, rounds):
                row = {k: v for k, v in r.items() if k != "run"}
                row.update(pair=pair, img_per_s=statistics.median(times), rounds_img_per_s=[round(t, 3) for t in times])
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | input | runtime | images/s | AA / baseline (same runtime) | rounds' ratios | onnxruntime / eager "
        "| max abs diff vs eager / max abs logit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        aa, base = r["pair"].split(":")
        same_pair = [o for o in rows if o["pair"] == r["pair"]]
        eager = next(o for o in same_pair if o["model"] == r["model"] and o["runtime"] == "torch eager")
        ratio = spread = ""
        if r["model"] == aa:
            runtime = r["runtime"].split(" (")[0]
            b = next(o for o in same_pair if o["model"] == base and o["runtime"] == runtime)
            ratio = f"**{r['img_per_s'] / b['img_per_s']:.2f}** (vs {base})"
            per_round = [a / c for a, c in zip(r["rounds_img_per_s"], b["rounds_img_per_s"])]
            spread = f"{min(per_round):.2f}..{max(per_round):.2f} (median {statistics.median(per_round):.2f})"
        speedup = f"{r['img_per_s'] / eager['img_per_s']:.2f}x" if r is not eager else ""
        diff = f"{r['max_relative_difference']:.1e}" if "max_relative_difference" in r else ""
        lines.append(
            f"| {r['model']} | {r['input']} | {r['runtime']} | {r['img_per_s']:.2f} | {ratio} | {spread} | {speedup} "
            f"| {diff} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = (
        f"machine: {platform.machine()} {os.cpu_count()} cores; {args.threads} threads (torch and onnxruntime "
        f"intra-op); torch {torch.__version__}; onnxruntime {onnxruntime.__version__}; timm {timm.__version__}; "
        f"batch {args.batch}; {args.rounds} rounds x {args.steps} batches (median round); {date.today()}"
    )
    print(header)
    rows = measure(args)
    table = markdown(rows)
    print(table)
    write_report(args.out_dir, args.name, header, rows, table, command_line("onnx_benchmark.py", argv))


if __name__ == "__main__":
    main()
