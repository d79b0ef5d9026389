"""The whole ``backend="cpu_kernel"`` attention call, glue included, against another git revision's.

``kernel_benchmark.py --against REV`` swaps in REV's C source but keeps this tree's Python around it;
this benchmark measures the torch glue too (the layouts, casts, allocations, the custom ops' and
autograd's per-call cost): each tree runs in its own worker process (``PYTHONPATH`` set to the tree,
REV's from ``git archive``), both fed the same inputs, taking turns round by round. A call is the
path of an AugmentedConv2d layer: q, k, v as the permuted views of one qkv tensor,
``relative_attention_2d(..., backend="cpu_kernel")``, and in training a gradient of the output in
the layout the output projection hands back (a permuted view); forward runs under no_grad. Each
worker times ``--inner`` calls per round on the process's CPU clock (``--threads 1``: other
processes' load does not inflate it) and reports the median round; ratio = REV / this tree (above 1:
this tree is faster); "rounds" is the spread of the per-round ratios. "bits" compares the outputs
and every gradient of the two trees (sha256 of the bytes).

Usage:  python benchmarks/glue_benchmark.py --against main --models aa_resnet50 aa_wrn28_10 --max-grid 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from kernel_benchmark import attention_shapes
from report import command_line, write_report

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import hashlib, json, sys, time
import torch
from aa_lightning.attention import relative_attention_2d
torch.set_num_threads(int(sys.argv[1]))
DTYPE = getattr(torch, sys.argv[2])

def setup(b, nh, h, w, dkh, dvh):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, nh * (2 * dkh + dvh), h, w, generator=g).to(DTYPE).requires_grad_()
    rel_h = (torch.randn(2 * h - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    rel_w = (torch.randn(2 * w - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    grad = torch.randn(b, nh * dvh, h, w, generator=g).to(DTYPE).reshape(b, nh, dvh, h, w).permute(0, 1, 3, 4, 2)

    def call():
        q, k, v = qkv.split([nh * dkh, nh * dkh, nh * dvh], dim=1)
        q, k, v = (t.reshape(b, nh, -1, h, w).permute(0, 1, 3, 4, 2) for t in (q, k, v))
        with torch.autocast("cpu", dtype=DTYPE, enabled=DTYPE != torch.float32):
            return relative_attention_2d(q, k, v, rel_h, rel_w, backend="cpu_kernel")

    def forward():
        with torch.no_grad():
            return call()

    def train():
        out = call()
        return (out, *torch.autograd.grad(out, (qkv, rel_h, rel_w), grad))

    return {"forward": forward, "forward+backward": train}

cases = {}
for line in sys.stdin:
    request = json.loads(line)
    shape, pass_ = tuple(request["shape"]), request["pass"]
    if shape not in cases:
        cases[shape] = setup(*shape)
    fn = cases[shape][pass_]
    if request.get("bits"):
        data = b"".join(t.detach().float().contiguous().numpy().tobytes() for t in fn())
        digest = hashlib.sha256(data).hexdigest()
        print(json.dumps({"bits": digest}), flush=True)
        continue
    fn()  # warm
    start = time.process_time()
    for _ in range(request["inner"]):
        fn()
    print(json.dumps({"ms": (time.process_time() - start) * 1000 / request["inner"]}), flush=True)
"""


class Worker:
    """One Python process importing aa_lightning from ``tree``, answering timing requests."""

    def __init__(self, tree: Path, threads: int, dtype: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(threads), dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("a worker died (see its error above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def checkout(revision: str) -> Path:
    """``revision``'s aa_lightning package in a temporary folder (``git archive``)."""
    folder = Path(tempfile.mkdtemp(prefix="aa_glue_"))
    archive = subprocess.run(["git", "archive", revision, "aa_lightning"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def measure(shape: tuple[int, ...], workers: dict[str, Worker], rounds: int, inner: int) -> list[dict]:
    rows = []
    for pass_ in ("forward", "forward+backward"):
        bits = {name: w.ask(shape=shape, **{"pass": pass_, "bits": True})["bits"] for name, w in workers.items()}
        times = {name: [] for name in workers}
        for _ in range(rounds):
            for name, worker in workers.items():
                times[name].append(worker.ask(shape=shape, inner=inner, **{"pass": pass_})["ms"])
        now, against = times.values()  # this tree's rounds, then REV's
        ratios = sorted(a / n for a, n in zip(against, now, strict=True))
        b, nh, h, w, dkh, dvh = shape
        rows.append(
            {
                "B": b,
                "Nh": nh,
                "HxW": f"{h}x{w}",
                "dkh": dkh,
                "dvh": dvh,
                "pass": pass_,
                **{f"ms {name}": round(statistics.median(t), 3) for name, t in times.items()},
                "ratio": round(statistics.median(against) / statistics.median(now), 3),
                "rounds": [round(ratios[0], 2), round(ratios[-1], 2)],
                "bits": "same" if len(set(bits.values())) == 1 else "DIFFERENT",
                "rounds_ms": {name: [round(x, 3) for x in t] for name, t in times.items()},
            }
        )
    return rows


def markdown(rows: list[dict], names: list[str]) -> str:
    lines = [
        f"| grid | dkh | dvh | pass | {names[0]} ms | {names[1]} ms | {names[1]} / {names[0]} (rounds) | bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["rounds"]
        lines.append(
            f"| {r['HxW']} | {r['dkh']} | {r['dvh']} | {r['pass']} | {r[f'ms {names[0]}']} | {r[f'ms {names[1]}']} "
            f"| {r['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['bits']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="REV", required=True, help="the git revision whose glue and kernel to compare")
    p.add_argument("--models", nargs="+", default=["aa_resnet50", "aa_wrn28_10"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-grid", type=int, default=16, help="only attention grids with H, W at most this")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=5, help="calls timed per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: the qkv tensor in bfloat16 and the call under bf16 autocast (the bfloat16 path)",
    )
    p.add_argument("--out-dir", default=None, help="also write <name>.json and <name>.md here")
    p.add_argument("--name", default="glue")
    args = p.parse_args(argv)
    shapes = [
        s for model in args.models for s in attention_shapes(model, args.batch) if max(s[2], s[3]) <= args.max_grid
    ]
    names = ["now", args.against]
    workers = {
        names[0]: Worker(ROOT, args.threads, args.dtype),
        names[1]: Worker(checkout(args.against), args.threads, args.dtype),
    }
    header = (
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {args.threads}; "
        f"torch {torch.__version__}; {args.dtype}; {' '.join(args.models)} attention shapes "
        f"(H, W <= {args.max_grid}) at batch {args.batch}; "
        f"cpu clock; {args.rounds} rounds of {args.inner} calls (median); {date.today()}"
    )
    print(header)
    try:
        rows = [row for shape in shapes for row in measure(shape, workers, args.rounds, args.inner)]
    finally:
        for worker in workers.values():
            worker.close()
    table = markdown(rows, names)
    print(table)
    if args.out_dir:
        write_report(args.out_dir, args.name, header, rows, table, command_line("glue_benchmark.py", argv))


if __name__ == "__main__":
    main()
