"""Faults of train.py that must give a clear error and lose nothing (issue 12, items 2, 3, 6, 8, 10)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli_helpers import REPO, aa_recipe, run_cli


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoints_are_written_atomically_beside_the_target_whatever_tmpdir_is(tmp_path, monkeypatch):
    """Item 2: a write killed before the rename leaves the old file intact and nothing in $TMPDIR."""
    from aa_lightning.training.faults import AtomicCheckpointIO

    other_tmp = tmp_path / "elsewhere"
    other_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other_tmp))
    target = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()
    renames = []

    def killed(src, dst):
        renames.append((Path(src).parent, Path(dst)))
        raise KeyboardInterrupt  # the kill arrives between the write and the rename

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert renames == [(target.parent, target)]
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert list(other_tmp.iterdir()) == []


def test_ckpt_path_last_skips_a_broken_last_ckpt_and_a_bad_path_gets_one_line(tmp_path, capsys):
    """Item 2: 'last' falls back to the newest intact checkpoint with a warning naming the bad file; a bad file
    given by path is one CheckpointError line naming it."""
    from aa_lightning.training.cli import (
        CheckpointError,
        find_last_checkpoint,
        load_checkpoint_file,
    )

    folder = tmp_path / "runs" / "r" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3}, folder / "best-epoch=0-step=3.ckpt")
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match=re.escape(str(folder / "last.ckpt"))):
        path, version, _ = find_last_checkpoint(str(tmp_path / "runs"), "r")
    assert path == folder / "best-epoch=0-step=3.ckpt" and version == 0
    whole = (folder / "best-epoch=0-step=3.ckpt").read_bytes()
    for name, content in [("empty.ckpt", b""), ("cut.ckpt", whole[: len(whole) // 2]), ("random.ckpt", b"\x8a" * 999)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_a_rejected_resume_writes_nothing_to_the_run_folder(tmp_path):
    """Items 2 and 3: another model's resume and a truncated checkpoint fail with one line naming the file,
    before config.yaml or an events file is touched."""
    recipe = aa_recipe(tmp_path)
    first = run_cli("--config", str(recipe), "--trainer.max_epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_aa"
    before = folder_bytes(run)
    other = run_cli(
        "--config",
        str(recipe),
        "--ckpt_path",
        "last",
        "--model.init_args.num_classes",
        "5",
        "--data.init_args.num_classes",
        "5",
        cwd=tmp_path,
    )
    assert other.returncode == 1
    assert "num_classes=4" in other.stderr and "num_classes=5" in other.stderr and "last.ckpt" in other.stderr
    assert "Traceback" not in other.stderr
    assert folder_bytes(run) == before
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli("--config", str(recipe), "--ckpt_path", str(bad), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}" in result.stderr.strip().splitlines()[-1]
    assert folder_bytes(run) == before


def test_a_non_finite_loss_stops_the_run_naming_step_value_and_checkpoint(tmp_path):
    """Item 8: base_lr 1e12 diverges; the run stops at the first non-finite loss (the attention callback
    does not crash), naming the step, the value and the last good checkpoint."""
    recipe = aa_recipe(
        tmp_path,
        callbacks=[{"class_path": "aa_lightning.callbacks.AttentionMapLogger", "init_args": {"num_images": 2}}],
    )
    result = run_cli(
        "--config", str(recipe), "--model.init_args.base_lr", "1e12", "--checkpoint_every_n_steps", "1", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr
    match = re.search(r"error: training stopped: the loss is (\S+) \(not finite\) at step (\d+)", line)
    assert match, line
    assert match.group(1) in ("nan", "inf", "-inf")
    assert "the last good checkpoint is" in line
    step = int(match.group(2))
    if step > 1:
        last = tmp_path / "runs" / "tiny_aa" / "version_0" / "checkpoints" / "last.ckpt"
        assert str(last) in line
        assert torch.load(last, weights_only=False)["global_step"] == step - 1


def test_attention_overlays_draw_nan_maps_without_crashing():
    """Item 8: a diverged model's NaN attention maps become empty heat maps, not an IndexError."""
    from aa_lightning.viz.overlay import heat_tiles, overlay

    maps = torch.full((2, 4, 4), float("nan"))
    heat = heat_tiles(maps, 16)
    assert torch.equal(heat, torch.zeros(2, 16, 16))
    assert torch.isfinite(overlay(torch.rand(3, 16, 16), torch.full((2, 16, 16), float("nan")))).all()


