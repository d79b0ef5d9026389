"""Checkpoints that describe themselves (issue 21, goal 4): training records the evaluation preprocessing (timm's
data-config keys) and the class names in the checkpoint; predict and export read them there, never from data folders,
and the exported model's ``pretrained_cfg`` carries them, so timm's own ``resolve_data_config`` + ``create_transform``
preprocess an image exactly as predict does. Checkpoints written before say what to pass (``--data-config``)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_classifier import fit_and_save
from PIL import Image

from aa_lightning.data import ImageNetDataModule, SyntheticCIFARDataModule
from aa_lightning.export import main as export_main
from aa_lightning.predict import load_trained_classifier, preprocess
from aa_lightning.predict import main as predict_main

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_NAMES = [f"plus_at_{a:03d}deg_of_square" for a in (0, 90, 180, 270)]
IMAGENET_NAMES = ["n01_circle", "n02_square", "n03_triangle"]
IMAGENET_MEAN = (0.5, 0.4, 0.3)  # not the defaults: predict must take these from the checkpoint
IMAGENET_STD = (0.2, 0.25, 0.3)
EXPECTED = {
    "cifar": {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "crop_pct": 1.0,
        "crop_mode": "center",
    },
    "imagenet": {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 32 / 36,
        "crop_mode": "center",
    },
}


def _imagenet_folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for name in IMAGENET_NAMES:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, dict]:
    """A checkpoint trained on the CIFAR-format built-in set and one on an ImageNet-folder set, each with the
    evaluation transform of its data module applied to a test image; the data folders are deleted afterwards."""
    root = tmp_path_factory.mktemp("self_describing")
    rng = np.random.default_rng(5)
    cifar = SyntheticCIFARDataModule(
        data_dir=str(root / "cifar"),
        num_classes=4,
        train_size=16,
        test_size=8,
        val_split=4,
        batch_size=4,
        num_workers=0,
    )
    imagenet = ImageNetDataModule(
        data_dir=str(_imagenet_folder(root / "imagenet")),
        batch_size=2,
        num_workers=0,
        train_size=32,
        eval_size=32,
        resize_size=36,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    runs = {}
    for key, data, classes, shape in (("cifar", cifar, 4, (32, 32, 3)), ("imagenet", imagenet, 3, (36, 40, 3))):
        ckpt = fit_and_save(data, classes, root / f"{key}.ckpt", max_steps=1)
        image = rng.integers(0, 256, shape, dtype=np.uint8)  # needs no resampling: only the crop and normalization
        expected = data.val_set.transform(image)
        runs[key] = {"ckpt": ckpt, "image": image, "expected": expected}
    shutil.rmtree(root / "cifar")
    shutil.rmtree(root / "imagenet")
    return runs


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    """The current folder is an empty one: no data/ folder to look at."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _config(cfg: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in EXPECTED["cifar"]}


def _matches(cfg: dict, expected: dict) -> bool:
    """Key by key: strings equal, numbers and tuples within float tolerance (pytest >= 9.1's
    ``approx`` refuses a dict whose values are tuples)."""
    got = _config(cfg)
    if set(got) != set(expected):
        return False
    return all(got[k] == v if isinstance(v, str) else got[k] == pytest.approx(v) for k, v in expected.items())


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_checkpoint_records_the_preprocessing_and_class_names(trained, kind):
    contents = torch.load(trained[kind]["ckpt"], weights_only=True)
    assert contents["class_names"] == (CIFAR_NAMES if kind == "cifar" else IMAGENET_NAMES)
    recorded = contents["data_config"]
    assert _matches(recorded, EXPECTED[kind]) and set(recorded) == set(EXPECTED[kind])
    # timm's evaluation transform resizes the short side to floor(size / crop_pct): exactly the data module's resize
    assert math.floor(32 / recorded["crop_pct"]) == (32 if kind == "cifar" else 36)


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_predict_reads_them_from_the_checkpoint_not_from_data_folders(trained, kind, empty_cwd, capsys):
    run = trained[kind]
    classifier = load_trained_classifier(run["ckpt"])
    assert classifier.class_names == (CIFAR_NAMES if kind == "cifar" else IMAGENET_NAMES)
    assert _matches(classifier.data_config, EXPECTED[kind])
    # the data module's evaluation transform, reproduced without its files
    torch.testing.assert_close(preprocess(run["image"], classifier), run["expected"])
    image = empty_cwd / "photo.png"
    Image.fromarray(run["image"]).save(image)
    assert predict_main(["--ckpt", str(run["ckpt"]), "--images", str(image), "--out", "out"]) == 0
    record = json.loads((empty_cwd / "out" / "predictions.json").read_text())[0]
    assert {p["name"] for p in record["top_k"]} == set(classifier.class_names)
    assert "records no class names" not in capsys.readouterr().err
    assert sorted(p.name for p in empty_cwd.iterdir()) == ["out", "photo.png"]


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_timm_preprocesses_the_export_exactly_as_predict(trained, kind, empty_cwd):
    import timm
    from timm.data import create_transform, resolve_data_config

    run = trained[kind]
    assert export_main(["--ckpt", str(run["ckpt"]), "--out", "export", "--formats", "safetensors"]) == 0
    model = timm.create_model(f"local-dir:{empty_cwd / 'export'}", pretrained=True).eval()
    names = CIFAR_NAMES if kind == "cifar" else IMAGENET_NAMES
    assert model.pretrained_cfg["label_names"] == names and model.pretrained_cfg["num_classes"] == len(names)
    config = resolve_data_config({}, model=model)
    assert _matches(config, EXPECTED[kind]) and set(config) == set(EXPECTED[kind])
    classifier = load_trained_classifier(run["ckpt"])
    rng = np.random.default_rng(7)
    for shape in ((50, 70, 3), (33, 31, 3), (32, 32, 3), (200, 90, 3)):  # up- and downscaled, odd crop margins
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        by_timm = create_transform(**config)(Image.fromarray(image))
        torch.testing.assert_close(by_timm, preprocess(image, classifier), rtol=0, atol=0)
    exported = load_trained_classifier(empty_cwd / "export")
    assert exported.class_names == names and _matches(exported.data_config, EXPECTED[kind])


