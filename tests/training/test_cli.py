"""train.py end to end on tiny generated data: fit + test, resume, DDP, bf16, errors; in this process through
cli_helpers.run_cli, DDP and the README's quickstart command in subprocesses."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli_helpers import REPO, TRAIN, run_cli
from helpers.cli_helpers import events as _events

TEST_SIZE = 21  # odd: DDP over 2 processes must not pad it
# a 77k-parameter AA-WRN-10-1: relative attention in the first conv of the 16x16 and 8x8 groups
TINY_AA = {
    "model_name": "aa_wrn28_10",
    "model_kwargs": {"depth": 10, "widen_factor": 1, "aa_stages": [2, 3], "aa_heads": 2, "aa_min_dkh": 4},
}


def tiny_recipe(tmp_path: Path, model: dict | None = None, **data_overrides) -> Path:
    """A recipe that trains timm's test network (or the ``model`` init_args given) for 4 steps on 64
    generated 32x32 images."""
    recipe = {
        "seed_everything": 0,
        "runs_dir": str(tmp_path / "runs"),
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "aa_lightning.tasks.ImageClassifier",
            "init_args": {
                "model_name": "test_resnet",
                "num_classes": 4,
                "base_lr": 0.1,
                "warmup_epochs": 0.5,
                **(model or {}),
            },
        },
        "data": {
            "class_path": "aa_lightning.data.SyntheticCIFARDataModule",
            "init_args": {
                "data_dir": str(tmp_path / "data"),
                "num_classes": 4,
                "train_size": 48,
                "test_size": TEST_SIZE,
                "val_split": 16,
                "batch_size": 8,
                "num_workers": 0,
                **data_overrides,
            },
        },
        "image_grid": {"num_images": 8},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def summary_value(stdout: str, pattern: str) -> str:
    match = re.search(pattern, stdout)
    assert match, f"{pattern!r} not in the summary:\n{stdout[-3000:]}"
    return match.group(1)


def evaluate_checkpoint(checkpoint: Path, data_args: dict, split: str) -> tuple[int, int]:
    """(correct, images): one process, the checkpoint's network in eval mode, argmax over ``split``
    ("val" or "test") of a SyntheticCIFARDataModule built with ``data_args``; counted here, not by
    torchmetrics."""
    from aa_lightning.data import SyntheticCIFARDataModule
    from aa_lightning.tasks import ImageClassifier

    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    datamodule = SyntheticCIFARDataModule(**data_args)
    datamodule.setup("fit" if split == "val" else "test")
    correct = images = 0
    with torch.no_grad():
        for x, y in getattr(datamodule, f"{split}_dataloader")():
            correct += int((model(x).argmax(dim=1) == y).sum())
            images += len(y)
    return correct, images


def best_checkpoint(version: Path) -> Path:
    (best,) = (version / "checkpoints").glob("best-*.ckpt")
    return best


def recipe_data_args(tmp_path: Path) -> dict:
    return yaml.safe_load((tmp_path / "tiny.yaml").read_text())["data"]["init_args"]


def test_fit_then_test_writes_checkpoints_tensorboard_and_a_summary(tmp_path):
    result = run_cli("--config", str(tiny_recipe(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    version = tmp_path / "runs" / "tiny" / "version_0"
    assert "run summary" in out
    assert summary_value(out, r"model\s+test_resnet \(.*\), (\d+) optimizer steps") == "4"  # 32 training images / 8
    assert summary_value(out, r"test \(best checkpoint, (\d+) images\)") == str(TEST_SIZE)
    # the summary's test top-1 is the best checkpoint's accuracy on the 21 test images, counted independently
    top1 = float(summary_value(out, r"test \(best.*top1 ([\d.]+)%"))
    correct, images = evaluate_checkpoint(best_checkpoint(version), recipe_data_args(tmp_path), "test")
    assert images == TEST_SIZE and top1 == pytest.approx(100 * correct / images, abs=0.006)
    assert f"tensorboard --logdir {tmp_path / 'runs' / 'tiny'}" in out
    best = list((version / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (version / "checkpoints" / "last.ckpt").is_file()
    assert str(best[0]) in out
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["init_args"]["model_name"] == "test_resnet"
    assert saved["checkpoint"]["monitor"] == "val/top1" and saved["checkpoint"]["mode"] == "max"
    events = _events(version)
    tags = events.Tags()
    for tag in ("train/loss_step", "train/lr", "val/top1", "val/top5", "val/loss", "test/top1", "test/top5"):
        assert tag in tags["scalars"], tag
    assert "train/images" in tags["images"]
    assert (version / "hparams.yaml").is_file() and "model_name: test_resnet" in (version / "hparams.yaml").read_text()
    ckpt = torch.load(best[0], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["model_name"] == "test_resnet"


def test_resume_from_last_continues_the_step_count_in_the_same_run(tmp_path):
    """A 2-epoch run stopped by SIGTERM at the end of epoch 0 (step 4), resumed: one run of 8 steps. (Resuming with
    another trainer.max_epochs is refused: tests/training/test_resume_changes.py.)"""
    recipe = tiny_recipe(tmp_path)
    config = yaml.safe_load(recipe.read_text())
    config["trainer"]["max_epochs"] = 2
    recipe.write_text(yaml.safe_dump(config))
    config["trainer"]["callbacks"] = [
        {
            "class_path": "helpers.fault_probes.StepProbe",
            "init_args": {"report": str(tmp_path / "steps.jsonl"), "kill_at": 4, "signal_name": "TERM"},
        }
    ]
    stopped = tmp_path / "stopped" / "tiny.yaml"  # the same run name, runs_dir and data
    stopped.parent.mkdir()
    stopped.write_text(yaml.safe_dump(config))
    first = run_cli("--config", str(stopped), "--test_ckpt_path", "null", cwd=tmp_path, probes=True)
    assert first.returncode == 143, first.stderr[-3000:]
    recipe = str(recipe)
    second = run_cli("--config", recipe, "--ckpt_path", "last", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert summary_value(second.stdout, r"(\d+) optimizer steps") == "8"
    version = tmp_path / "runs" / "tiny" / "version_0"
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists()
    last = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 8
    steps = [event.step for event in _events(version).Scalars("train/lr")]
    assert steps[-1] == 7  # lr of steps 0..7 logged across both invocations


def test_ddp_two_processes_on_cpu_test_every_image_once(tmp_path):
    """An AA network under DDP (2 gloo processes): the validation top-1 it logs is the accuracy of its
    checkpoint over the whole validation split (15 images: 8 + 7 per process), evaluated in one process."""
    recipe = tiny_recipe(tmp_path, model=TINY_AA, val_split=15)
    result = run_cli("--config", str(recipe), "--trainer.strategy", "ddp", "--trainer.devices", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    version = tmp_path / "runs" / "tiny" / "version_0"
    (logged,) = [event.value for event in _events(version).Scalars("val/top1")]
    correct, images = evaluate_checkpoint(version / "checkpoints" / "last.ckpt", recipe_data_args(tmp_path), "val")
    assert images == 15 and logged == pytest.approx(correct / images, abs=1e-6), (logged, correct)
    # 33 training images over 2 processes x batch 8 (17 each, last batch dropped): 2 steps of a global batch of 16
    assert summary_value(result.stdout, r"(\d+) optimizer steps") == "2"
    assert "global batch 16" in result.stdout + result.stderr
    assert summary_value(result.stdout, r"test \(best checkpoint, (\d+) images\)") == str(TEST_SIZE)
    assert result.stdout.count("run summary") == 1  # printed by rank 0 only


def test_bf16_mixed_on_cpu_trains_an_aa_network_and_sync_batchnorm_is_explained_not_fatal(tmp_path):
    """An AA network in bf16-mixed fits its 32 training images (no augmentation): 12 epochs of 4 AdamW
    steps must bring the epoch-mean training loss of the last 3 epochs below 3/4 of the first epoch's.
    Measured (seed 0): 1.389 in epoch 1, 0.754 / 0.783 / 0.787 in epochs 10-12; a zero loss or a skipped
    optimizer step keeps it at ~ln 4 = 1.39."""
    adamw = {
        "optimizer": "adamw",
        "base_lr": 0.003,
        "reference_batch_size": None,
        "weight_decay": 0.0,
        "warmup_epochs": 0.5,
    }
    recipe = tiny_recipe(tmp_path, model={**TINY_AA, **adamw}, pad=0)
    result = run_cli(
        "--config",
        str(recipe),
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.max_epochs",
        "12",
        "--trainer.sync_batchnorm",
        "true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16" in result.stderr  # Lightning reports the precision plugin
    assert "sync_batchnorm is ignored" in result.stderr and "needs CUDA" in result.stderr
    assert summary_value(result.stdout, r"test \(best checkpoint, (\d+) images\)") == str(TEST_SIZE)
    assert summary_value(result.stdout, r"model\s+(\S+) \(") == "aa_wrn28_10"
    assert summary_value(result.stdout, r"(\d+) optimizer steps") == "48"
    losses = [event.value for event in _events(tmp_path / "runs" / "tiny" / "version_0").Scalars("train/loss_epoch")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.75 * losses[0], losses


def test_print_config_shows_dotted_overrides_in_subclass_mode(tmp_path):
    result = run_cli(
        "--config",
        str(tiny_recipe(tmp_path)),
        "--model.model_name",
        "resnet10t",
        "--data.batch_size",
        "3",
        "--trainer.devices",
        "1",
        "--print_config",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    assert config["model"]["init_args"]["model_name"] == "resnet10t"
    assert config["data"]["init_args"]["batch_size"] == 3
    assert config["data"]["init_args"]["train_size"] == 48  # the synthetic module's own argument
    assert config["data"]["init_args"]["val_split"] == 16  # an argument it forwards to CIFAR100DataModule
    assert not (tmp_path / "runs").exists()  # printing the config trains nothing


def test_a_bad_value_fails_at_start_up_naming_the_key(tmp_path):
    result = run_cli("--config", str(tiny_recipe(tmp_path)), "--model.optimizer", "sgdd", cwd=tmp_path)
    assert result.returncode != 0
    assert "optimizer" in result.stderr and "sgdd" in result.stderr and "adamw" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_cifar_data_names_the_path(tmp_path):
    recipe = tiny_recipe(tmp_path)
    config = yaml.safe_load(recipe.read_text())
    config["data"] = {
        "class_path": "aa_lightning.data.CIFAR100DataModule",
        "init_args": {"data_dir": str(tmp_path / "no_cifar"), "download": False, "num_workers": 0},
    }
    recipe.write_text(yaml.safe_dump(config))
    result = run_cli("--config", str(recipe), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{tmp_path / 'no_cifar' / 'cifar-100-python' / 'train'}" in result.stderr
    assert "--data.download true" in result.stderr


@pytest.mark.parametrize(
    "override, named",
    [
        (["--model.bogus_option", "1"], "bogus_option"),
        (["--trainer.max_epoch", "3"], "max_epoch"),  # no silent completion to max_epochs
        (["--trainer.max_epohcs", "3"], "max_epohcs"),
        (["--model.base_lr", "fast"], "base_lr"),
        (["--model.lr_milestones", "[1]"], "lr_milestones"),  # renamed lr_milestone_epochs: no silent acceptance
        (["--data.batch_size", "many"], "batch_size"),
    ],
)
def test_unknown_keys_and_bad_values_stop_the_parser_naming_the_key(tmp_path, capsys, monkeypatch, override, named):
    from aa_lightning.training.cli import AACLI

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as info:
        AACLI(args=["--config", str(tiny_recipe(tmp_path)), *override])
    assert info.value.code != 0
    assert named in capsys.readouterr().err


def test_a_value_checked_by_the_class_stops_the_run_before_training(tmp_path, monkeypatch):
    from aa_lightning.training.cli import AACLI

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(ValueError, match=r"model.label_smoothing must be in \[0, 1\)"):
        AACLI(args=["--config", str(tiny_recipe(tmp_path)), "--model.label_smoothing", "1.5"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_quickstart_trains_an_aa_network_well_above_chance_within_five_minutes(tmp_path):
    """The README's main-job command, as it is (only its outputs redirected to tmp_path)."""
    import time

    start = time.perf_counter()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--runs_dir",
            str(tmp_path / "runs"),
            "--data.data_dir",
            str(tmp_path / "data"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert config["model"]["init_args"]["model_name"].startswith("aa_")
    top1 = float(summary_value(result.stdout, r"test \(best checkpoint, 2000 images\).*top1 ([\d.]+)%"))
    assert top1 > 50.0  # chance: 10%
    assert elapsed < 300, f"quickstart took {elapsed:.0f} s"
