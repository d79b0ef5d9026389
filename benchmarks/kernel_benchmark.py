"""The CPU attention kernels side by side at a model's own attention shapes.

For every distinct AA layer shape of ``--model`` (map H x W after any stride, dkh, dvh; B =
``--batch``, Nh from the model), times the attention op alone, forward and forward + backward,
for:
  tiled     the float32 kernel built for these head dims, relative tables computed inside
            (what ``backend="cpu_kernel"`` runs in float32)
  generic   the any-dims kernel on relative tables built in torch (the fallback when the
            per-dims build fails)
  chunked   the same factorization in plain torch ops (``backend="chunked"``)
The variants take turns round by round; each number is the median round. ns/logit divides by
B Nh (HW)^2.

Usage:  python benchmarks/kernel_benchmark.py --model aa_resnet50 --batch 8 --out-dir docs/benchmarks
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from typing import Callable

import timm
import torch
from torch import Tensor

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.layers import AugmentedConv2d, cpu_kernel, factorized_bias_attention, relative_logit_tables
from report import command_line, write_report

Attention = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _with_tables(kernel: Callable[..., Tensor]) -> Attention:
    def run(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
        b, nh, h, w, d = q.shape
        s_w, s_h = relative_logit_tables(q, rel_h, rel_w)
        flat = lambda t: t.reshape(b * nh, h * w, t.shape[-1])  # noqa: E731
        return kernel(flat(q), flat(k), flat(v), flat(s_w), flat(s_h))
    return run


def _tiled(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    b, nh, h, w, d = q.shape
    grid = lambda t: t.reshape(b * nh, h, w, t.shape[-1])  # noqa: E731
    return cpu_kernel.cpu_kernel_relative_attention(grid(q), grid(k), grid(v), rel_h, rel_w)


VARIANTS: dict[str, Attention] = {
    "tiled": _tiled,
    "generic": _with_tables(cpu_kernel.cpu_kernel_attention),
    "chunked": _with_tables(factorized_bias_attention),
}


def attention_shapes(model_name: str, batch: int) -> list[tuple[int, int, int, int, int, int]]:
    """Distinct (B, Nh, H, W, dkh, dvh) of the model's AA layers, in network order."""
    model = timm.create_model(model_name)
    shapes = []
    for layer in model.modules():
        if isinstance(layer, AugmentedConv2d) and layer.qkv is not None:
            h, w = layer.feat_size
            h, w = -(-h // layer.stride), -(-w // layer.stride)
            shape = (batch, layer.num_heads, h, w, layer.dk // layer.num_heads, layer.dv // layer.num_heads)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def measure(shape: tuple[int, ...], rounds: int) -> list[dict]:
    b, nh, h, w, dkh, dvh = shape
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(b, nh, h, w, dkh, generator=g) * dkh**-0.5).requires_grad_()
    k, v = torch.randn(b, nh, h, w, dkh, generator=g).requires_grad_(), torch.randn(b, nh, h, w, dvh, generator=g).requires_grad_()
    rel_h = (torch.randn(2 * h - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    rel_w = (torch.randn(2 * w - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    inputs = (q, k, v, rel_h, rel_w)
    grad = torch.randn(b * nh, h * w, dvh, generator=g)

    def forward(attention: Attention) -> None:
        with torch.no_grad():
            attention(*inputs)

    def train(attention: Attention) -> None:
        out = attention(*inputs).reshape(grad.shape)
        torch.autograd.grad(out, inputs, grad)

    times = {name: {"forward": [], "forward+backward": []} for name in VARIANTS}
    for name, attention in VARIANTS.items():  # warm-up (builds the kernels)
        forward(attention), train(attention)
    for _ in range(rounds):
        for name, attention in VARIANTS.items():
            times[name]["forward"].append(time_ms(lambda: forward(attention)))
            times[name]["forward+backward"].append(time_ms(lambda: train(attention)))
    logits = b * nh * (h * w) ** 2
    rows = []
    for name, by_pass in times.items():
        for pass_, values in by_pass.items():
            ms = statistics.median(values)
            rows.append({"B": b, "Nh": nh, "HxW": f"{h}x{w}", "dkh": dkh, "dvh": dvh, "variant": name, "pass": pass_,
                         "ms": round(ms, 2), "ns_per_logit": round(ms * 1e6 / logits, 3)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| HxW | dkh | dvh | pass | tiled ms (ns/logit) | generic ms | chunked ms | generic / tiled | chunked / tiled |",
             "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["HxW"], r["pass"], r["variant"]): r for r in rows}
    for (hw, pass_, variant), r in keyed.items():
        if variant != "tiled":
            continue
        gen, chk = keyed[(hw, pass_, "generic")]["ms"], keyed[(hw, pass_, "chunked")]["ms"]
        lines.append(f"| {hw} | {r['dkh']} | {r['dvh']} | {pass_} | {r['ms']:.1f} ({r['ns_per_logit']:.2f}) | {gen:.1f} | "
                     f"{chk:.1f} | {gen / r['ms']:.2f} | {chk / r['ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="aa_resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default=None, help="also write <name>.json and <name>.md here")
    p.add_argument("--name", default="kernels")
    args = p.parse_args(argv)
    if not cpu_kernel.available():
        raise SystemExit("the CPU kernel is not available here (no C compiler, or AA_LIGHTNING_CPU_KERNEL=0)")
    header = (f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
              f"torch {torch.__version__}; float32; {args.model} attention shapes at batch {args.batch}; "
              f"{args.rounds} rounds (median); {date.today()}")
    print(header)
    rows = []
    for shape in attention_shapes(args.model, args.batch):
        rows += measure(shape, args.rounds)
    table = markdown(rows)
    print(table)
    if args.out_dir:
        write_report(args.out_dir, args.name, header, rows, table, command_line("kernel_benchmark.py", argv))


if __name__ == "__main__":
    main()
