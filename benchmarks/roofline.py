"""The real limit of exact 2-D relative attention on this machine, and where the CPU kernel stands.

Measures three rates here, then prices the operations every exact, memory-lean (recomputing)
attention must do at each attention shape of the zoo, and puts the kernel's measured time beside
that floor.

Rates (all on ``--threads`` torch / OpenMP threads, default 2):
  gemm      torch.matmul FLOP/s: at the attention's own small inner dims ([HW, dkh] x [dkh, HW]
            for every zoo shape; shown for information: the product writes the (HW)^2 output, which
            a fused kernel does not) and on a large square product (``--gemm-size``), the dense
            rate the floor uses. float32, and bfloat16 (mkldnn; AVX512-BF16 / AMX where present).
  exp       2^x per second of the kernel's own vectorized exponential: a C loop over an L1-resident
            row (load, subtract the row max, exp, accumulate, as the kernel's softmax does) built
            from ``factorized_attention_tiled.c`` itself with build.py's flags and cache, once per
            polynomial the kernel has (the float32 one; the bfloat16 path's short one).
  bandwidth large tensor copy, bytes read + written per second.

Counted operations per logit (i, j) and pass, from the shapes (dkh, dvh: head dims; HW: positions):
  forward:             q_i . k_j (dkh multiply-adds), p_ij v_j (dvh): dkh + dvh; 1 exponential.
  backward (recomputing the logits from the saved log-sum-exp, as the kernel and FlashAttention do):
                       q_i . k_j again (dkh), dP_ij = dO_i . v_j (dvh), dV_j += p_ij dO_i (dvh),
                       dK_j += dS_ij q_i (dkh), dQ_i += dS_ij k_j (dkh): 3 dkh + 2 dvh; 1 exponential.
  forward + backward:  4 dkh + 3 dvh multiply-adds (18 at dkh 3 / dvh 2, 86 at dkh 20 / dvh 2) and
                       2 exponentials per logit.
  The relative logits (q . r^W, q . r^H per query row and their gradients: (H + W) dkh per row, i.e.
  (H + W) / HW of a logit's dkh) and the softmax's adds are left out: the floor is a lower bound.
  logits = B Nh (HW)^2 per layer.
Floor of a pass = 2 x multiply-adds / (dense GEMM FLOP/s) + exponentials / (exp rate), or the
bytes it must move (q, k, v read; out written; backward: also out, dO read and dq, dk, dv written,
4 bytes per float32 element) / bandwidth where that is larger. The products and the exponentials
run on the same vector units, so their times add. bfloat16 autocast: the products priced at the
bfloat16 GEMM rate, the exponentials at the bfloat16 path's exp rate.

Kernel: the op ``backend="cpu_kernel"`` runs (``aa_lightning.kernels.cpu.cpu_relative_attention``,
glue included), forward under no_grad and forward + backward, fp32 inputs and bf16 inputs under
bf16 autocast; the variants take turns round by round; median round. "fraction" = floor / kernel
time (1.0: at the limit). Model rows: the sum over the model's AA layers (each distinct shape
times the number of layers that have it).

Shapes come from building the models (``timm.create_model``) and reading each AA layer's grid
(after its stride), heads and head dims: aa_resnet50, aa_wrn28_10 and aa_resnet50 with attention
in all four stages (the 56x56 shape).

Usage:  python benchmarks/roofline.py --out-dir docs/benchmarks
        python benchmarks/roofline.py --models aa_resnet50 --rounds 3 --batch 8
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path

import timm
import torch
from report import command_line, write_report

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.kernels.cpu import build as cpu_build
from aa_lightning.kernels.cpu.backend import cpu_relative_attention
from aa_lightning.layers import AugmentedConv2d

MODELS = {
    "aa_resnet50": ("aa_resnet50", {}),
    "aa_wrn28_10": ("aa_wrn28_10", {}),
    "aa_resnet50_all": ("aa_resnet50", {"aa_stages": [1, 2, 3, 4]}),
}
Shape = tuple[int, int, int, int, int, int]  # B, Nh, H, W, dkh, dvh


def attention_shapes(model_name: str, kwargs: dict, batch: int) -> Counter[Shape]:
    """{(B, Nh, H, W, dkh, dvh): number of AA layers with it} of the built model."""
    model = timm.create_model(model_name, **kwargs)
    shapes: Counter[Shape] = Counter()
    for layer in model.modules():
        if isinstance(layer, AugmentedConv2d) and layer.qkv is not None:
            h, w = layer.feat_size
            h, w = -(-h // layer.stride), -(-w // layer.stride)
            nh = layer.num_heads
            shapes[(batch, nh, h, w, layer.dk // nh, layer.dv // nh)] += 1
    return shapes


def median_time(fn: Callable[[], object], min_seconds: float = 0.2, rounds: int = 5) -> float:
    """Median seconds per call over ``rounds`` rounds of enough calls to last ``min_seconds``."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / rounds or calls == 0:
        fn()
        calls += 1
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of torch.matmul [m, k] x [k, n] (2 m k n FLOP) into a preallocated output."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    return 2 * m * k * n / median_time(lambda: torch.matmul(a, b, out=out))


