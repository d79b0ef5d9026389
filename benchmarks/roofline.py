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

On a machine that other processes load, ``--threads 1 --clock cpu`` times the process's own CPU time
(the rates and the kernel alike), which their load does not inflate.

Usage:  python benchmarks/roofline.py --out-dir docs/benchmarks
        python benchmarks/roofline.py --threads 1 --clock cpu --out-dir docs/benchmarks --name roofline_1thread
        python benchmarks/roofline.py --models aa_resnet50 --rounds 3 --batch 8
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from kernel_benchmark import CLOCKS, layer_attention_shapes
from report import command_line, write_report

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.kernels.cpu import build as cpu_build
from aa_lightning.kernels.cpu.backend import cpu_relative_attention

MODELS = {
    "aa_resnet50": ("aa_resnet50", {}),
    "aa_wrn28_10": ("aa_wrn28_10", {}),
    "aa_resnet50_all": ("aa_resnet50", {"aa_stages": [1, 2, 3, 4]}),
}
Shape = tuple[int, int, int, int, int, int]  # B, Nh, H, W, dkh, dvh


def attention_shapes(model_name: str, kwargs: dict, batch: int) -> Counter[Shape]:
    """{(B, Nh, H, W, dkh, dvh): number of AA layers with it} of the built model."""
    return Counter(layer_attention_shapes(model_name, batch, **kwargs))


clock = CLOCKS["wall"]


def seconds_per_call(fn: Callable[[], object], calls: int = 1) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


class Probes:
    """The rates, each timed once per call of :meth:`rates` (so that every round of the kernel's
    measurements has its own, taken under the same load): dense GEMM FLOP/s, exp/s of each of the
    kernel's exponentials, copy bytes/s."""

    def __init__(self, threads: int, gemm_size: int):
        n = gemm_size
        self.gemm = {
            dtype: (torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype), torch.empty(n, n, dtype=dtype))
            for dtype in (torch.float32, torch.bfloat16)
        }
        self.gemm_flop = 2 * n**3
        self.copy = (torch.randn(32 << 20), torch.empty(32 << 20))  # 128 MiB each way
        self.exp = {
            "float32": ExpLoop(threads),
            "bfloat16": ExpLoop(threads, (f"-DAA_EXP_DEGREE={cpu_build.BF16_EXP_DEGREE}",)),
        }
        self.rates()  # warm-up

    def rates(self) -> dict[str, float]:
        out = {}
        for dtype, (a, b, c) in self.gemm.items():
            name = str(dtype).removeprefix("torch.")
            product = lambda a=a, b=b, c=c: torch.matmul(a, b, out=c)  # noqa: E731
            out[f"gemm_{name}"] = self.gemm_flop / seconds_per_call(product, 2)
        for name, loop in self.exp.items():
            out[f"exp_{name}"] = loop.rate()
        src, dst = self.copy
        out["copy"] = 2 * src.numel() * 4 / seconds_per_call(lambda: dst.copy_(src), 2)
        return out


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of torch.matmul [m, k] x [k, n] (2 m k n FLOP) into a preallocated output, the median
    of 5 rounds of enough calls for ~40 ms."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    run = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    calls = max(1, int(0.04 / seconds_per_call(run, 3)))
    return 2 * m * k * n / statistics.median(seconds_per_call(run, calls) for _ in range(5))


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


class ExpLoop:
    """2^x per second of the kernel's vexp2 (with ``defines``: e.g. the bfloat16 path's polynomial),
    16-float vectors where the CPU has AVX-512, ``threads`` OpenMP threads, a 4096-float row each
    (L1-resident), built from the kernel's own source with build.py's flags and cache."""

    def __init__(self, threads: int, defines: tuple[str, ...] = ()):
        source = cpu_build._TILED_SOURCE.read_text() + _EXP_HARNESS
        path = Path(tempfile.mkdtemp(prefix="aa_roofline_")) / "exp_rate.c"
        path.write_text(source)
        wide = ("-DAA_VW=16",) if cpu_build._has_avx512() else ()
        lib = cpu_build._build(path, "(roofline)", ("-DAA_D=1", "-DAA_DV=1", *wide, *defines))
        if lib is None:
            raise SystemExit("the exp harness does not build here")
        lib.aa_exp_loop.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
        lib.aa_exp_loop.restype = ctypes.c_float
        self.lib, self.threads, self.n, self.repeats = lib, threads, 4096, 20000  # ~10-40 ms a probe
        self.x = -torch.rand(threads, self.n) * 30  # logits minus their max: [-30, 0]

    def rate(self) -> float:
        seconds = seconds_per_call(lambda: self.lib.aa_exp_loop(self.n, self.repeats, self.threads, self.x.data_ptr()))
        return self.threads * self.n * self.repeats / seconds


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


