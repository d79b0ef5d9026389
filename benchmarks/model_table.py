"""Parameter / GFLOPs table of every paper row, this project's models beside the paper's numbers.

    python benchmarks/model_table.py                       # print the Markdown table
    python benchmarks/model_table.py --write docs/models.md  # replace the table in the doc

Counts are taken on the ``meta`` device (shapes only: seconds on a CPU, no memory). GFLOPs =
2 x multiply-adds of convolutions, linear layers and matrix products (torch's FlopCounterMode),
as the paper counts them (ResNet-50: 8.2); the AA layers run the ``reference`` backend, so the
attention products Q K^T, A V and the relative logits are counted explicitly ("attn" column).
Softmax, normalization, activations and pooling are not counted.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

import aa_lightning  # noqa: F401  (registers the models)
from aa_lightning.models.complexity import count_flops_by_op, count_params

IMAGENET, CIFAR = (3, 224, 224), (3, 32, 32)
START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


@dataclass(frozen=True)
class Row:
    """One paper row: the timm model (and kwargs) that reproduces it and the paper's numbers."""

    label: str
    model: str
    input_size: tuple[int, int, int] = IMAGENET
    kwargs: dict = field(default_factory=dict)
    paper_params: float | None = None  # M
    paper_gflops: float | None = None
    baseline: str | None = None  # the row whose parameter count the "vs baseline" column subtracts
    paper_overhead: str = ""


ROWS = [
    Row("WRN-28-10", "wrn28_10", CIFAR, paper_params=36.3, paper_gflops=10.4),
    Row("AA-WRN-28-10", "aa_wrn28_10", CIFAR, paper_params=36.2, paper_gflops=10.9, baseline="WRN-28-10"),
    Row("AA-WRN-28-10, groups 2-3 only", "aa_wrn28_10", CIFAR, {"aa_stages": (2, 3)}, 36.2, 10.9, baseline="WRN-28-10"),
    Row("ResNet-26", "resnet26"),
    Row("AA-ResNet-26", "aa_resnet26", baseline="ResNet-26"),
    Row("ResNet-34", "resnet34", paper_params=21.8, paper_gflops=7.4),
    Row("AA-ResNet-34", "aa_resnet34", paper_params=20.7, paper_gflops=7.1, baseline="ResNet-34"),
    Row("ResNet-50", "resnet50", paper_params=25.6, paper_gflops=8.2),
    Row("AA-ResNet-50", "aa_resnet50", paper_params=25.8, paper_gflops=8.3, baseline="ResNet-50"),
    Row("ResNet-101", "resnet101", paper_params=44.5, paper_gflops=15.6),
    Row("AA-ResNet-101", "aa_resnet101", paper_params=45.4, paper_gflops=16.1, baseline="ResNet-101"),
    Row("ResNet-152", "resnet152"),
    Row("AA-ResNet-152", "aa_resnet152", baseline="ResNet-152"),
    *[
        Row(
            f"AA-ResNet-50, k = v = {kv}",
            "aa_resnet50",
            kwargs={"aa_k": kv, "aa_v": kv},
            paper_params=p,
            baseline="ResNet-50",
        )
        for kv, p in ((0.25, 24.3), (0.5, 22.3), (0.75, 20.7), (1.0, 19.4))
    ],
    *[
        row
        for mult, name in (("0.75", "075"), ("1.0", "100"), ("1.25", "125"), ("1.4", "140"))
        for row in (
            Row(f"MnasNet-A1 {mult}", f"semnasnet_{name}"),
            Row(
                f"AA-MnasNet-A1 {mult}",
                f"aa_mnasnet_{name}",
                baseline=f"MnasNet-A1 {mult}",
                paper_overhead="+0.1 to +0.35",
            ),
        )
    ],
]


@dataclass
class Measured:
    params: int
    gflops: float
    attention_gflops: float


def measure(row: Row) -> Measured:
    """Parameters and GFLOPs of ``row``'s model at its input size (built on the meta device)."""
    with torch.device("meta"):
        model = timm.create_model(row.model, **row.kwargs)
    flops = count_flops_by_op(model, row.input_size)
    return Measured(count_params(model), sum(flops.values()) / 1e9, flops.get("bmm", 0) / 1e9)


def _relative(ours: float, paper: float | None) -> str:
    if paper is None:
        return ""
    percent = round(100 * (ours / paper - 1), 1)
    return f"{percent + 0.0:+.1f}%"  # + 0.0: no "-0.0%"


def _model_cell(row: Row) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in row.kwargs.items())
    return f"`{row.model}`" + (f" ({kwargs})" if kwargs else "")


def markdown_table(rows: list[Row] = ROWS) -> str:
    """The table as Markdown (one line per paper row)."""
    measured = {row.label: measure(row) for row in rows}
    lines = [
        "| paper row | timm model | input | params (M) | paper | diff | vs baseline (M) | GFLOPs (attn) | paper "
        "| diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = measured[row.label]
        params = m.params / 1e6
        versus = ""
        if row.baseline is not None:
            versus = f"{params - measured[row.baseline].params / 1e6:+.2f}"
            if row.paper_overhead:
                versus += f" (paper {row.paper_overhead})"
        gflops = f"{m.gflops:.2f}" + (f" ({m.attention_gflops:.2f})" if m.attention_gflops else "")
        lines.append(
            f"| {row.label} | {_model_cell(row)} | {row.input_size[-1]} | {params:.2f} | "
            f"{'' if row.paper_params is None else row.paper_params} | {_relative(params, row.paper_params)} "
            f"| {versus} | {gflops} | {'' if row.paper_gflops is None else row.paper_gflops} "
            f"| {_relative(m.gflops, row.paper_gflops)} |"
        )
    return "\n".join(lines)


def write_into(doc: Path, table: str) -> None:
    """Replace the text between the table markers of ``doc`` (which must contain both)."""
    text = doc.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc}: no '{START}' ... '{END}' markers to write the table between")
    doc.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="Markdown file whose table (between the markers) is replaced")
    args = parser.parse_args(argv)
    table = markdown_table()
    print(table)
    if args.write:
        write_into(args.write, table)
        print(f"wrote the table into {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