def bandwidth() -> float:
    """Bytes per second (read + written) of a 256 MiB float32 copy."""
    src = torch.randn(64 << 20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), min_seconds=1.0)


_EXP_HARNESS = r"""
/* The exponential's throughput, as the kernel's softmax uses it (appended to the kernel source). */
float aa_exp_loop(long n, long repeats, long threads, float* buffers) {
    float total = 0.0f;
    _Pragma("omp parallel for num_threads(threads) reduction(+:total)")
    for (long t = 0; t < threads; ++t) {
        const float* x = buffers + t * n;
        vf acc = splat(0.0f), acc2 = splat(0.0f);
        const vf m = splat(0.25f);
        for (long r = 0; r < repeats; ++r)
            for (long j = 0; j < n; j += 2 * VW) {
                acc += AA_EXP(load(x + j) - m);
                acc2 += AA_EXP(load(x + j + VW) - m);
            }
        total += hsum(acc + acc2);
    }
    return total;
}
"""


def exp_rate(threads: int, defines: tuple[str, ...] = ()) -> float:
    """2^x per second of the kernel's vexp2 (with ``defines``: e.g. the bfloat16 path's polynomial),
    16-float vectors where the CPU has AVX-512, ``threads`` OpenMP threads, a 4096-float row each."""
    source = cpu_build._TILED_SOURCE.read_text() + _EXP_HARNESS
    path = Path(tempfile.mkdtemp(prefix="aa_roofline_")) / "exp_rate.c"
    path.write_text(source)
    wide = ("-DAA_VW=16",) if cpu_build._has_avx512() else ()
    lib = cpu_build._build(path, "(roofline)", ("-DAA_D=1", "-DAA_DV=1", *wide, *defines))
    if lib is None:
        raise SystemExit("the exp harness does not build here")
    lib.aa_exp_loop.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    lib.aa_exp_loop.restype = ctypes.c_float
    n, repeats = 4096, 2000
    x = -torch.rand(threads, n) * 30  # logits minus their max: [-30, 0]
    seconds = median_time(lambda: lib.aa_exp_loop(n, repeats, threads, x.data_ptr()), min_seconds=0.5)
    return threads * n * repeats / seconds


def counts(shape: Shape) -> dict[str, dict[str, float]]:
    """Multiply-adds, exponentials and bytes moved per layer, forward and forward + backward (docstring)."""
    b, nh, h, w, dkh, dvh = shape
    logits = b * nh * (h * w) ** 2
    elements = b * nh * h * w
    fwd_bytes = 4 * elements * (2 * dkh + 2 * dvh)  # q, k, v read, out written
    bwd_bytes = 4 * elements * (2 * dkh + 3 * dvh + 2 * dkh + dvh + 1)  # + out, dO, lse read; dq, dk, dv written
    return {
        "forward": {"madds": logits * (dkh + dvh), "exps": logits, "bytes": fwd_bytes},
        "forward+backward": {
            "madds": logits * (4 * dkh + 3 * dvh),
            "exps": 2 * logits,
            "bytes": fwd_bytes + bwd_bytes,
        },
    }


