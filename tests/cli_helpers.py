"""Running the project's commands in subprocesses and reading what they logged (shared by the CLI tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"


def python_env(probes: bool = False) -> dict[str, str]:
    """The environment of the subprocesses: one thread, quiet; ``probes``: tests/ on the PYTHONPATH, so that a
    recipe can load the callbacks of ``tests/fault_probes.py``."""
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    if probes:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    return env


def run_python(*args: str, cwd: Path, timeout: int = 300, probes: bool = False) -> subprocess.CompletedProcess:
    """``python *args`` on one thread, quiet about albumentations updates and deprecations."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=python_env(probes), capture_output=True, text=True, timeout=timeout
    )


def run_cli(*args: str, cwd: Path, timeout: int = 300, probes: bool = False) -> subprocess.CompletedProcess:
    """``python train.py *args``."""
    return run_python(str(TRAIN), *args, cwd=cwd, timeout=timeout, probes=probes)


def events(log_dir: Path):
    """Every image and scalar of the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def aa_recipe(tmp_path: Path, name: str = "tiny_aa", callbacks: list | None = None, **data_overrides) -> Path:
    """A quickstart-like recipe: a narrow AA-WRN with dropout, 2 epochs x 5 steps on 56 generated images."""
    recipe = {
        "seed_everything": 0,
        "runs_dir": str(tmp_path / "runs"),
        "test_ckpt_path": None,
        "checkpoint_every_n_steps": 2,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "callbacks": callbacks or [],
        },
        "model": {
            "class_path": "aa_lightning.tasks.ImageClassifier",
            "init_args": {
                "model_name": "aa_wrn28_10",
                "num_classes": 4,
                "base_lr": 0.2,
                "warmup_epochs": 0.5,
                "model_kwargs": {
                    "depth": 10,
                    "widen_factor": 1,
                    "aa_stages": [3],
                    "aa_heads": 2,
                    "aa_min_dkh": 4,
                    "block_drop_rate": 0.3,
                },
            },
        },
        "data": {
            "class_path": "aa_lightning.data.SyntheticCIFARDataModule",
            "init_args": {
                "data_dir": str(tmp_path.parent / "shared_data"),
                "num_classes": 4,
                "train_size": 56,
                "test_size": 8,
                "val_split": 16,
                "batch_size": 8,
                "num_workers": 0,
                "hflip": True,
                **data_overrides,
            },
        },
        "image_grid": {"num_images": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
