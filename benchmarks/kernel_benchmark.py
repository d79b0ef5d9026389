"""The CPU attention kernels side by side at a model's own attention shapes.

For every distinct AA layer shape of ``--model`` (map H x W after any stride, dkh, dvh; B =
``--batch``, Nh from the model), times the attention op alone, forward and forward + backward,
for:
  tiled     the float32 kernel built for these head dims, relative tables computed inside
            (what ``backend="cpu_kernel"`` runs in float32)
  generic   the any-dims kernel on relative tables built in torch (the fallback when the
            per-dims build fails)
  chunked   the same factorization in plain torch ops (``backend="chunked"``)
  tiled@REV the tiled kernel as it was at git revision REV (``--against REV``), built from that
            revision's C source the same way: a change to the kernel measured against the old one
The variants take turns round by round; each number is the median round, and "rounds" gives the
spread of the per-round ratios (the rounds alternate, so round t of each variant ran side by side).
ns/logit divides by B Nh (HW)^2.

Usage:  python benchmarks/kernel_benchmark.py --model aa_resnet50 --batch 8 --out-dir docs/benchmarks
        python benchmarks/kernel_benchmark.py --model aa_wrn28_10 --against HEAD~3 --variants tiled generic --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import timm
import torch
from report import command_line, write_report
from torch import Tensor

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.attention import factorized_bias_attention, relative_logit_tables
from aa_lightning.kernels.cpu import build as cpu_build
from aa_lightning.kernels.cpu import ops as cpu_kernel
from aa_lightning.layers import AugmentedConv2d

Attention = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _with_tables(kernel: Callable[..., Tensor]) -> Attention:
    def run(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
        b, nh, h, w, d = q.shape
        s_w, s_h = relative_logit_tables(q, rel_h, rel_w)
        flat = lambda t: t.reshape(b * nh, h * w, t.shape[-1])  # noqa: E731
        return kernel(flat(q), flat(k), flat(v), flat(s_w), flat(s_h))

    return run


def _tiled(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    return cpu_kernel.cpu_kernel_relative_attention(q, k, v, rel_h, rel_w)


VARIANTS: dict[str, Attention] = {
    "tiled": _tiled,
    "generic": _with_tables(cpu_kernel.cpu_kernel_attention),
    "chunked": _with_tables(factorized_bias_attention),
}


def tiled_at(revision: str) -> Attention:
    """The tiled kernel built from ``revision``'s C source (``git show``), run through the same op."""
    for where in ("aa_lightning/kernels/cpu", "aa_lightning/layers"):  # the folder before and after the redesign
        shown = subprocess.run(
            ["git", "show", f"{revision}:{where}/factorized_attention_tiled.c"], capture_output=True, text=True
        )
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = Path(tempfile.mkdtemp(prefix="aa_kernel_")) / "factorized_attention_tiled.c"
    path.write_text(source)

    @functools.cache
    def library(dkh: int, dvh: int, wide: bool = False, bf16: bool = False):
        exp = (f"-DAA_EXP_DEGREE={cpu_build.BF16_EXP_DEGREE}",) if bf16 else ()  # older sources ignore it
        lib = cpu_build._build(
            path, "(benchmark)", (f"-DAA_D={dkh}", f"-DAA_DV={dvh}", *(("-DAA_VW=16",) if wide else ()), *exp)
        )
        if lib is None:
            raise SystemExit(f"the tiled kernel of {revision} does not build here")
        return cpu_build._bind_tiled(lib)

    def run(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
        return _tiled(q, k, v, rel_h, rel_w)

    run.tiled_library = library  # measure() swaps it in around forward and backward
    return run


def layer_attention_shapes(model_name: str, batch: int, **model_kwargs) -> list[tuple[int, int, int, int, int, int]]:
    """(B, Nh, H, W, dkh, dvh) of each of the built model's AA layers (its grid after the stride), in network order."""
    model = timm.create_model(model_name, **model_kwargs)
    shapes = []
    for layer in model.modules():
        if isinstance(layer, AugmentedConv2d) and layer.qkv is not None:
            h, w = layer.feat_size
            h, w = -(-h // layer.stride), -(-w // layer.stride)
            shapes.append((batch, layer.num_heads, h, w, layer.dk // layer.num_heads, layer.dv // layer.num_heads))
    return shapes


def attention_shapes(model_name: str, batch: int) -> list[tuple[int, int, int, int, int, int]]:
    """Distinct (B, Nh, H, W, dkh, dvh) of the model's AA layers, in network order."""
    return list(dict.fromkeys(layer_attention_shapes(model_name, batch)))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_ms(fn: Callable[[], object]) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1000


@contextlib.contextmanager
def _library_of(attention: Attention) -> Iterator[None]:
    """Inside the block, the tiled op runs ``attention``'s own build of the kernel, if it has one."""
    library = getattr(attention, "tiled_library", None)
    current = cpu_build._tiled_library
    if library is not None:
        cpu_build._tiled_library = library
    try:
        yield
    finally:
        cpu_build._tiled_library = current


def measure(shape: tuple[int, ...], rounds: int, variants: dict[str, Attention]) -> list[dict]:
    b, nh, h, w, dkh, dvh = shape
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(b, nh, h, w, dkh, generator=g) * dkh**-0.5).requires_grad_()
    k, v = (
        torch.randn(b, nh, h, w, dkh, generator=g).requires_grad_(),
        torch.randn(b, nh, h, w, dvh, generator=g).requires_grad_(),
    )
    rel_h = (torch.randn(2 * h - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    rel_w = (torch.randn(2 * w - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    inputs = (q, k, v, rel_h, rel_w)
    grad = torch.randn(b * nh, h * w, dvh, generator=g)

    def forward(attention: Attention) -> None:
        with torch.no_grad(), _library_of(attention):
            attention(*inputs)

    def train(attention: Attention) -> None:
        with _library_of(attention):
            out = attention(*inputs).reshape(grad.shape)
            torch.autograd.grad(out, inputs, grad)

    times = {name: {"forward": [], "forward+backward": []} for name in variants}
    for attention in variants.values():  # warm-up (builds the kernels)
        forward(attention), train(attention)
    for _ in range(rounds):
        for name, attention in variants.items():
            times[name]["forward"].append(time_ms(lambda attention=attention: forward(attention)))
            times[name]["forward+backward"].append(time_ms(lambda attention=attention: train(attention)))
    logits = b * nh * (h * w) ** 2
    rows = []
    for name, by_pass in times.items():
        for pass_, values in by_pass.items():
            ms = statistics.median(values)
            rows.append(
                {
                    "B": b,
                    "Nh": nh,
                    "HxW": f"{h}x{w}",
                    "dkh": dkh,
                    "dvh": dvh,
                    "variant": name,
                    "pass": pass_,
                    "ms": round(ms, 2),
                    "ns_per_logit": round(ms * 1e6 / logits, 3),
                    "rounds_ms": [round(t, 3) for t in values],
                }
            )
    return rows


def markdown(rows: list[dict], variants: list[str]) -> str:
    """One line per shape and pass: the tiled kernel's time, the others' and their time / tiled time
    (the median rounds', then the min..max of the per-round ratios)."""
    others = [v for v in variants if v != "tiled"]
    lines = [
        "| HxW | dkh | dvh | pass | tiled ms (ns/logit) | "
        + " | ".join(f"{v} ms" for v in others)
        + "".join(f" | {v} / tiled (rounds)" for v in others)
        + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(others)),
    ]
    keyed = {(r["HxW"], r["pass"], r["variant"]): r for r in rows}
    for (hw, pass_, variant), r in keyed.items():
        if variant != "tiled":
            continue
        cells, ratios = [], []
        for v in others:
            o = keyed[(hw, pass_, v)]
            per_round = [a / b for a, b in zip(o["rounds_ms"], r["rounds_ms"])]
            cells.append(f"{o['ms']:.1f}")
            ratios.append(f"{o['ms'] / r['ms']:.2f} ({min(per_round):.2f}..{max(per_round):.2f})")
        lines.append(
            f"| {hw} | {r['dkh']} | {r['dvh']} | {pass_} | {r['ms']:.1f} ({r['ns_per_logit']:.2f}) | "
            + " | ".join(cells + ratios)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="aa_resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default=None, help="also write <name>.json and <name>.md here")
    p.add_argument("--name", default="kernels")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--against", metavar="REV", help="also time the tiled kernel of this git revision (tiled@REV)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: the process's CPU time, which other processes' load does not inflate (with --threads 1; "
        "with more threads it adds up the threads' time, spin-waits included)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    variants = {name: VARIANTS[name] for name in dict.fromkeys(["tiled", *args.variants])}
    if args.against:
        variants[f"tiled@{args.against}"] = tiled_at(args.against)
    if not cpu_build.available():
        raise SystemExit("the CPU kernel is not available here (no C compiler, or AA_LIGHTNING_CPU_KERNEL=0)")
    header = (
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}; float32; {args.model} attention shapes at batch {args.batch}; {args.clock} clock; "
        f"{args.rounds} rounds (median); {date.today()}"
    )
    print(header)
    rows = []
    for shape in attention_shapes(args.model, args.batch):
        rows += measure(shape, args.rounds, variants)
    table = markdown(rows, list(variants))
    print(table)
    if args.out_dir:
        write_report(args.out_dir, args.name, header, rows, table, command_line("kernel_benchmark.py", argv))


if __name__ == "__main__":
    main()