def _without_metadata(ckpt: Path, folder: Path) -> Path:
    contents = torch.load(ckpt, weights_only=True)
    contents.pop("data_config"), contents.pop("class_names")
    old = folder / "old.ckpt"
    torch.save(contents, old)
    return old


def test_an_older_checkpoint_says_what_to_pass(trained, empty_cwd, capsys):
    old = _without_metadata(trained["imagenet"]["ckpt"], empty_cwd)
    image = empty_cwd / "photo.png"
    Image.fromarray(trained["imagenet"]["image"]).save(image)
    for command in (
        lambda extra: predict_main(["--ckpt", str(old), "--images", str(image), "--out", "p", *extra]),
        lambda extra: export_main(["--ckpt", str(old), "--out", "e", "--formats", "safetensors", *extra]),
    ):
        assert command([]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"checkpoint {old} records no preprocessing" in err[0]
        assert "pass --data-config" in err[0] and '"input_size": [3, 224, 224], "crop_pct": 0.875' in err[0]
    config = {"input_size": [3, 32, 32], "crop_pct": 32 / 36, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    (empty_cwd / "preprocessing.json").write_text(json.dumps(config))
    names = empty_cwd / "names.txt"
    names.write_text("\n".join(IMAGENET_NAMES) + "\n")
    assert (
        predict_main(["--ckpt", str(old), "--images", str(image), "--out", "p", "--data-config", "preprocessing.json"])
        == 0
    )
    err = capsys.readouterr().err
    assert f"checkpoint {old} records no class names" in err and "--class-names" in err
    record = json.loads((empty_cwd / "p" / "predictions.json").read_text())[0]
    assert {p["name"] for p in record["top_k"]} == {"class 0", "class 1", "class 2"}
    classifier = load_trained_classifier(old, data_config=config)
    torch.testing.assert_close(preprocess(trained["imagenet"]["image"], classifier), trained["imagenet"]["expected"])
    args = ["--data-config", json.dumps(config), "--class-names", str(names), "--formats", "safetensors"]
    assert export_main(["--ckpt", str(old), "--out", "e", *args]) == 0
    exported = load_trained_classifier(empty_cwd / "e")
    assert exported.class_names == IMAGENET_NAMES and _matches(exported.data_config, EXPECTED["imagenet"])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ('{"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}', "needs 'crop_pct'"),
        ('{"input_size": [3, 32, 32], "crop_pct": 1.5, "mean": [0, 0, 0], "std": [1, 1, 1]}', "'crop_pct' must be"),
        ('{"input_size": [3, 32, 32], "crop_pct": 1, "mean": [0, 0], "std": [1, 1, 1]}', "'mean' must be 3 numbers"),
        (
            '{"input_size": [3, 32, 32], "crop_pct": 1, "mean": [0, 0, 0], "std": [1, 0, 1]}',
            "'std' must be 3 numbers > 0",
        ),
        ('{"input_size": 32, "crop_pct": 1, "mean": [0, 0, 0], "std": [1, 1, 1]}', "'input_size' must be [3, H, W]"),
        (
            '{"input_size": [3, 32, 32], "crop_pct": 1, "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "x"}',
            "'interpolation' must be one of",
        ),
        (
            '{"input_size": [3, 32, 32], "crop_pct": 1, "mean": [0, 0, 0], "std": [1, 1, 1], "size": 3}',
            "unknown key 'size'",
        ),
        ("[1, 2]", "must be a JSON object"),
        ("nowhere.json", "file not found: nowhere.json"),
    ],
)
def test_bad_data_config_is_one_line_naming_the_key(trained, empty_cwd, capsys, given, message):
    old = _without_metadata(trained["cifar"]["ckpt"], empty_cwd)
    assert export_main(["--ckpt", str(old), "--out", "e", "--data-config", given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-config" in err[0] and message in err[0], err


def test_eval_data_config_resizes_to_the_data_modules_size():
    from aa_lightning.data.transforms import eval_data_config

    for image_size in range(16, 400, 7):
        for resize_size in range(image_size, image_size * 2, 3):
            crop_pct = eval_data_config(image_size, resize_size, (0.5,) * 3, (0.2,) * 3)["crop_pct"]
            assert math.floor(image_size / crop_pct) == resize_size, (image_size, resize_size)


def test_published_files_take_the_umask(trained, empty_cwd):
    """issue 22, item 16: model.safetensors was written 0600 whatever the umask (safetensors' own file mode)."""
    run = trained["cifar"]
    image = empty_cwd / "photo.png"
    Image.fromarray(run["image"]).save(image)
    previous = os.umask(0o027)
    try:
        assert export_main(["--ckpt", str(run["ckpt"]), "--out", "export", "--formats", "safetensors"]) == 0
        assert predict_main(["--ckpt", str(run["ckpt"]), "--images", str(image), "--out", "pred"]) == 0
    finally:
        os.umask(previous)
    modes = {
        p.name: oct(p.stat().st_mode & 0o777) for folder in ("export", "pred") for p in (empty_cwd / folder).iterdir()
    }
    assert modes == {
        "config.json": "0o640",
        "export.json": "0o640",
        "model.safetensors": "0o640",
        "photo.png": "0o640",
        "predictions.json": "0o640",
    }
    assert oct((empty_cwd / "export").stat().st_mode & 0o777) == "0o750"
