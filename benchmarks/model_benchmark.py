"""Training and inference throughput of AA models against their baselines, measured alternately.

For every variant (memory format x compile x dtype), each model gets ``--rounds`` rounds of
``--steps`` timed steps, the models taking turns round by round so that machine noise hits them
alike; the median round is reported. A training step is forward + backward + SGD step; an
inference step is a no-grad forward in eval mode.

Usage:
  python benchmarks/model_benchmark.py --pairs aa_resnet50:resnet50 aa_wrn28_10:wrn28_10 \
      --peers botnet26t_256 --batch 8 --out-dir docs/benchmarks
  python benchmarks/model_benchmark.py --device cuda --dtype bfloat16 --channels-last both --compile both
  python benchmarks/model_benchmark.py --variant 'aa_resnet50_s34=aa_resnet50:{"aa_stages": [3, 4]}' \
      --pairs aa_resnet50:resnet50 aa_resnet50_s34:resnet50 --peers --channels-last yes --modes train
  python benchmarks/model_benchmark.py --preset goals --out-dir docs/benchmarks --name models_cpu_goals

Every pair also gets its FLOP limit: baseline GFLOPs / AA GFLOPs from the project's model table
(``benchmarks/model_table.py``, counted on the meta device), the ratio a perfect implementation
of the AA model would reach if time followed FLOPs. ``--preset goals`` measures the groups of the
CPU performance issues (16, 24) only: fp32 NCHW and channels_last with aa_resnet50 / resnet50,
aa_wrn28_10 / wrn28_10 and aa_resnet50 with attention in all four stages; bf16 autocast
channels_last aa_resnet50 / resnet50; and adds the issue's goals table.

``--attention free`` replaces the attention op of every AA layer by a stand-in that costs nothing
(its output is v; backward hands dO to v and zeros to q, k and the relative tables): the ratios
then bound what any attention kernel could reach with the rest of the AA models as they are (the
qkv and output convolutions, the narrower conv branch, the concatenation, the layouts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from datetime import date

import timm
import torch
from model_table import Row
from model_table import measure as count_model
from report import command_line, write_report

import aa_lightning  # noqa: F401  (registers the AA models)
import aa_lightning.layers.augmented_conv as augmented_conv

ALL_STAGES = 'aa_resnet50_all=aa_resnet50:{"aa_stages": [1, 2, 3, 4]}'
# (dtype, channels_last, models) groups of --preset goals, and the goals:
# (AA model, baseline, dtype, channels_last or None for both, goal)
GOAL_GROUPS = [
    ("float32", False, ["aa_resnet50", "resnet50", "aa_wrn28_10", "wrn28_10", "aa_resnet50_all"]),
    ("float32", True, ["aa_resnet50", "resnet50", "aa_wrn28_10", "wrn28_10"]),
    ("bfloat16", True, ["aa_resnet50", "resnet50"]),
]
# Issue 24's goals: what an attention at 75% of its roofline floor gives (benchmarks/roofline.py); they
# replace issue 16's FLOP-table ones. Inference: at least the training ratio (checked as the same goal).
GOALS = [
    ("aa_resnet50", "resnet50", "float32", False, 0.89),
    ("aa_resnet50", "resnet50", "float32", True, 0.89),
    ("aa_wrn28_10", "wrn28_10", "float32", False, 0.71),
    ("aa_wrn28_10", "wrn28_10", "float32", True, 0.71),
    ("aa_resnet50", "resnet50", "bfloat16", True, 0.88),
    ("aa_resnet50_all", "resnet50", "float32", False, 0.62),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pairs", nargs="+", default=["aa_resnet50:resnet50", "aa_wrn28_10:wrn28_10"], help="aa_model:baseline"
    )
    p.add_argument("--peers", nargs="*", default=["botnet26t_256"], help="other models measured beside them")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='LABEL=MODEL:{"kwarg": value}',
        help="a timm model with create_model kwargs (JSON), usable by LABEL in --pairs/--peers",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--channels-last", default="no", choices=["no", "yes", "both"])
    p.add_argument("--compile", default="no", choices=["no", "yes", "both"])
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument(
        "--preset",
        choices=["goals"],
        default=None,
        help="goals: the groups and the goals table of the CPU performance issue (overrides the model, "
        "dtype and memory-format options)",
    )
    p.add_argument(
        "--attention",
        choices=["kernel", "free"],
        default="kernel",
        help="free: the AA layers' attention op replaced by a stand-in that costs nothing (see above)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: the process's CPU time, which other processes' load does not inflate (with --threads 1; "
        "with more threads it adds up the threads' time, spin-waits included)",
    )
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="models")
    args = p.parse_args(argv)
    if args.preset == "goals":
        args.pairs = ["aa_resnet50:resnet50", "aa_wrn28_10:wrn28_10", "aa_resnet50_all:resnet50"]
        args.peers, args.variant, args.compile = [], [*args.variant, ALL_STAGES], "no"
    return args


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _FreeAttention(torch.autograd.Function):
    """Stands in for relative_attention_2d at no cost: out = v; dO goes to v, zeros to the rest."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w):
        ctx.save_for_backward(q, k, rel_h, rel_w)
        return v.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return (
            *(None if t is None else torch.zeros_like(t) for t in ctx.saved_tensors[:2]),
            grad_out,
            *(None if t is None else torch.zeros_like(t) for t in ctx.saved_tensors[2:]),
        )


