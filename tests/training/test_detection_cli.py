"""Detection through the real entry point (train.py's main, in this process; DDP in subprocesses), on a tiny
generated COCO set."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli_helpers
from helpers.cli_helpers import REPO
from helpers.cli_helpers import events as _events


def detection_recipe(tmp_path: Path, name: str = "tiny_det", **model_overrides) -> Path:
    """RetinaNet on timm's test_resnet, 4 steps on 8 generated 64px images, validation every 2 steps."""
    recipe = {
        "seed_everything": 0,
        "runs_dir": str(tmp_path / "runs"),
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "aa_lightning.callbacks.DetectionImageLogger",
                    "init_args": {"num_images": 2, "score_thresh": 0.0},
                }
            ],
        },
        "model": {
            "class_path": "aa_lightning.tasks.RetinaNetDetector",
            "init_args": {
                "num_classes": 5,
                "backbone": "test_resnet",
                "fpn_channels": 16,
                "freeze_at": 0,
                "frozen_bn": False,
                "anchor_sizes": [8, 16, 32, 64, 128],
                "optimizer": "adamw",
                "base_lr": 1e-3,
                "reference_batch_size": None,
                "warmup_steps": 1,
                "schedule": "cosine",
                "lr_milestone_steps": [],
                **model_overrides,
            },
        },
        "data": {
            "class_path": "aa_lightning.data.SyntheticCOCODataModule",
            "init_args": {
                "root": str(tmp_path / "data"),
                "num_train": 8,
                "num_val": 4,
                "image_size": 64,
                "min_object_size": 8,
                "batch_size": 4,
                "num_workers": 0,
                "train_min_size": 64,
                "eval_min_size": 64,
                "max_size": 96,
            },
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return cli_helpers.run_cli(*args, cwd=cwd, timeout=timeout)


def test_fit_validate_test_checkpoints_and_tensorboard(tmp_path):
    result = run_cli("--config", str(detection_recipe(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"RetinaNetDetector \([\d.]+M parameters\), 4 optimizer steps", out), out[-2000:]
    # a number >= 0: -1 is torchmetrics' "no ground truth in the evaluated images"
    assert re.search(r"test \(best checkpoint\)\s+map \d[\d.e-]*\s+map_50 \d", out), out[-2000:]
    version = tmp_path / "runs" / "tiny_det" / "version_0"
    best = list((version / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (version / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["checkpoint"]["monitor"] == "val/map" and saved["checkpoint"]["mode"] == "max"
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["categories"] == {"ids": [1, 3, 5, 7, 9], "names": ["circle", "square", "triangle", "cross", "bar"]}
    tags = _events(version).Tags()
    for tag in (
        "train/loss",
        "train/loss_cls",
        "train/loss_box",
        "train/lr",
        "val/map",
        "val/map_50",
        "val/map_75",
        "val/map_small",
        "val/map_medium",
        "val/map_large",
        "test/map",
        "test/map_50",
    ):
        assert tag in tags["scalars"], tag
    assert {"val/detections_0", "val/detections_1"} <= set(tags["images"])
    events = _events(version)
    assert [e.step for e in events.Scalars("val/map")] == [1, 3]  # validated after steps 2 and 4


def test_an_aa_backbone_retinanet_learns_to_detect_through_train_py(tmp_path):
    """AA-ResNet-18 at 1/4 width (stages 2-4 augmented, 2 heads) + a 32-channel FPN, 40 AdamW steps
    on 64 generated 64 px images (1-2 objects >= 16 px), validated on 16 others after steps 20 and 40.

    Measured (seed 0): val map 0.0117 / map_50 0.056 at step 20 (the best checkpoint), in 14 s on an
    idle core; the same run with lr 1e-12 (an untrained network) gives map 0, map_50 0, mar_100 0.
    """
    recipe = detection_recipe(
        tmp_path,
        name="tiny_aa_det",
        backbone="aa_resnet34",
        backbone_kwargs={
            "layers": [1, 1, 1, 1],
            "channels": [16, 32, 64, 128],
            "stem_width": 16,
            "aa_heads": 2,
            "img_size": 64,
        },
        fpn_channels=32,
        head_norm="group",
        base_lr=3e-3,
        warmup_steps=5,
    )
    config = yaml.safe_load(recipe.read_text())
    config["trainer"].update(max_steps=40, val_check_interval=20, check_val_every_n_epoch=None, log_every_n_steps=5)
    config["data"]["init_args"].update(num_train=64, num_val=16, max_objects=2, min_object_size=16, batch_size=8)
    recipe.write_text(yaml.safe_dump(config))
    result = run_cli("--config", str(recipe), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"RetinaNetDetector \([\d.]+M parameters\), 40 optimizer steps", out), out[-2000:]
    match = re.search(r"test \(best checkpoint\)\s+map (\S+)\s+map_50 (\S+).*mar_100 (\S+)", out)
    assert match, out[-2000:]
    mean_ap, ap_50, recall = (float(value) for value in match.groups())
    assert mean_ap > 0 and ap_50 > 0 and recall > 0, out[-2000:]  # -1 (no ground truth) and 0 (untrained) fail
    from aa_lightning.layers import augmented_layers
    from aa_lightning.tasks import RetinaNetDetector

    best = next((tmp_path / "runs" / "tiny_aa_det" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    assert len(augmented_layers(RetinaNetDetector.load_from_checkpoint(best, map_location="cpu"))) == 3


def test_num_classes_that_do_not_match_the_data_fail_naming_the_key(tmp_path):
    result = run_cli("--config", str(detection_recipe(tmp_path, num_classes=80)), cwd=tmp_path)
    assert result.returncode != 0
    assert "model.init_args.num_classes is 80 but the data set has 5 categories" in result.stderr


def test_bad_choice_fails_at_start_up_naming_the_key(tmp_path):
    result = run_cli("--config", str(detection_recipe(tmp_path)), "--model.init_args.p6p7_from", "p4", cwd=tmp_path)
    assert result.returncode != 0 and "p6p7_from" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.slow
def test_backbone_initialized_from_a_classification_run(tmp_path):
    classification = {
        "seed_everything": 0,
        "runs_dir": str(tmp_path / "runs"),
        "test_ckpt_path": None,
        "trainer": {
            "max_steps": 2,
            "accelerator": "cpu",
            "devices": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "limit_val_batches": 1,
        },
        "model": {
            "class_path": "aa_lightning.tasks.ImageClassifier",
            "init_args": {"model_name": "test_resnet", "num_classes": 4, "warmup_epochs": 0},
        },
        "data": {
            "class_path": "aa_lightning.data.SyntheticCIFARDataModule",
            "init_args": {
                "data_dir": str(tmp_path / "cifar"),
                "num_classes": 4,
                "train_size": 16,
                "test_size": 8,
                "val_split": 8,
                "batch_size": 8,
                "num_workers": 0,
            },
        },
        "image_grid": {"num_images": 0},
    }
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(classification))
    result = run_cli("--config", str(tmp_path / "cls.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    classifier_ckpt = tmp_path / "runs" / "cls" / "version_0" / "checkpoints" / "last.ckpt"
    recipe = detection_recipe(tmp_path, backbone_checkpoint=str(classifier_ckpt))
    result = run_cli("--config", str(recipe), "--trainer.max_steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the detector's checkpoint holds the weights: it loads without the classifier's checkpoint
    from aa_lightning.tasks import RetinaNetDetector

    detector_ckpt = tmp_path / "runs" / "tiny_det" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(detector_ckpt, map_location="cpu", weights_only=True)
    assert saved["backbone_init"] == {"checkpoint": str(classifier_ckpt), "pretrained": False}
    moved = classifier_ckpt.rename(tmp_path / "elsewhere.ckpt")
    detector = RetinaNetDetector.load_from_checkpoint(detector_ckpt, map_location="cpu")
    assert all(torch.equal(value, saved["state_dict"][key]) for key, value in detector.state_dict().items())
    moved.rename(classifier_ckpt)
    # the same checkpoint refuses another backbone, naming both models
    result = run_cli("--config", str(recipe), "--model.init_args.backbone", "resnet18", cwd=tmp_path)
    assert result.returncode != 0 and "'test_resnet'" in result.stderr and "'resnet18'" in result.stderr


@pytest.mark.parametrize("old, value", [("lr", 0.01), ("lr_batch_size", 16), ("milestones", [3]), ("gamma", 0.5)])
def test_old_optimizer_key_names_are_unknown_keys(old, value, tmp_path, capsys, monkeypatch):
    """The settings took the classifier's names (base_lr, reference_batch_size, lr_milestone_steps, lr_gamma)."""
    from aa_lightning.training.cli import AACLI

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as info:
        AACLI(args=["--config", str(detection_recipe(tmp_path, **{old: value})), "--print_config"])
    assert info.value.code not in (None, 0)
    assert f"Option '{old}' is not accepted" in capsys.readouterr().err


CONFIGS = REPO / "configs"


def _resolved(capsys, monkeypatch, recipe: Path) -> dict:
    from aa_lightning.training.cli import AACLI

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as info:
        AACLI(args=["--config", str(recipe), "--print_config"])
    assert info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("backbone", ["resnet50", "aa_resnet50", "resnet101", "aa_resnet101"])
def test_coco_recipes_follow_the_retinanet_1x_recipe(backbone, capsys, monkeypatch):
    import timm

    import aa_lightning  # noqa: F401  (registers the aa_* models)

    config = _resolved(capsys, monkeypatch, CONFIGS / f"coco_retinanet_{backbone}.yaml")
    init = config["model"]["init_args"]
    assert init["backbone"] == backbone and timm.is_model(backbone)
    assert config["model"]["class_path"] == "aa_lightning.tasks.RetinaNetDetector" and init["num_classes"] == 80
    assert (
        init["optimizer"],
        init["base_lr"],
        init["reference_batch_size"],
        init["momentum"],
        init["weight_decay"],
    ) == ("sgd", 0.01, 16, 0.9, 1e-4)
    assert (init["schedule"], init["lr_milestone_steps"], init["lr_gamma"], init["warmup_steps"]) == (
        "step",
        [60000, 80000],
        0.1,
        500,
    )
    assert init["fpn_channels"] == 256 and init["anchor_sizes"] == [32, 64, 128, 256, 512]
    assert (init["fg_iou_thresh"], init["bg_iou_thresh"]) == (0.5, 0.4)
    trainer, data = config["trainer"], config["data"]["init_args"]
    assert trainer["max_steps"] == 90000 and trainer["strategy"] == "ddp" and "mixed" in trainer["precision"]
    assert trainer["devices"] * data["batch_size"] == 16  # Detectron's 16 images per step
    assert (data["train_min_size"], data["eval_min_size"], data["max_size"]) == (800, 800, 1333)
    assert config["data"]["class_path"] == "aa_lightning.data.COCODataModule"


def test_quickstart_recipe_stays_small(capsys, monkeypatch):
    config = _resolved(capsys, monkeypatch, CONFIGS / "quickstart_detection.yaml")
    data = config["data"]["init_args"]
    assert config["data"]["class_path"] == "aa_lightning.data.SyntheticCOCODataModule"
    assert data["image_size"] <= 192
    steps_per_epoch = data["num_train"] // data["batch_size"]
    assert config["trainer"]["max_steps"] % (steps_per_epoch * config["trainer"]["check_val_every_n_epoch"]) == 0, (
        "the last step should be validated (the tested best checkpoint then includes the end of training)"
    )


@pytest.mark.slow
def test_ddp_two_processes_with_uneven_validation_shards(tmp_path):
    """5 val images over 2 processes (3 + 2: UnrepeatedDistributedSampler) must not break the mAP gather."""
    recipe = detection_recipe(tmp_path)
    result = run_cli(
        "--config",
        str(recipe),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "1",
        "--data.init_args.num_val",
        "5",
        "--data.init_args.eval_batch_size",
        "1",
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run summary") == 1
    tags = _events(tmp_path / "runs" / "tiny_det" / "version_0").Tags()["scalars"]
    assert "val/map" in tags and "test/map" in tags
