"""What the two command-line tools (``python -m aa_lightning.predict`` and ``python -m aa_lightning.export``)
share: their user-facing error, the ``--out`` folder checks and the parse-run-report loop."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class CommandError(Exception):
    """A user-facing error: bad checkpoint, image, layer, option or output folder (the message says which)."""


# -- output files --------------------------------------------------------------------------------------
def prepare_out_folder(out: Path) -> Path:
    """Create the ``--out`` folder (and its parents) and check that a file can be written in it;
    otherwise an :class:`CommandError` naming the folder and the reason."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CommandError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    return out


def run_command(
    parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None = None
) -> int:
    """Parse ``argv`` and run ``command``; an :class:`CommandError` becomes one line on stderr
    and exit status 2 (argparse's own convention for usage errors)."""
    args = parser.parse_args(argv)
    try:
        command(args)
    except CommandError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
