"""Bad settings that train.py reports in one line (issue 22, items 13 and 15): a ValueError of this project's classes
while the CLI builds the model or the data, a --runs_dir that is a file, a duplicate key in a recipe."""

from __future__ import annotations

import os
import re

import pytest
from helpers.cli_helpers import REPO, aa_recipe, run_cli


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """train.py's main in this process: (exit status, stderr)."""
    from aa_lightning.training.cli import main

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as info:
        main(args=args)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.base_lr", "-0.1"], "model.base_lr must be > 0, got -0.1"),
        (["--data.batch_size", "0"], "data.batch_size must be >= 1, got 0"),
        (["--data.num_workers", "-1"], "data.num_workers must be >= 0, got -1"),
        (["--model.model_kwargs", "{aa_k: -0.2}"], "aa_k"),
    ],
)
def test_a_setting_refused_by_the_projects_classes_is_one_error_line(tmp_path, monkeypatch, capsys, override, message):
    recipe = aa_recipe(tmp_path)
    code, err = run_main(["--config", str(recipe), *override], monkeypatch, capsys)
    assert code == 2
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("train.py: error: "), err[-3000:]
    assert message in error_lines[0] and "AA_LIGHTNING_DEBUG=1" in error_lines[0]
    assert "Traceback" not in err and "Namespace(" not in err
    assert not (tmp_path / "runs").exists()


def test_the_debug_variable_keeps_the_whole_traceback(tmp_path, monkeypatch, capsys):
    from aa_lightning.training.cli import main

    monkeypatch.setenv("AA_LIGHTNING_DEBUG", "1")
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(ValueError, match=r"model.base_lr must be > 0, got -0.1"):
        main(args=["--config", str(aa_recipe(tmp_path)), "--model.base_lr", "-0.1"])


def test_runs_dir_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    runs.write_text("my notes")
    for given in (runs, runs / "sub"):
        code, err = run_main(["--config", str(aa_recipe(tmp_path)), "--runs_dir", str(given)], monkeypatch, capsys)
        assert code == 2
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert f"--runs_dir {given}" in line and f"{runs} is a file" in line, line
        assert "Traceback" not in err
    assert runs.read_text() == "my notes"


def test_a_duplicate_key_in_a_recipe_names_the_file_and_the_key(tmp_path, monkeypatch, capsys):
    recipe = aa_recipe(tmp_path)
    text = recipe.read_text()
    nested = re.sub(r"^( +)base_lr: 0.2$", r"\1base_lr: 0.2\n\1base_lr: 0.5", text, count=1, flags=re.M)
    assert nested != text
    cases = [("nested.yaml", nested, "base_lr"), ("top.yaml", text + "seed_everything: 3\n", "seed_everything")]
    for name, content, key in cases:
        path = tmp_path / name
        path.write_text(content)
        code, err = run_main(["--config", str(path)], monkeypatch, capsys)
        assert code != 0
        (line,) = [line for line in err.splitlines() if "duplicate key" in line]
        assert str(path) in line and f"'{key}'" in line, err[-3000:]
    assert not (tmp_path / "runs").exists()


def test_missing_object_store_credentials_are_one_line(tmp_path, monkeypatch):
    """Issue 22 item 15: the streamed recipe on a bucket without credentials: one error line naming the URI."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    uri = "s3://aa-lightning-no-such-bucket/imagenet_litdata"
    result = run_cli(
        "--config",
        str(REPO / "configs" / "imagenet_aa_resnet50_streaming.yaml"),
        "--data.init_args.data_dir",
        uri,
        "--model.init_args.model_name",
        "resnet18",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--runs_dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: data.data_dir: cannot read {uri}/"), last
    assert "Traceback" not in result.stderr
