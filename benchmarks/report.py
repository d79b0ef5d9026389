"""How the benchmark scripts record a run: the command, a header line, the rows as JSON, the table as Markdown."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, as docs/benchmarks.md quotes it."""
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_report(
    out_dir: str, name: str, header: str, rows: list, table: str, command: str | None = None, **extra
) -> None:
    """Write ``<name>.json`` ({header, command, **extra, rows}) and ``<name>.md`` (the command in
    backticks, the header, the table) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"header": header, **({"command": command} if command else {}), **extra, "rows": rows}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write((f"`{command}`\n\n" if command else "") + f"{header}\n\n{table}\n")
