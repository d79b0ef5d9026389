"""One AugmentedConv2d forward+backward per attention backend, against the content-only floor.

Every case runs in a fresh subprocess, so its peak memory is measured on its own: on CPU the
growth of the process's peak RSS over the RSS just before the case (ru_maxrss), on CUDA
``torch.cuda.max_memory_allocated``. Time is the median of ``--repeats`` runs after one warm-up.

Cases per map size S x S (layer: B 4, Fin = Fout = 256, Nh 8, k = 2v = 0.2 -> dk 48, dv 24):
  layer/<backend>  the relative AA layer with that attention backend
  layer/floor      the same layer with position='none': content-only scaled_dot_product_attention
  attn/<backend>, attn/floor   the attention op alone (relative_attention_2d) on the same q, k, v

Usage:  python benchmarks/layer_benchmark.py --sizes 14 28 56 --out-dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

import torch
from report import command_line, write_report

CASES = ("reference", "fused", "chunked", "cpu_kernel", "floor")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[14, 28, 56])
    p.add_argument("--backends", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--k", type=float, default=0.2)
    p.add_argument("--v", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--max-logits-gb",
        type=float,
        default=12.0,
        help="skip 'reference' when one (HW)^2 logits tensor would exceed this",
    )
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="layer")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    return p.parse_args(argv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(args: argparse.Namespace) -> dict:
    from aa_lightning.attention import relative_attention_2d
    from aa_lightning.layers import AugmentedConv2d, aa_dims

    kind, backend, size = args.case.split(":")
    size = int(size)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    dk, dv = aa_dims(args.channels, args.k, args.v, args.heads)
    layer = AugmentedConv2d(
        args.channels,
        args.channels,
        3,
        dk=dk,
        dv=dv,
        num_heads=args.heads,
        position="none" if backend == "floor" else "relative",
        feat_size=size,
        backend="auto" if backend == "floor" else backend,
    ).to(device)
    x = torch.randn(args.batch, args.channels, size, size, device=device)
    if kind == "attn":
        with torch.no_grad():
            q, k, v = (t.contiguous() for t in layer.attention_inputs(x))
        rel = (None, None) if backend == "floor" else layer.relative_tables(size, size)
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        rel = [None if t is None else t.detach().clone().requires_grad_() for t in rel]
        be = "auto" if backend == "floor" else backend

        def step():
            out = relative_attention_2d(*inputs, *rel, backend=be)
            out.backward(torch.ones_like(out))
    else:
        x.requires_grad_(True)

        def step():
            out = layer(x)
            out.backward(torch.ones_like(out))

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    with autocast:
        step()  # warm-up, also the memory measurement
    sync()
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with autocast:
            step()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "kind": kind,
        "backend": backend,
        "size": size,
        "dk": dk,
        "dv": dv,
        "time_s": statistics.median(times),
        "peak_mb": peak / 2**20,
    }


def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in args.sizes:
        logits_gb = args.batch * args.heads * (size * size) ** 2 * 4 / 2**30
        for kind in ("layer", "attn"):
            for backend in args.backends:
                if backend == "reference" and logits_gb > args.max_logits_gb:
                    rows.append(_unmeasured(kind, backend, size, f"skipped: logits {logits_gb:.0f} GB"))
                    continue
                cmd = [sys.executable, __file__, "--case", f"{kind}:{backend}:{size}"] + _passthrough(args)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append(_unmeasured(kind, backend, size, proc.stderr.strip().splitlines()[-1][:120]))
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(_fmt_row(rows[-1]), flush=True)
    return rows


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("batch", "channels", "heads", "k", "v", "repeats", "device", "dtype"):
        out += [f"--{key}", str(getattr(args, key))]
    return out


def _unmeasured(kind: str, backend: str, size: int, note: str) -> dict:
    """The row of a case that was skipped or failed: no time, no memory, why in ``note``."""
    return {"kind": kind, "backend": backend, "size": size, "time_s": None, "peak_mb": None, "note": note}


def _fmt_row(r: dict) -> str:
    if r.get("time_s") is None:
        return f"{r['kind']:5s} {r['backend']:9s} {r['size']:4d}  {r.get('note', '')}"
    return f"{r['kind']:5s} {r['backend']:9s} {r['size']:4d}  {r['time_s'] * 1000:9.1f} ms  {r['peak_mb']:9.1f} MB"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["kind"], r["backend"], r["size"]): r for r in rows}
    lines = []
    for kind, title in (
        ("layer", "AugmentedConv2d forward+backward"),
        ("attn", "attention op alone (relative_attention_2d) forward+backward"),
    ):
        lines += [
            f"#### {title}",
            "",
            "| HxW | backend | time (ms) | peak mem (MB) | time / floor | ref mem / mem | ref time / time |",
            "|---|---|---|---|---|---|---|",
        ]
        for size in args.sizes:
            floor, ref = by.get((kind, "floor", size)), by.get((kind, "reference", size))
            for backend in args.backends:
                r = by.get((kind, backend, size))
                if r is None:
                    continue
                if r.get("time_s") is None:
                    lines.append(f"| {size}x{size} | {backend} | — | — | {r.get('note', '')} | | |")
                    continue
                ratio = lambda a, b: f"{a / b:.2f}" if a and b else "—"  # noqa: E731
                lines.append(
                    f"| {size}x{size} | {backend} | {r['time_s'] * 1000:.1f} | {r['peak_mb']:.1f} | "
                    f"{ratio(r['time_s'], floor and floor.get('time_s'))} | "
                    f"{ratio(ref and ref.get('peak_mb'), r['peak_mb'])} | "
                    f"{ratio(ref and ref.get('time_s'), r['time_s'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def accuracy(args: argparse.Namespace, size: int = 14) -> dict:
    """Worst relative error (max-abs error / max-abs reference) of each backend vs reference, fp32."""
    from aa_lightning.attention import relative_attention_2d

    g = torch.Generator().manual_seed(0)
    dk, dv = 48, 24
    shapes = [
        (2, args.heads, size, size, dk // args.heads),
        (2, args.heads, size, size, dk // args.heads),
        (2, args.heads, size, size, dv // args.heads),
    ]
    base = [torch.randn(*s, generator=g) for s in shapes] + [
        torch.randn(2 * size - 1, dk // args.heads, generator=g) * 0.4 for _ in range(2)
    ]
    results, ref = {}, None
    for backend in ("reference", "fused", "chunked", "cpu_kernel"):
        inputs = [t.clone().requires_grad_() for t in base]
        out = relative_attention_2d(*inputs, backend=backend)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
        values = [out.detach()] + [t.grad for t in inputs]
        if ref is None:
            ref = values
            continue
        results[backend] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(values, ref))
    return results


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend in sorted({r["backend"] for r in rows}):
        pts = sorted(
            (r["size"] ** 2, r["time_s"], r["peak_mb"])
            for r in rows
            if r["kind"] == "layer" and r["backend"] == backend and r.get("time_s")
        )
        if not pts:
            continue
        hw = [p[0] for p in pts]
        axes[0].plot(hw, [p[1] * 1000 for p in pts], "o-", label=backend)
        axes[1].plot(hw, [p[2] for p in pts], "o-", label=backend)
    for ax, label in zip(axes, ("time (ms)", "peak memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("HW (positions)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("AugmentedConv2d forward+backward (B 4, Fin=Fout=256, Nh 8, k=2v=0.2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    torch_threads = torch.get_num_threads()
    header = (
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch threads {torch_threads}; "
        f"device {args.device}; dtype {args.dtype}; torch {torch.__version__}; {date.today()}"
    )
    print(header)
    errors = accuracy(args)
    print(
        "worst relative error vs reference (output and all gradients, fp32, 14x14):",
        {k: f"{v:.2e}" for k, v in errors.items()},
    )
    rows = run_all(args)
    table = markdown(rows, args)
    print(table)
    worst = (
        "Worst relative error vs reference (max-abs error / max-abs value, output and every gradient, fp32, 14x14): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    write_report(
        args.out_dir,
        args.name,
        header,
        rows,
        f"{worst}\n\n{table}",
        command_line("layer_benchmark.py", argv),
        errors=errors,
    )
    plot(rows, os.path.join(args.out_dir, f"{args.name}.png"))


if __name__ == "__main__":
    main()