def floor_seconds(count: dict[str, float], gemm: float, exp: float, bw: float) -> float:
    return max(2 * count["madds"] / gemm + count["exps"] / exp, count["bytes"] / bw)


def kernel_times(shape: Shape, rounds: int) -> dict[tuple[str, str], float]:
    """{(dtype, pass): median seconds} of the cpu_kernel backend's op at ``shape``, variants alternating."""
    b, nh, h, w, dkh, dvh = shape
    g = torch.Generator().manual_seed(0)
    base = {
        "q": torch.randn(b, nh, h, w, dkh, generator=g),
        "k": torch.randn(b, nh, h, w, dkh, generator=g),
        "v": torch.randn(b, nh, h, w, dvh, generator=g),
    }
    rel_h = (torch.randn(2 * h - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    rel_w = (torch.randn(2 * w - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    grad = torch.randn(b, nh, h, w, dvh, generator=g)
    inputs = {
        dtype: [t.to(getattr(torch, dtype)).requires_grad_() for t in base.values()]
        for dtype in ("float32", "bfloat16")
    }

    def run(dtype: str, pass_: str) -> None:
        q, k, v = inputs[dtype]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            if pass_ == "forward":
                with torch.no_grad():
                    cpu_relative_attention(q, k, v, rel_h, rel_w)
            else:
                out = cpu_relative_attention(q, k, v, rel_h, rel_w)
                torch.autograd.grad(out, (q, k, v, rel_h, rel_w), grad.to(out.dtype))

    variants = [(d, p) for d in ("float32", "bfloat16") for p in ("forward", "forward+backward")]
    for variant in variants:  # warm-up: builds the kernels
        run(*variant)
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            start = time.perf_counter()
            run(*variant)
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def measure_rates(threads: int, gemm_size: int, dims: list[tuple[int, int]]) -> dict:
    rates = {
        "bandwidth_bytes_per_s": bandwidth(),
        "exp_per_s": {
            "float32": exp_rate(threads),
            "bfloat16": exp_rate(threads, (f"-DAA_EXP_DEGREE={cpu_build.BF16_EXP_DEGREE}",)),
        },
        "gemm_flop_per_s": {
            dtype: gemm_rate(gemm_size, gemm_size, gemm_size, getattr(torch, dtype))
            for dtype in ("float32", "bfloat16")
        },
        "gemm_small_flop_per_s": {
            f"[{hw}, {dkh}] x [{dkh}, {hw}] {dtype}": gemm_rate(hw, dkh, hw, getattr(torch, dtype))
            for hw, dkh in dims
            for dtype in ("float32", "bfloat16")
        },
    }
    return rates


def rows_for(models: list[str], batch: int, rounds: int, rates: dict) -> list[dict]:
    rows = []
    seen: dict[Shape, dict] = {}
    for name in models:
        model_name, kwargs = MODELS[name]
        total: dict[tuple[str, str], list[float]] = {}
        for shape, layers in attention_shapes(model_name, kwargs, batch).items():
            if shape not in seen:
                seen[shape] = kernel_times(shape, rounds)
            measured = seen[shape]
            b, nh, h, w, dkh, dvh = shape
            for (dtype, pass_), seconds in measured.items():
                count = counts(shape)[pass_]
                floor = floor_seconds(
                    count,
                    rates["gemm_flop_per_s"][dtype],
                    rates["exp_per_s"][dtype],
                    rates["bandwidth_bytes_per_s"],
                )
                rows.append(
                    {
                        "model": name,
                        "layers": layers,
                        "B": b,
                        "Nh": nh,
                        "HxW": f"{h}x{w}",
                        "dkh": dkh,
                        "dvh": dvh,
                        "dtype": dtype,
                        "pass": pass_,
                        "madds_per_logit": count["madds"] / (b * nh * (h * w) ** 2),
                        "floor_ms": floor * 1e3,
                        "products_ms": 2 * count["madds"] / rates["gemm_flop_per_s"][dtype] * 1e3,
                        "exps_ms": count["exps"] / rates["exp_per_s"][dtype] * 1e3,
                        "kernel_ms": seconds * 1e3,
                        "fraction": floor / seconds,
                    }
                )
                t = total.setdefault((dtype, pass_), [0.0, 0.0])
                t[0] += layers * floor
                t[1] += layers * seconds
        for (dtype, pass_), (floor, seconds) in total.items():
            rows.append(
                {
                    "model": name,
                    "layers": "all",
                    "HxW": "(model)",
                    "dtype": dtype,
                    "pass": pass_,
                    "floor_ms": floor * 1e3,
                    "kernel_ms": seconds * 1e3,
                    "fraction": floor / seconds,
                }
            )
        print(f"{name}: measured", flush=True)
    return rows


def markdown(rows: list[dict], rates: dict) -> str:
    g = rates["gemm_flop_per_s"]
    e = rates["exp_per_s"]
    lines = [
        f"Rates: dense GEMM float32 {g['float32'] / 1e9:.0f} GFLOP/s, bfloat16 {g['bfloat16'] / 1e9:.0f} GFLOP/s; "
        f"exp float32 {e['float32'] / 1e9:.2f} G/s, bfloat16 path {e['bfloat16'] / 1e9:.2f} G/s; "
        f"copy {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
        "GEMM at the attention's inner dims (information; writes the (HW)^2 output): "
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates["gemm_small_flop_per_s"].items())
        + " GFLOP/s.",
        "",
        "| model | layers | HxW | dkh | dvh | dtype | pass | madds/logit | floor ms (products + exps) "
        "| kernel ms | fraction of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["layers"] == "all":
            lines.append(
                f"| **{r['model']}** | all | | | | {r['dtype']} | {r['pass']} | | {r['floor_ms']:.1f} "
                f"| {r['kernel_ms']:.1f} | **{r['fraction']:.2f}** |"
            )
        else:
            lines.append(
                f"| {r['model']} | {r['layers']} | {r['HxW']} | {r['dkh']} | {r['dvh']} | {r['dtype']} | {r['pass']} "
                f"| {r['madds_per_logit']:.0f} | {r['floor_ms']:.2f} ({r['products_ms']:.2f} + {r['exps_ms']:.2f}) "
                f"| {r['kernel_ms']:.2f} | {r['fraction']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--out-dir", default=None, help="also write <name>.json and <name>.md here")
    p.add_argument("--name", default="roofline")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_build.available():
        raise SystemExit("the CPU kernel is not available here (no C compiler, or AA_LIGHTNING_CPU_KERNEL=0)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    header = (
        f"machine: {platform.machine()} {cpu} {os.cpu_count()} cores, threads {args.threads}; "
        f"torch {torch.__version__}; batch {args.batch}; {args.rounds} rounds (median, variants alternating); "
        f"{date.today()}"
    )
    print(header, flush=True)
    dims = sorted(
        {
            (s[2] * s[3], s[4])
            for name in args.models
            for s in attention_shapes(MODELS[name][0], MODELS[name][1], args.batch)
        }
    )
    rates = measure_rates(args.threads, args.gemm_size, dims)
    rows = rows_for(args.models, args.batch, args.rounds, rates)
    table = markdown(rows, rates)
    print(table)
    if args.out_dir:
        write_report(
            args.out_dir, args.name, header, rows, table, command_line("roofline.py", argv), rates=rates
        )


if __name__ == "__main__":
    main()
