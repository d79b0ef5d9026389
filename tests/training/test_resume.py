"""Checkpoints, resume and faults of train.py (issue 12): last.ckpt is the last state, a run killed at any
step resumes bit-identical, SIGTERM / SIGINT save and exit 143 / 130, a resume is validated before the
run folder is touched, checkpoints are written atomically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli_helpers import TRAIN, aa_recipe, python_env, run_cli

STEPS_PER_EPOCH = 5  # 40 training images / batch 8


def probe(report: Path, **init_args) -> dict:
    return {"class_path": "helpers.fault_probes.StepProbe", "init_args": {"report": str(report), **init_args}}


def steps(report: Path) -> dict[int, dict]:
    """The probe's lines by step (a replayed step keeps its last record)."""
    return {line["step"]: line for line in map(json.loads, report.read_text().splitlines())}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # as train.py loads it: no code unpickled


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key, value in a["state"][index].items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its folder and the probe's report."""
    tmp = tmp_path_factory.mktemp("reference")
    report = tmp / "steps.jsonl"
    result = run_cli("--config", str(aa_recipe(tmp, callbacks=[probe(report)])), cwd=tmp, probes=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "tiny_aa" / "version_0", report


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The same run SIGKILLed after optimizer step 7 (mid-epoch 2; last.ckpt is from step 6), then resumed
    with --ckpt_path last; the resumed run snapshots its state at its first step."""
    tmp = tmp_path_factory.mktemp("killed")
    report = tmp / "steps.jsonl"
    recipe = aa_recipe(tmp, callbacks=[probe(report, kill_at=7)])
    killed = run_cli("--config", str(recipe), cwd=tmp, probes=True, fresh_process=True)  # SIGKILLs itself
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    version = tmp / "runs" / "tiny_aa" / "version_0"
    at_kill = load(version / "checkpoints" / "last.ckpt")
    snapshot = tmp / "snapshot.pt"
    callbacks = [
        probe(report),
        {"class_path": "helpers.fault_probes.ResumeSnapshot", "init_args": {"path": str(snapshot)}},
    ]
    resumed = run_cli("--config", str(aa_recipe(tmp, callbacks=callbacks)), "--ckpt_path", "last", cwd=tmp, probes=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp / "runs" / "tiny_aa" / "version_1").exists()
    return version, report, at_kill, torch.load(snapshot, weights_only=False)


def test_last_ckpt_is_the_state_at_the_end_of_the_run_not_of_the_best_epoch(tmp_path):
    """Item 0: the best epoch is the first (monitor 'step', mode min), last.ckpt still holds the end."""
    recipe = aa_recipe(
        tmp_path,
        callbacks=[
            {"class_path": "helpers.fault_probes.FinalWeights", "init_args": {"path": str(tmp_path / "final.pt")}}
        ],
    )
    result = run_cli(
        "--config",
        str(recipe),
        "--checkpoint.monitor",
        "step",
        "--checkpoint.mode",
        "min",
        "--checkpoint_every_n_steps",
        "0",
        cwd=tmp_path,
        probes=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "runs" / "tiny_aa" / "version_0" / "checkpoints"
    best = list(folder.glob("best-*.ckpt"))
    assert [p.name for p in best] == [f"best-epoch=0-step={STEPS_PER_EPOCH}.ckpt"]
    last = load(folder / "last.ckpt")
    assert last["global_step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 1
    assert_same_tensors(last["state_dict"], torch.load(tmp_path / "final.pt"), "last.ckpt vs the final weights")


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_bit_for_bit(reference, killed_and_resumed):
    """Item 4: SIGKILL after step 7, resume from last.ckpt (step 6): the end state equals the uninterrupted run's."""
    ref_version, ref_report = reference
    version, report, at_kill, _ = killed_and_resumed
    assert at_kill["global_step"] == 6 and at_kill["epoch"] == 1
    ref_last, last = load(ref_version / "checkpoints" / "last.ckpt"), load(version / "checkpoints" / "last.ckpt")
    assert last["global_step"] == ref_last["global_step"] == 2 * STEPS_PER_EPOCH
    assert_same_tensors(last["state_dict"], ref_last["state_dict"], "final weights")
    assert_same_optimizer(last["optimizer_states"][0], ref_last["optimizer_states"][0])
    assert last["lr_schedulers"] == ref_last["lr_schedulers"]
    # the same samples, with the same augmentation, at every step after the resume
    ref_steps, got = steps(ref_report), steps(report)
    assert set(got) == set(ref_steps) == set(range(1, 2 * STEPS_PER_EPOCH + 1))
    for step in range(7, 2 * STEPS_PER_EPOCH + 1):
        assert got[step] == ref_steps[step], step


def test_a_resume_starts_from_the_checkpoints_weights_optimizer_lr_and_best_score(killed_and_resumed):
    """Issue 17: what the resumed run holds at its first step is what the checkpoint it resumed from holds."""
    _, _, at_kill, snapshot = killed_and_resumed
    assert snapshot["global_step"] == at_kill["global_step"] == 6
    assert_same_tensors(snapshot["state_dict"], at_kill["state_dict"], "weights at the resume")
    assert_same_optimizer(snapshot["optimizer"], at_kill["optimizer_states"][0])
    assert snapshot["lr"] == [group["lr"] for group in at_kill["optimizer_states"][0]["param_groups"]]
    assert snapshot["scheduler"] == at_kill["lr_schedulers"][0]
    saved_best = next(
        state for key, state in at_kill["callbacks"].items() if key.startswith("ModelCheckpoint{'monitor': 'val/top1'")
    )
    assert saved_best["best_model_score"] is not None
    assert torch.equal(snapshot["best_model_score"], saved_best["best_model_score"])
    assert snapshot["best_model_path"] == saved_best["best_model_path"]


@pytest.mark.parametrize("signame, code", [("TERM", 143), pytest.param("INT", 130, marks=pytest.mark.slow)])
def test_sigterm_and_sigint_save_a_resumable_checkpoint_and_exit_non_zero(tmp_path, reference, signame, code):
    """Item 5: the signal comes from outside while the run trains; the run saves last.ckpt at the step it
    reached, exits 128 + signal, and the resume ends bit-identical to the uninterrupted run."""
    report = tmp_path / "steps.jsonl"
    recipe = aa_recipe(tmp_path, callbacks=[probe(report)])
    process = subprocess.Popen(
        [sys.executable, str(TRAIN), "--config", str(recipe), "--checkpoint_every_n_steps", "0"],
        cwd=tmp_path,
        env=python_env(probes=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (report.is_file() and len(report.read_text().splitlines()) >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "the run reported no training step"
        time.sleep(0.05)
    process.send_signal(getattr(signal, f"SIG{signame}"))
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == code, stderr[-3000:]
    stopped_at = max(steps(report))
    assert 2 <= stopped_at < 2 * STEPS_PER_EPOCH, "the signal came too late to test a partial epoch"
    assert f"stopped by SIG{signame} after step {stopped_at}" in stderr and "--ckpt_path last" in stderr
    last_path = tmp_path / "runs" / "tiny_aa" / "version_0" / "checkpoints" / "last.ckpt"
    assert load(last_path)["global_step"] == stopped_at
    resumed = run_cli(
        "--config", str(recipe), "--ckpt_path", "last", "--checkpoint_every_n_steps", "0", cwd=tmp_path, probes=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_last = load(reference[0] / "checkpoints" / "last.ckpt")
    assert_same_tensors(load(last_path)["state_dict"], ref_last["state_dict"], "final weights")


def test_a_signal_at_an_epochs_last_batch_stops_after_the_epoch_and_resumes_exactly(tmp_path, reference):
    """Item 5 at the epoch boundary: a SIGTERM during an epoch's last batch stops the run once that epoch has
    ended (validation, epoch-end save), not before it: a checkpoint taken before the epoch's end does not
    resume exactly."""
    report = tmp_path / "steps.jsonl"
    callbacks = [probe(report, kill_at=STEPS_PER_EPOCH, signal_name="TERM")]
    recipe = aa_recipe(tmp_path, callbacks=callbacks)
    stopped = run_cli("--config", str(recipe), cwd=tmp_path, probes=True, fresh_process=True)  # SIGTERMs itself
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"stopped by SIGTERM after step {STEPS_PER_EPOCH} (epoch 0, its end)" in stopped.stderr
    last_path = tmp_path / "runs" / "tiny_aa" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = run_cli("--config", str(aa_recipe(tmp_path)), "--ckpt_path", "last", cwd=tmp_path, probes=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_last = load(reference[0] / "checkpoints" / "last.ckpt")
    assert_same_tensors(load(last_path)["state_dict"], ref_last["state_dict"], "final weights")


@pytest.mark.slow
def test_two_workers_load_the_same_samples_with_the_same_augmentation(tmp_path, reference):
    """Item 4: with worker processes, every step's samples and augmented pixels are those of num_workers 0."""
    report = tmp_path / "steps.jsonl"
    recipe = aa_recipe(tmp_path, callbacks=[probe(report)], num_workers=2)
    result = run_cli("--config", str(recipe), "--trainer.max_epochs", "1", cwd=tmp_path, probes=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ref_steps, got = steps(reference[1]), steps(report)
    assert set(got) == set(range(1, STEPS_PER_EPOCH + 1))
    for step in got:
        assert got[step] == ref_steps[step], step