def _model_kwargs(*args: str) -> dict:
    """``model.init_args.model_kwargs`` of the config that ``train.py *args --print_config`` prints (in-process)."""
    import contextlib
    import io
    from unittest import mock

    from aa_lightning.training.cli import AACLI

    out = io.StringIO()
    with mock.patch("sys.argv", ["train.py"]), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        AACLI(args=[*args, "--print_config"])
    assert info.value.code in (None, 0)
    return yaml.safe_load(out.getvalue())["model"]["init_args"]["model_kwargs"]


def test_model_kwargs_overrides_merge_into_the_recipes_dict(tmp_path, monkeypatch):
    """Item 6: a command-line or second-config model_kwargs adds to the recipe's dict; another model starts afresh."""
    from aa_lightning.training.cli import AACLI

    quickstart = str(REPO / "configs" / "quickstart.yaml")
    recipe = yaml.safe_load(Path(quickstart).read_text())["model"]["init_args"]["model_kwargs"]
    override = _model_kwargs("--config", quickstart, "--model.init_args.model_kwargs", "{aa_k: 0.3}")
    assert override == {**recipe, "aa_k": 0.3}
    assert _model_kwargs("--config", quickstart, "--model.model_kwargs={aa_heads: 4}") == {**recipe, "aa_heads": 4}
    ablations = sorted((REPO / "configs" / "ablations").glob("*.yaml"))
    assert ablations
    for ablation in ablations:
        text = ablation.read_text()
        given = yaml.safe_load(text)["model"]["init_args"]["model_kwargs"]
        one_line = re.search(r"--model\.model_kwargs '(\{.*?\})'", text).group(1)
        # one base per ablation (alternating): the merge is the same code for every pair
        bases = (quickstart, str(REPO / "configs" / "imagenet_aa_resnet50.yaml"))
        for base in (bases[ablations.index(ablation) % 2],):
            base_kwargs = yaml.safe_load(Path(base).read_text())["model"]["init_args"]["model_kwargs"]
            assert _model_kwargs("--config", base, "--config", str(ablation)) == {**base_kwargs, **given}, ablation
            one_line_kwargs = _model_kwargs("--config", base, "--model.model_kwargs", one_line)
            assert one_line_kwargs == {**base_kwargs, **given}, ablation
    baseline = str(REPO / "configs" / "quickstart_baseline.yaml")
    assert _model_kwargs("--config", quickstart, "--config", baseline) == {"depth": 10, "widen_factor": 2}
    # the merged dict is what the model is built with
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = AACLI(
        args=[
            "--config",
            quickstart,
            "--model.init_args.model_kwargs",
            "{aa_k: 0.3}",
            "--data.init_args.data_dir",
            str(tmp_path / "data"),
            "--runs_dir",
            str(tmp_path / "runs"),
        ]
    )
    assert dict(cli.model.hparams.model_kwargs) == {**recipe, "aa_k": 0.3}
    assert sum(p.numel() for p in cli.model.parameters()) < 1_000_000  # not a full WRN-28-10


def test_a_yaml_syntax_error_names_the_file(tmp_path, capsys, monkeypatch):
    """Item 10: the parser's error names the --config file, not '<unicode string>'."""
    from aa_lightning.training.cli import AACLI

    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  init_args: {model_kwargs: [1, 2\n")
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as info:
        AACLI(args=["--config", str(bad)])
    assert info.value.code != 0
    assert str(bad) in capsys.readouterr().err
