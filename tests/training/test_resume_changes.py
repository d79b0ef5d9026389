"""Resumes that change something (issue 22, items 2, 6 and 17): a setting the saved schedule, optimizer or loader
position depend on is refused in one line naming it and how to continue, before anything is written to the run folder;
a resume that fails later writes nothing either; a resume cleans the temporary files of a killed save."""

from __future__ import annotations

import shutil

import pytest
import yaml
from helpers.cli_helpers import aa_recipe, run_cli
from test_faults import folder_bytes


def one_epoch_recipe(tmp_path, callbacks=None):
    recipe = aa_recipe(tmp_path, callbacks=callbacks)
    config = yaml.safe_load(recipe.read_text())
    config["trainer"]["max_epochs"] = 1
    recipe.write_text(yaml.safe_dump(config))
    return recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run (5 steps, batch 8, base_lr 0.2, 1 process, no loader workers): its runs folder."""
    tmp = tmp_path_factory.mktemp("finished")
    result = run_cli("--config", str(one_epoch_recipe(tmp)), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs"


def copy_of(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "runs")
    return tmp_path / "runs" / "tiny_aa"


@pytest.mark.parametrize(
    "override, setting, new, old",
    [
        (["--data.batch_size", "4"], "data.batch_size", "4", "8"),
        (["--model.base_lr", "0.4"], "model.base_lr", "0.4", "0.2"),
        (["--trainer.max_epochs", "2"], "trainer.max_epochs", "2", "1"),
        (["--trainer.devices", "2", "--trainer.strategy", "ddp"], "world size", "2", "1"),
        (["--data.num_workers", "2"], "data.num_workers", "2", "0"),
    ],
)
def test_a_resume_with_another_setting_is_refused_naming_it(
    finished_run, tmp_path, monkeypatch, capsys, override, setting, new, old
):
    from aa_lightning.training.cli import main

    run = copy_of(finished_run, tmp_path)
    before = folder_bytes(run)
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as info:  # train.py's main in this process (the refusal comes before any fit)
        main(args=["--config", str(one_epoch_recipe(tmp_path)), "--ckpt_path", "last", *override])
    stderr = capsys.readouterr().err
    assert info.value.code == 1, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: ") and "Traceback" not in stderr, stderr[-3000:]
    assert f"{setting} {new}" in line and f"checkpoint's {old}" in line and "last.ckpt" in line, line
    assert "resume with" in line.lower() and "another --run_name" in line, line
    assert folder_bytes(run) == before


def test_a_resume_that_fails_after_the_checks_writes_nothing_to_the_run_folder(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    before = folder_bytes(run)
    failing = [
        {"class_path": "helpers.fault_probes.RaiseAt", "init_args": {"hook": "on_fit_start", "message": "late fault"}}
    ]
    result = run_cli(
        "--config", str(one_epoch_recipe(tmp_path, failing)), "--ckpt_path", "last", cwd=tmp_path, probes=True
    )
    assert result.returncode != 0 and "late fault" in result.stderr, result.stderr[-3000:]
    assert folder_bytes(run) == before


def test_a_resume_removes_only_the_temporary_files_of_a_killed_save(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    checkpoints = run / "version_0" / "checkpoints"
    ours = [".last.ckpt.k3j2_h1g.tmp", ".best-epoch=0-step=5.ckpt.abcdefgh.tmp"]
    theirs = ["my.ckpt.abcdefgh.tmp", ".last.ckpt.keep", ".last.ckpt.k3j2h1g0.tmp.txt", "notes.txt"]
    for name in ours + theirs:
        (checkpoints / name).write_bytes(b"partial")
    other_version = run / "version_1" / "checkpoints"  # another run's folder: not this resume's to clean
    other_version.mkdir(parents=True)
    (other_version / ours[0]).write_bytes(b"in flight")
    result = run_cli(
        "--config", str(one_epoch_recipe(tmp_path)), "--ckpt_path", str(checkpoints / "last.ckpt"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in checkpoints.iterdir()}
    assert not names & set(ours) and set(theirs) <= names, names
    assert (other_version / ours[0]).read_bytes() == b"in flight"


def test_an_older_checkpoint_without_recorded_settings_is_checked_on_what_it_holds(tmp_path):
    """A checkpoint written before the settings were recorded: its model hyper-parameters, and a loader position of a
    loader without workers (torchdata keeps no '_snapshot' then), still refuse a change, naming it."""
    from aa_lightning.training.cli import CheckpointError, check_resume_settings

    checkpoint = {
        "hyper_parameters": {"base_lr": 0.2, "model_name": "x"},
        "loops": {"fit_loop": {"state_dict": {"combined_loader": [{"_num_yielded": 3, "fetcher_state": {}}]}}},
    }
    path = tmp_path / "last.ckpt"
    check_resume_settings(checkpoint, path, {"model.base_lr": 0.2, "data.num_workers": 0, "world size": 4})
    with pytest.raises(CheckpointError, match=r"model.base_lr 0.4 but the checkpoint's 0.2"):
        check_resume_settings(checkpoint, path, {"model.base_lr": 0.4, "data.num_workers": 0})
    with pytest.raises(CheckpointError, match=r"data.num_workers 2 but the checkpoint's 0"):
        check_resume_settings(checkpoint, path, {"model.base_lr": 0.2, "data.num_workers": 2})
