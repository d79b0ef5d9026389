"""torch.compile readiness of whole AA models: graph breaks (torch._dynamo.explain) and a fullgraph
forward + backward, checked against eager.

    python benchmarks/compile_check.py                          # aa_resnet50 (224), CPU
    python benchmarks/compile_check.py --models aa_resnet50 aa_wrn28_10 aa_mnasnet_100 --backend inductor

Prints one row per model: graphs, graph breaks (with reasons), whether ``torch.compile(model,
fullgraph=True)`` ran forward and backward, and the largest |difference| to eager of the output
and of the gradients (relative to their scale). ``--backend aot_eager`` (default) traces the
forward and the backward graphs without code generation (seconds on a CPU); ``inductor``
compiles them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import timm
import torch
from report import write_report

import aa_lightning  # noqa: F401  (registers the AA models)


def check(name: str, batch: int, backend: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name).to(device).train()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], device=device)

    explanation = torch._dynamo.explain(model)(x)
    row = {
        "model": name,
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "break_reasons": [str(r.reason) for r in explanation.break_reasons],
    }

    eager = model(x)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
        out.square().mean().backward()
    except Exception as err:  # noqa: BLE001  (reported in the table)
        row.update(fullgraph_fwd_bwd=f"failed: {type(err).__name__}: {str(err).splitlines()[0]}")
        return row
    row["fullgraph_fwd_bwd"] = f"ok ({time.perf_counter() - start:.0f} s incl. tracing)"
    row["max_rel_diff_output"] = ((out - eager).abs().max() / eager.abs().max()).item()
    row["max_rel_diff_grad"] = max(
        ((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        for p, g in zip(model.parameters(), eager_grads)
    )
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["aa_resnet50"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    header = (
        f"machine: {platform.machine()} {os.cpu_count()} cores; device {args.device}; torch {torch.__version__}; "
        f"compile backend {args.backend}; batch {args.batch}; {date.today()}"
    )
    print(header)
    rows = [check(name, args.batch, args.backend, torch.device(args.device)) for name in args.models]
    lines = [
        "| model | graphs | graph breaks | fullgraph forward + backward | max rel. diff output | max rel. diff grads |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['graphs']} | {r['graph_breaks']}"
            f"{' ' + '; '.join(r['break_reasons']) if r['break_reasons'] else ''} "
            f"| {r['fullgraph_fwd_bwd']} | {r.get('max_rel_diff_output', float('nan')):.1e} "
            f"| {r.get('max_rel_diff_grad', float('nan')):.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    write_report(args.out_dir, "compile_check", header, rows, table)


if __name__ == "__main__":
    main()
