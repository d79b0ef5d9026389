"""Runs of one recipe started at the same moment (issue 22, item 1): each claims its own version_N folder, with its own
config.yaml, events file and last.ckpt; none shares or overwrites another's."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml
from helpers.cli_helpers import TRAIN, aa_recipe, python_env

RUNS = 2  # the race itself is made certain by the next test; here: real processes, end to end


def test_runs_started_together_claim_distinct_version_folders(tmp_path):
    recipe = aa_recipe(tmp_path)
    config = yaml.safe_load(recipe.read_text())
    config["trainer"]["max_epochs"] = 1
    config["data"]["init_args"]["data_dir"] = str(tmp_path / "data")
    recipe.write_text(yaml.safe_dump(config))
    # the data is generated once before, so that the runs race for the run folder, not for the data
    from aa_lightning.data import SyntheticCIFARDataModule

    SyntheticCIFARDataModule(**config["data"]["init_args"]).prepare_data()
    smoothing = [round(0.05 * i, 2) for i in range(RUNS)]  # one value per run, to tell whose record is whose
    processes = [
        subprocess.Popen(
            [sys.executable, str(TRAIN), "--config", str(recipe), "--model.label_smoothing", str(value)],
            cwd=tmp_path,
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for value in smoothing
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    root = tmp_path / "runs" / "tiny_aa"
    assert sorted(p.name for p in root.iterdir()) == [f"version_{i}" for i in range(RUNS)]
    recorded = []
    for folder in sorted(root.iterdir()):
        saved = yaml.safe_load((folder / "config.yaml").read_text())["model"]["init_args"]["label_smoothing"]
        checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
        assert len(checkpoints) == 2 and "last.ckpt" in checkpoints, checkpoints  # no best-...-v1.ckpt of a neighbour
        last = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["hyper_parameters"]["label_smoothing"] == saved, folder
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1, folder
        recorded.append(saved)
    assert sorted(recorded) == smoothing


def test_a_claim_is_exclusive_even_when_every_run_saw_the_same_listing(tmp_path, monkeypatch):
    """The race itself, made certain: every claimant lists the run folder before any of them creates its version
    (a stale, empty listing); the exclusive mkdir still gives each its own N and creates it."""
    from pathlib import Path

    from aa_lightning.training.cli import claim_version

    root = tmp_path / "runs" / "tiny_aa"
    root.mkdir(parents=True)
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter([]) if self == root else listing(self))
    versions = [claim_version(root) for _ in range(RUNS)]
    assert versions == list(range(RUNS))
    assert all((root / f"version_{v}").is_dir() for v in versions)
