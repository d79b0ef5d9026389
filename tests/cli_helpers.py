"""Running the project's commands in subprocesses and reading what they logged (shared by the CLI tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"


def python_env(probes: bool = False) -> dict[str, str]:
    """The environment of the subprocesses: one thread, quiet; ``probes``: tests/ on the PYTHONPATH, so that a
    recipe can load the callbacks of ``tests/fault_probes.py``."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    if probes:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    return env


def run_python(*args: str, cwd: Path, timeout: int = 300, probes: bool = False) -> subprocess.CompletedProcess:
    """``python *args`` on one thread, quiet about albumentations updates and deprecations."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=python_env(probes), capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args: str, cwd: Path, timeout: int = 300, probes: bool = False) -> subprocess.CompletedProcess:
    """``python train.py *args``."""
    return run_python(str(TRAIN), *args, cwd=cwd, timeout=timeout, probes=probes)


def events(log_dir: Path):
    """Every image and scalar of the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator
