"""What fraction of its roofline floor the attention would need to reach each model goal.

Reads two runs made on the same machine and thread count (it measures nothing itself):

- ``model_benchmark.py --preset goals --attention free``: the AA models with their attention op
  replaced by a stand-in that costs nothing, beside their baselines. Its ratio is the *bound*:
  what the rest of the AA model (qkv and W_O convolutions, the narrower conv branch, the
  concatenation, the layouts) leaves when the attention is free.
- ``roofline.py``: per model, the attention's floor (counted operations at measured rates) and
  the kernel's time, all AA layers together, per dtype and pass.

For a goal ratio g, with the baseline's step time T (batch of the free run) and the bound b:

    budget  = T (1 / g - 1 / b)       the attention time the goal leaves (negative: the rest alone misses it)
    needed  = floor / budget          the fraction of its floor the attention must reach (> 1: no exact kernel can)
    now     = floor / kernel time     where the kernel stands (roofline run)

Training uses the forward + backward floor, inference the forward one (the goals table of
``model_benchmark.py``: inference must reach the same ratio). Both runs must use the same batch.

Usage:
  python benchmarks/attention_budget.py --free docs/benchmarks/models_cpu_goals_attention_free_2threads.json \
      --roofline docs/benchmarks/roofline_2threads.json --out-dir docs/benchmarks --name attention_budget_2threads
"""

from __future__ import annotations

import argparse
import json
import re

from model_benchmark import GOALS, round_ratios
from report import command_line, write_report

MODES = {"train": "forward+backward", "infer": "forward"}


def _batch(header: str) -> int:
    found = re.search(r"batch (\d+)", header)
    if not found:
        raise ValueError(f"no 'batch N' in the run's header: {header!r}")
    return int(found.group(1))


def budget_rows(free: dict, roofline: dict) -> list[dict]:
    """One row per goal and mode: bound, budget, floor, kernel time, fraction needed and now."""
    batch = _batch(free["header"])
    if batch != roofline["rows"][0]["B"]:
        raise ValueError(
            f"the free-attention run used batch {batch}, the roofline batch "
            f"{roofline['rows'][0]['B']}: the floor and the step times would not be of the same work"
        )
    speed = {(r["mode"], r["dtype"], r["channels_last"], r["model"]): r for r in free["rows"]}
    model_rows = {(r["model"], r["dtype"], r["pass"]): r for r in roofline["rows"] if r["HxW"] == "(model)"}
    rows = []
    for aa, base, dtype, channels_last, goal in GOALS:
        for mode, pass_ in MODES.items():
            a, b = speed.get((mode, dtype, channels_last, aa)), speed.get((mode, dtype, channels_last, base))
            attention = model_rows.get((aa, dtype, pass_))
            if a is None or b is None or attention is None:
                continue
            step_ms, bound = 1000 * batch / b["img_per_s"], a["img_per_s"] / b["img_per_s"]
            rounds = round_ratios(a, b)
            budget = step_ms * (1 / goal - 1 / bound)
            rows.append(
                {
                    "model": aa,
                    "baseline": base,
                    "dtype": dtype,
                    "channels_last": channels_last,
                    "mode": mode,
                    "goal": goal,
                    "bound": bound,
                    "bound_rounds": [min(rounds), max(rounds)],
                    "baseline_step_ms": step_ms,
                    "budget_ms": budget,
                    "floor_ms": attention["floor_ms"],
                    "kernel_ms": attention["kernel_ms"],
                    "needed": attention["floor_ms"] / budget if budget > 0 else float("inf"),
                    "now": attention["fraction"],
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| pair | memory format | dtype | mode | goal | bound: free attention (rounds) | baseline step ms | "
        "attention budget ms | floor ms | kernel ms | fraction of floor needed | now |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        needed = r["needed"]
        if needed == float("inf"):
            cell = "none: the bound is below the goal"
        elif needed > 1:
            cell = f"**{needed:.2f}** (above the floor: no exact kernel)"
        else:
            cell = f"**{needed:.2f}**"
        lo, hi = r["bound_rounds"]
        lines.append(
            f"| {r['model']} / {r['baseline']} | {'channels_last' if r['channels_last'] else 'NCHW'} | "
            f"{r['dtype']} | {r['mode']} | >= {r['goal']:.2f}x | {r['bound']:.2f}x ({lo:.2f}..{hi:.2f}) | "
            f"{r['baseline_step_ms']:.0f} | "
            f"{r['budget_ms']:.1f} | {r['floor_ms']:.1f} | {r['kernel_ms']:.1f} | {cell} | {r['now']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--free", required=True, help="JSON of model_benchmark.py --preset goals --attention free")
    p.add_argument("--roofline", required=True, help="JSON of roofline.py (same machine, threads and batch)")
    p.add_argument("--out-dir")
    p.add_argument("--name", default="attention_budget")
    args = p.parse_args(argv)
    with open(args.free) as f:
        free = json.load(f)
    with open(args.roofline) as f:
        roofline = json.load(f)
    rows = budget_rows(free, roofline)
    table = markdown(rows)
    header = f"free-attention run: {free['header']}\nroofline run: `{roofline.get('command', '?')}`"
    print(header, table, sep="\n\n")
    if args.out_dir:
        write_report(args.out_dir, args.name, header, rows, table, command=command_line("attention_budget.py", argv))


if __name__ == "__main__":
    main()