def floor_seconds(count: dict[str, float], dtype: str, rates: dict[str, float]) -> tuple[float, float, float]:
    """(floor, its products' part, its exponentials' part) in seconds at ``rates`` (:meth:`Probes.rates`)."""
    products = 2 * count["madds"] / rates[f"gemm_{dtype}"]
    exps = count["exps"] / rates[f"exp_{dtype}"]
    return max(products + exps, count["bytes"] / rates["copy"]), products, exps


VARIANTS = [(d, p) for d in ("float32", "bfloat16") for p in ("forward", "forward+backward")]


def kernel_rounds(shape: Shape, rounds: int, probes: Probes) -> list[dict]:
    """Per round: the rates (:class:`Probes`), then the seconds of each (dtype, pass) of the op
    ``backend="cpu_kernel"`` runs at ``shape``, the variants taking turns."""
    b, nh, h, w, dkh, dvh = shape
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(b, nh, h, w, d, generator=g) for d in (dkh, dkh, dvh)]
    rel_h = (torch.randn(2 * h - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    rel_w = (torch.randn(2 * w - 1, dkh, generator=g) * dkh**-0.5).requires_grad_()
    grad = torch.randn(b, nh, h, w, dvh, generator=g)
    inputs = {dtype: [t.to(getattr(torch, dtype)).requires_grad_() for t in base] for dtype in ("float32", "bfloat16")}

    def run(dtype: str, pass_: str) -> None:
        q, k, v = inputs[dtype]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            if pass_ == "forward":
                with torch.no_grad():
                    cpu_relative_attention(q, k, v, rel_h, rel_w)
            else:
                out = cpu_relative_attention(q, k, v, rel_h, rel_w)
                torch.autograd.grad(out, (q, k, v, rel_h, rel_w), grad.to(out.dtype))

    for variant in VARIANTS:  # warm-up: builds the kernels
        run(*variant)
    result = []
    for _ in range(rounds):
        record = {"rates": probes.rates()}
        for variant in VARIANTS:
            record[variant] = seconds_per_call(lambda variant=variant: run(*variant))
        result.append(record)
    return result


def rows_for(models: list[str], batch: int, rounds: int, probes: Probes) -> tuple[list[dict], list[dict]]:
    """A row per (model, shape, dtype, pass) and per (model, dtype, pass) summed over its layers:
    the median round's kernel time and floor, and the median of the per-round fractions."""
    rows = []
    seen: dict[Shape, list[dict]] = {}
    for name in models:
        model_name, kwargs = MODELS[name]
        shapes = attention_shapes(model_name, kwargs, batch)
        for shape in shapes:
            if shape not in seen:
                seen[shape] = kernel_rounds(shape, rounds, probes)
        for dtype, pass_ in VARIANTS:
            totals = [[0.0, 0.0] for _ in range(rounds)]
            for shape, layers in shapes.items():
                b, nh, h, w, dkh, dvh = shape
                count = counts(shape)[pass_]
                floors = [floor_seconds(count, dtype, rec["rates"]) for rec in seen[shape]]
                kernel = [rec[(dtype, pass_)] for rec in seen[shape]]
                for total, f, t in zip(totals, floors, kernel):
                    total[0] += layers * f[0]
                    total[1] += layers * t
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
                        "floor_ms": statistics.median(f[0] for f in floors) * 1e3,
                        "products_ms": statistics.median(f[1] for f in floors) * 1e3,
                        "exps_ms": statistics.median(f[2] for f in floors) * 1e3,
                        "kernel_ms": statistics.median(kernel) * 1e3,
                        "fraction": statistics.median(f[0] / t for f, t in zip(floors, kernel)),
                        "rounds_fraction": [round(f[0] / t, 3) for f, t in zip(floors, kernel)],
                    }
                )
            rows.append(
                {
                    "model": name,
                    "layers": "all",
                    "HxW": "(model)",
                    "dtype": dtype,
                    "pass": pass_,
                    "floor_ms": statistics.median(f for f, _ in totals) * 1e3,
                    "kernel_ms": statistics.median(t for _, t in totals) * 1e3,
                    "fraction": statistics.median(f / t for f, t in totals),
                    "rounds_fraction": [round(f / t, 3) for f, t in totals],
                }
            )
        print(f"{name}: measured", flush=True)
    return rows, [record for records in seen.values() for record in records]


