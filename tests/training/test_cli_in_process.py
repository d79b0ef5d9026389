"""cli_helpers.run_cli runs train.py in the test process: it must report what a fresh process would (exit code,
stdout, stderr with warnings and Lightning's log lines) and leave the test process as it found it."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers.cli_helpers import TRAIN, aa_recipe, launches_processes, run_cli_in_process


def test_an_in_process_run_reports_like_a_process_and_leaves_no_state_behind(tmp_path):
    recipe = str(aa_recipe(tmp_path))
    before = (torch.get_num_threads(), os.getcwd(), list(sys.argv), dict(os.environ))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)

    trained = run_cli_in_process(
        "--config", recipe, "--trainer.max_steps", "1", "--trainer.sync_batchnorm", "true", cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.args == [sys.executable, str(TRAIN), "--config", recipe, *trained.args[4:]]
    assert "run summary" in trained.stdout and "1 optimizer steps" in trained.stdout
    assert "trainer.sync_batchnorm is ignored on this run" in trained.stderr  # a warning, on the run's stderr
    assert "GPU available:" in trained.stderr  # Lightning's logger, on the run's stderr
    assert (tmp_path / "runs" / "tiny_aa" / "version_0" / "checkpoints" / "last.ckpt").is_file()  # in cwd's runs_dir

    printed = run_cli_in_process("--config", recipe, "--data.init_args.batch_size", "3", "--print_config", cwd=tmp_path)
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["data"]["init_args"]["batch_size"] == 3
    unknown = run_cli_in_process("--config", recipe, "--model.init_args.optimizer", "sgdd", cwd=tmp_path)
    assert unknown.returncode == 2 and "sgdd" in unknown.stderr and unknown.stdout == ""  # the parser's exit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("aa_lightning.training.cli.AACLI", lambda *args, **kwargs: 1 / 0)
        uncaught = run_cli_in_process("--config", recipe, cwd=tmp_path)
    assert uncaught.returncode == 1  # as the interpreter exits on an uncaught exception, with its traceback
    assert "Traceback" in uncaught.stderr and "ZeroDivisionError: division by zero" in uncaught.stderr

    assert (torch.get_num_threads(), os.getcwd(), list(sys.argv), dict(os.environ)) == before
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])  # seed 0 undone


def test_a_run_uses_one_torch_thread(tmp_path, monkeypatch):
    seen = []
    import aa_lightning.training.cli as cli

    monkeypatch.setattr(cli, "AACLI", lambda *args, **kwargs: seen.append(torch.get_num_threads()) or sys.exit(0))
    assert run_cli_in_process("--config", str(aa_recipe(tmp_path)), cwd=tmp_path).returncode == 0
    assert seen == [1]


@pytest.mark.parametrize(
    "trainer, overrides, expected",
    [
        ({"devices": 1}, [], False),
        ({"devices": 1}, ["--trainer.strategy", "ddp"], True),
        ({"devices": 1}, ["--trainer.devices=2"], True),
        ({"devices": 2, "strategy": "ddp"}, ["--trainer.devices", "1", "--trainer.strategy", "auto"], False),
        ({"devices": [0, 1]}, [], True),
        ({"strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy"}}, [], True),
        ({"devices": 1, "num_nodes": 2}, [], True),
        ({"devices": 2, "strategy": "ddp"}, ["--print_config"], False),  # prints, launches nothing
    ],
)
def test_distributed_runs_are_recognised_for_a_fresh_process(tmp_path, trainer, overrides, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"trainer": trainer}))
    assert launches_processes(["--config", str(recipe), *overrides]) is expected
