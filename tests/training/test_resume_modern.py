"""A run with the modern training stack (timm Mixup / CutMix, RandAugment, random erasing, the EMA of the weights,
LAMB, BCE) killed mid-epoch resumes from last.ckpt and ends bit-identical to the uninterrupted run on CPU: the raw
weights, the EMA weights and its update count, the optimizer state and the schedule."""

from __future__ import annotations

import signal

import pytest
import torch
import yaml
from helpers.cli_helpers import aa_recipe, run_cli
from test_resume import STEPS_PER_EPOCH, assert_same_optimizer, assert_same_tensors, load, probe

EMA = {"class_path": "aa_lightning.callbacks.ModelEMA", "init_args": {"decay": 0.9, "update_starting_at_step": 2}}
MODEL = {
    "optimizer": "lamb",
    "optimizer_kwargs": {"trust_clip": True},
    "base_lr": 0.01,
    "weight_decay": 0.02,
    "loss": "bce",
    "bce_target_thresh": 0.2,
    "mixing": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "label_smoothing": 0.1},
}
DATA = {"auto_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25, "random_erasing_mode": "pixel"}


def modern_recipe(tmp_path, callbacks):
    path = aa_recipe(tmp_path, callbacks=[EMA, *callbacks])
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["init_args"].update(MODEL)
    recipe["data"]["init_args"].update(DATA)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_a_killed_run_with_ema_and_mixing_resumes_bit_identical(tmp_path_factory):
    reference = tmp_path_factory.mktemp("reference")
    ran = run_cli("--config", str(modern_recipe(reference, [probe(reference / "s.jsonl")])), cwd=reference, probes=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    killed_dir = tmp_path_factory.mktemp("killed")
    recipe = modern_recipe(killed_dir, [probe(killed_dir / "s.jsonl", kill_at=7)])
    killed = run_cli("--config", str(recipe), cwd=killed_dir, probes=True, fresh_process=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = killed_dir / "runs" / "tiny_aa" / "version_0" / "checkpoints"
    at_kill = load(folder / "last.ckpt")
    assert at_kill["global_step"] == 6 and "current_model_state" in at_kill and "averaging_state" in at_kill
    recipe = modern_recipe(killed_dir, [probe(killed_dir / "s.jsonl")])
    resumed = run_cli("--config", str(recipe), "--ckpt_path", "last", cwd=killed_dir, probes=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = load(reference / "runs" / "tiny_aa" / "version_0" / "checkpoints" / "last.ckpt")
    got = load(folder / "last.ckpt")
    assert got["global_step"] == ref["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_tensors(got["state_dict"], ref["state_dict"], "EMA weights")
    assert_same_tensors(got["current_model_state"], ref["current_model_state"], "raw weights")
    assert_same_tensors(got["averaging_state"], ref["averaging_state"], "EMA update count")
    assert not all(torch.equal(got["state_dict"][k], got["current_model_state"][k]) for k in got["state_dict"])
    assert_same_optimizer(got["optimizer_states"][0], ref["optimizer_states"][0])
    assert got["lr_schedulers"] == ref["lr_schedulers"]
    ema_state = [v for k, v in got["callbacks"].items() if k.startswith("ModelEMA")]
    assert ema_state == [v for k, v in ref["callbacks"].items() if k.startswith("ModelEMA")] and ema_state
