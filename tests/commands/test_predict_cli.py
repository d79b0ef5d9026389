"""End to end: train.py (in-process, as cli_helpers.run_cli runs it) with the attention callback from YAML writes
overlays to TensorBoard; aa_lightning.predict (in-process, then once as `python -m`) and `python -m
aa_lightning.export` run on its checkpoint."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.cli_helpers import events, run_cli, run_main_in_process
from helpers.cli_helpers import run_python as run
from PIL import Image

from aa_lightning.viz.overlay import tile_origin

TINY_AA_WRN = {"depth": 10, "widen_factor": 1, "aa_heads": 2, "aa_min_dkh": 4}  # 3 AA layers, 77k parameters


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """runs/tiny/version_0 of a 2-epoch train.py run of a tiny AA-WRN with the callback on (every epoch)."""
    root = tmp_path_factory.mktemp("cli")
    recipe = {
        "seed_everything": 0,
        "runs_dir": str(root / "runs"),
        "run_name": "tiny",
        "test_ckpt_path": None,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "limit_train_batches": 2,
            "callbacks": [
                {
                    "class_path": "aa_lightning.callbacks.AttentionMapLogger",
                    "init_args": {
                        "every_n_epochs": 1,
                        "num_images": 2,
                        "queries": [[0.5, 0.5], [0.2, 0.8]],
                        "tile_size": 48,
                    },
                }
            ],
        },
        "model": {
            "class_path": "aa_lightning.tasks.ImageClassifier",
            "init_args": {
                "model_name": "aa_wrn28_10",
                "model_kwargs": TINY_AA_WRN,
                "num_classes": 4,
                "warmup_epochs": 0,
            },
        },
        "data": {
            "class_path": "aa_lightning.data.SyntheticCIFARDataModule",
            "init_args": {
                "data_dir": str(root / "data"),
                "num_classes": 4,
                "train_size": 32,
                "test_size": 8,
                "val_split": 8,
                "batch_size": 8,
                "num_workers": 0,
            },
        },
        "image_grid": {"num_images": 0},
    }
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe))
    result = run_cli("--config", str(config), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny" / "version_0"


def test_training_logs_attention_overlays_from_the_yaml_callback(trained_run):
    logged_events = events(trained_run)
    tags = [t for t in logged_events.Tags()["images"] if t.startswith("val/attention_")]
    assert sorted(tags) == ["val/attention_0", "val/attention_1"]
    for tag in tags:
        logged = logged_events.Images(tag)
        assert [e.step for e in logged] == [2, 4]  # after each of the 2 epochs of 2 steps
        width, height = tile_origin(2, 3, tile_size=48, header_lines=2)  # 2 query rows of (input + 2 heads) 48 px tiles
        assert logged[0].height == height and logged[0].width >= width


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    photo, broken = folder / "photo.jpg", folder / "broken.png"
    Image.fromarray(rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)).save(photo)
    broken.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return [photo, broken]


def test_predict_command_writes_predictions_and_overlays(trained_run, image_files, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    contents = torch.load(ckpt, weights_only=True)  # train.py's checkpoint describes itself
    assert contents["class_names"] == [f"plus_at_{a:03d}deg_of_square" for a in (0, 90, 180, 270)]
    assert tuple(contents["data_config"]["input_size"]) == (3, 32, 32) and contents["data_config"]["crop_pct"] == 1
    shutil.rmtree(trained_run.parents[2] / "data")  # predict needs no data folder (nor an export, below)
    from aa_lightning.predict import main

    result = run_main_in_process(  # the `python -m` entry point: the failing call below
        main,
        "--ckpt",
        str(ckpt),
        "--images",
        str(image_files[0]),
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
        program=["-m", "aa_lightning.predict"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())[0]
    assert record["layer"] == "stages.2.0.conv1"  # the last AA layer
    assert len(record["top_k"]) == 4 and all(
        p["name"].startswith("plus_at_") for p in record["top_k"]
    )  # 4 classes < top-5
    assert sum(p["probability"] for p in record["top_k"]) == pytest.approx(1.0, abs=1e-5)
    figure = Image.open(tmp_path / "out" / "photo.png")
    width, height = tile_origin(3, 3, tile_size=128, header_lines=1 + 4 + 1)  # 3 default queries x (input + 2 heads)
    assert figure.height == height and figure.width >= width

    result = run("-m", "aa_lightning.predict", "--ckpt", str(ckpt), "--images", *map(str, image_files), cwd=tmp_path)
    assert (
        result.returncode == 2 and f"cannot read image {image_files[1]}" in result.stderr
    )  # more errors: test_predict.py


@pytest.mark.slow  # the same export runs in-process in test_export.py; this adds the `python -m` entry point
def test_export_command_round_trips(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run("-m", "aa_lightning.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads((tmp_path / "export" / "export.json").read_text())["max_abs_difference"]
    assert set(differences) == {"onnx", "safetensors"} and max(differences.values()) < 1e-4
    assert "onnxruntime" in result.stdout