def rate_summary(records: list[dict]) -> dict[str, dict[str, float]]:
    """{rate: {median, max}} over every round's probes."""
    names = records[0]["rates"]
    return {
        n: {"median": statistics.median(r["rates"][n] for r in records), "max": max(r["rates"][n] for r in records)}
        for n in names
    }


def markdown(rows: list[dict], rates: dict[str, dict[str, float]], small: dict[str, float]) -> str:
    def rate(name: str, scale: float, unit: str) -> str:
        digits = 2 if unit == "G/s" else 0
        return f"{rates[name]['median'] / scale:.{digits}f} {unit} (best {rates[name]['max'] / scale:.{digits}f})"

    lines = [
        "Rates (median of the rounds' probes; best round in brackets): dense GEMM float32 "
        + rate("gemm_float32", 1e9, "GFLOP/s")
        + ", bfloat16 "
        + rate("gemm_bfloat16", 1e9, "GFLOP/s")
        + "; exp float32 "
        + rate("exp_float32", 1e9, "G/s")
        + ", bfloat16 path "
        + rate("exp_bfloat16", 1e9, "G/s")
        + "; copy "
        + rate("copy", 1e9, "GB/s")
        + ".",
        "",
        "GEMM at the attention's inner dims (information: it writes the (HW)^2 output a fused kernel keeps in "
        "cache): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in small.items()) + " GFLOP/s.",
        "",
        "| model | layers | HxW | dkh | dvh | dtype | pass | madds/logit | floor ms (products + exps) "
        "| kernel ms | fraction of floor (rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f"{min(r['rounds_fraction']):.2f}..{max(r['rounds_fraction']):.2f}"
        if r["layers"] == "all":
            lines.append(
                f"| **{r['model']}** | all | | | | {r['dtype']} | {r['pass']} | | {r['floor_ms']:.1f} "
                f"| {r['kernel_ms']:.1f} | **{r['fraction']:.2f}** ({spread}) |"
            )
        else:
            lines.append(
                f"| {r['model']} | {r['layers']} | {r['HxW']} | {r['dkh']} | {r['dvh']} | {r['dtype']} | {r['pass']} "
                f"| {r['madds_per_logit']:.0f} | {r['floor_ms']:.2f} ({r['products_ms']:.2f} + {r['exps_ms']:.2f}) "
                f"| {r['kernel_ms']:.2f} | {r['fraction']:.2f} ({spread}) |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gemm-size", type=int, default=1536, help="the large square GEMM's side")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: the process's CPU time, which other processes' load does not inflate (with --threads 1; "
        "with more threads it adds up the threads' time, spin-waits included)",
    )
    p.add_argument("--out-dir", default=None, help="also write <name>.json and <name>.md here")
    p.add_argument("--name", default="roofline")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    if not cpu_build.available():
        raise SystemExit("the CPU kernel is not available here (no C compiler, or AA_LIGHTNING_CPU_KERNEL=0)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    header = (
        f"machine: {platform.machine()} {cpu} {os.cpu_count()} cores, threads {args.threads}; "
        f"torch {torch.__version__}; batch {args.batch}; {args.clock} clock; "
        f"{args.rounds} rounds (median, variants alternating, "
        f"rates probed in every round); {date.today()}; load average at start {os.getloadavg()[0]:.1f}"
    )
    print(header, flush=True)
    dims = sorted({(s[2] * s[3], s[4]) for name in args.models for s in attention_shapes(*MODELS[name], args.batch)})
    small = {
        f"[{hw}, {dkh}] x [{dkh}, {hw}] {str(dtype).removeprefix('torch.')}": gemm_rate(hw, dkh, hw, dtype)
        for hw, dkh in dims
        for dtype in (torch.float32, torch.bfloat16)
    }
    rows, records = rows_for(args.models, args.batch, args.rounds, Probes(args.threads, args.gemm_size))
    rates = rate_summary(records)
    header += f", at the end {os.getloadavg()[0]:.1f}"
    table = markdown(rows, rates, small)
    print(table)
    if args.out_dir:
        write_report(
            args.out_dir,
            args.name,
            header,
            rows,
            table,
            command_line("roofline.py", argv),
            rates=rates,
            small_gemm_flop_per_s=small,
        )


if __name__ == "__main__":
    main()
