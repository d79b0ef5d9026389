"""Running the project's commands in subprocesses and reading what they logged (shared by the CLI tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"


def run_python(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python *args`` on one thread, quiet about albumentations updates and deprecations."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py *args``."""
    return run_python(str(TRAIN), *args, cwd=cwd, timeout=timeout)


def events(log_dir: Path):
    """Every image and scalar of the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator
