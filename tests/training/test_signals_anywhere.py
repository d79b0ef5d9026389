"""SIGTERM / SIGINT outside the training steps (issue 22, item 7): during the sanity check, before training, during
the test, the run exits 143 / 130 with one line saying so, never 0."""

from __future__ import annotations

import pytest
from helpers.cli_helpers import aa_recipe, run_cli


def signal_at(hook: str, signame: str) -> dict:
    return {"class_path": "helpers.fault_probes.SignalAt", "init_args": {"hook": hook, "signal_name": signame}}


@pytest.mark.parametrize(
    "hook, signame, code, stage",
    [
        ("on_sanity_check_start", "TERM", 143, "sanity_check"),
        ("on_fit_start", "INT", 130, "train"),
        ("on_test_start", "TERM", 143, "test"),
    ],
)
def test_a_signal_outside_the_training_steps_exits_128_plus_signal(tmp_path, hook, signame, code, stage):
    recipe = aa_recipe(tmp_path, callbacks=[signal_at(hook, signame)])
    result = run_cli(
        "--config",
        str(recipe),
        "--trainer.num_sanity_val_steps",
        "1",
        "--trainer.max_epochs",
        "1",
        "--test_ckpt_path",
        "last",
        cwd=tmp_path,
        probes=True,
    )
    assert result.returncode == code, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: stopped by SIG{signame} ({stage})"), last
    assert "Traceback" not in result.stderr
    assert "run summary" not in result.stdout