def free_attention(q, k, v, rel_h=None, rel_w=None, *, backend="auto"):
    return _FreeAttention.apply(q, k, v, rel_h, rel_w)


def _choices(flag: str) -> list[bool]:
    return {"no": [False], "yes": [True], "both": [False, True]}[flag]


def parse_variants(specs: list[str]) -> dict[str, tuple[str, dict]]:
    """``LABEL=MODEL:{json kwargs}`` -> {LABEL: (MODEL, kwargs)}."""
    variants = {}
    for spec in specs:
        label, _, rest = spec.partition("=")
        model, _, kwargs = rest.partition(":")
        if not label or not model:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=MODEL:{{json kwargs}}")
        variants[label] = (model, json.loads(kwargs or "{}"))
    return variants


def build(name: str, device: torch.device, channels_last: bool, compiled: bool, variants: dict[str, tuple[str, dict]]):
    model_name, kwargs = variants.get(name, (name, {}))
    model = timm.create_model(model_name, **kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    input_size = model.pretrained_cfg["input_size"]
    num_classes = model.num_classes
    runner = torch.compile(model) if compiled else model
    return model, runner, input_size, num_classes


def make_step(model, runner, mode: str, batch: int, input_size, num_classes: int, device, dtype, channels_last: bool):
    x = torch.randn(batch, *input_size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            with autocast():
                loss = loss_fn(runner(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                runner(x)
            sync()

    return step


def groups(args: argparse.Namespace) -> list[tuple[str, bool, bool, str, list[str]]]:
    """(dtype, channels_last, compiled, mode, models) of every group measured."""
    if args.preset == "goals":
        return [(dtype, cl, False, mode, models) for dtype, cl, models in GOAL_GROUPS for mode in args.modes]
    models = list(dict.fromkeys([m for pair in args.pairs for m in pair.split(":")] + list(args.peers)))
    return [
        (dtype, cl, compiled, mode, models)
        for dtype, cl, compiled, mode in itertools.product(
            args.dtype, _choices(args.channels_last), _choices(args.compile), args.modes
        )
    ]


def flop_limits(args: argparse.Namespace) -> dict[str, float]:
    """{AA model: baseline GFLOPs / AA GFLOPs} for every pair, from the model table's counts."""
    variants = parse_variants(args.variant)

    def gflops(name: str) -> float:
        model_name, kwargs = variants.get(name, (name, {}))
        size = timm.get_pretrained_cfg(model_name).input_size
        return count_model(Row(name, model_name, tuple(size), kwargs)).gflops

    return {aa: gflops(base) / gflops(aa) for aa, base in (pair.split(":") for pair in args.pairs)}


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    variants = parse_variants(args.variant)
    rows = []
    for dtype_name, channels_last, compiled, mode, models in groups(args):
        dtype = getattr(torch, dtype_name)
        steps = {}
        for name in models:
            model, runner, input_size, num_classes = build(name, device, channels_last, compiled, variants)
            steps[name] = (
                make_step(model, runner, mode, args.batch, input_size, num_classes, device, dtype, channels_last),
                input_size,
            )
            for _ in range(args.warmup):
                steps[name][0]()
        rounds = {name: [] for name in models}
        clock = CLOCKS[args.clock]
        for _ in range(args.rounds):
            for name in models:  # alternate: every model gets one round before any gets the next
                start = clock()
                for _ in range(args.steps):
                    steps[name][0]()
                rounds[name].append(args.steps * args.batch / (clock() - start))
        for name in models:
            row = {
                "model": name,
                "mode": mode,
                "dtype": dtype_name,
                "channels_last": channels_last,
                "compile": compiled,
                "input": "x".join(map(str, steps[name][1][1:])),
                "img_per_s": statistics.median(rounds[name]),
                "rounds_img_per_s": [round(x, 3) for x in rounds[name]],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del steps
    return rows


def round_ratios(aa: dict, base: dict) -> list[float]:
    """The per-round images/s ratios of two rows (the rounds alternate, so round t of both ran side by side)."""
    return [a / b for a, b in zip(aa.get("rounds_img_per_s", []), base.get("rounds_img_per_s", []))]


def _ratio_spread(aa: dict, base: dict) -> str:
    """min..max of the per-round ratios."""
    ratios = round_ratios(aa, base)
    return f"{min(ratios):.2f}..{max(ratios):.2f}" if ratios else ""


def markdown(rows: list[dict], args: argparse.Namespace, limits: dict[str, float]) -> str:
    lines = [
        "| mode | dtype | channels_last | compile | model | input | images/s | AA / baseline | rounds' ratios "
        "| FLOP limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    index = {(r["mode"], r["dtype"], r["channels_last"], r["compile"], r["model"]): r for r in rows}
    baseline_of = {pair.split(":")[0]: pair.split(":")[1] for pair in args.pairs}
    for r in rows:
        base = baseline_of.get(r["model"])
        ratio = spread = limit = ""
        if base:
            b = index.get((r["mode"], r["dtype"], r["channels_last"], r["compile"], base))
            ratio = f"**{r['img_per_s'] / b['img_per_s']:.2f}** (vs {base})" if b else ""
            spread = _ratio_spread(r, b) if b else ""
            limit = f"{limits[r['model']]:.3f}"
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['channels_last']} | {r['compile']} | {r['model']} | {r['input']} | "
            f"{r['img_per_s']:.1f} | {ratio} | {spread} | {limit} |"
        )
    if args.preset == "goals":
        lines += [
            "",
            "| model | memory format | dtype | train | inference | goal | FLOP limit | "
            + ("bound >= goal |" if args.attention == "free" else "met |"),
            "|---|---|---|---|---|---|---|---|",
        ]
        for aa, base, dtype, cl, goal in GOALS:
            got = {}
            for mode in args.modes:
                a, b = (index.get((mode, dtype, cl, False, m)) for m in (aa, base))
                got[mode] = a["img_per_s"] / b["img_per_s"] if a and b else None
            cells = [f"{got[m]:.2f}x" if got.get(m) is not None else "" for m in ("train", "infer")]
            met = "yes" if all(v is not None and v >= goal for v in got.values()) else "no"
            lines.append(
                f"| {aa} / {base} | {'channels_last' if cl else 'NCHW'} | {dtype} | {cells[0]} | {cells[1]} | "
                f">= {goal:.2f}x | {limits[aa]:.3f}x | {met} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"device {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}; "
        f"torch {torch.__version__}; timm {timm.__version__}; batch {args.batch}; "
        f"{args.rounds} rounds x {args.steps} steps (median round); {args.clock} clock; {date.today()}; "
        f"load average {os.getloadavg()[0]:.1f}"
        + ("; attention op: a free stand-in (--attention free)" if args.attention == "free" else "")
    )
    print(header)
    limits = flop_limits(args)  # of the real models: counted before any stand-in replaces their attention
    print("FLOP limits:", json.dumps({k: round(v, 4) for k, v in limits.items()}), flush=True)
    if args.attention == "free":
        augmented_conv.relative_attention_2d = free_attention
    rows = measure(args)
    table = markdown(rows, args, limits)
    print(table)
    write_report(args.out_dir, args.name, header, rows, table, command_line("model_benchmark.py", argv))


if __name__ == "__main__":
    main()
