"""python -m aa_lightning.predict: predictions and attention overlays of a checkpoint on image files; clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aa_lightning.attention import relative_attention_reference
from aa_lightning.data import SyntheticCIFARDataModule
from aa_lightning.predict import load_trained_classifier, main, preprocess, read_image
from aa_lightning.tasks import ImageClassifier
from aa_lightning.viz.overlay import colormap_table, tile_origin

REPO = Path(__file__).resolve().parents[2]


def test_rebuilt_model_matches_the_trained_one(checkpoint):
    classifier = load_trained_classifier(checkpoint)
    trained = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier.model(x), trained.model(x))
    assert classifier.model_name == "predict_tiny_aa" and classifier.num_classes == 4
    assert classifier.class_names == [
        f"plus_at_{a:03d}deg_of_square" for a in (0, 90, 180, 270)
    ]  # the data module's meta file
    assert (classifier.image_size, classifier.resize_size) == (32, 32)
    assert classifier.mean == pytest.approx((0.5071, 0.4865, 0.4409))


def test_preprocessing_is_the_validation_transform_on_a_32px_image(checkpoint):
    classifier = load_trained_classifier(checkpoint)
    data = SyntheticCIFARDataModule(
        data_dir=str(checkpoint.parent / "data"), num_classes=4, train_size=16, test_size=8, val_split=4
    )
    data.setup("validate")
    raw = data.val_set.images[0]
    torch.testing.assert_close(preprocess(raw, classifier), data.val_set[0][0])


def test_predictions_and_overlays_are_written(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "--ckpt",
                str(checkpoint),
                "--images",
                *map(str, images),
                "--out",
                str(out),
                "--layer",
                "layer1.0.conv1",
                "--queries",
                "0.5,0.5",
                "0,0.99",
                "--tile-size",
                "32",
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    records = json.loads((out / "predictions.json").read_text())
    assert [Path(r["figure"]).name for r in records] == ["wide.png", "gray.png"]
    classifier = load_trained_classifier(checkpoint)
    batch = torch.stack([preprocess(read_image(p), classifier) for p in images])
    with torch.no_grad():
        probs = classifier.model(batch).softmax(-1)
    for b, record in enumerate(records):
        top = probs[b].topk(3)
        assert [p["class"] for p in record["top_k"]] == top.indices.tolist()
        np.testing.assert_allclose([p["probability"] for p in record["top_k"]], top.values.numpy(), rtol=1e-5)
        assert record["top_k"][0]["name"] == classifier.class_names[top.indices[0]]
        assert record["layer"] == "layer1.0.conv1"
    assert "wide.jpg: plus_at_" in capsys.readouterr().out

    # the overlay tiles show the reference attention probabilities of layer1.0.conv1 (alpha 0.6 over the image)
    layer = classifier.model.layer1[0].conv1
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        classifier.model(batch)
        q, k, _ = layer.attention_inputs(seen["x"])
        eye = torch.eye(64).reshape(1, 1, 8, 8, 64).expand(2, 2, 8, 8, 64)
        probs_ref = relative_attention_reference(q, k, eye, *layer.relative_tables(8, 8)).reshape(2, 2, 64, 8, 8)
    handle.remove()
    figure = np.asarray(Image.open(out / "wide.png").convert("RGB")).astype(np.float64) / 255
    header_lines = 1 + 3 + 1  # file, top-3, layer
    x0, y0 = tile_origin(0, 0, tile_size=32, header_lines=header_lines)
    centers = np.arange(8) * 4 + 2
    image_tile = figure[y0 + centers[:, None], x0 + centers[None, :]]
    table = colormap_table("inferno").numpy()
    for head in range(2):
        x, y = tile_origin(0, 1 + head, tile_size=32, header_lines=header_lines)
        shown = figure[y + centers[:, None], x + centers[None, :]]
        heat = ((shown - 0.4 * image_tile) / 0.6).reshape(-1, 3)  # undo the blend
        decoded = np.abs(heat[:, None] - table[None]).sum(-1).argmin(1).reshape(8, 8) / 255
        expected = probs_ref[0, head, 4 * 8 + 4]
        np.testing.assert_allclose(decoded, (expected / expected.max()).numpy(), atol=0.03)


def test_errors_name_the_image(checkpoint, images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["--ckpt", str(checkpoint), "--images", str(images[0]), str(broken), "--out", str(tmp_path)]) == 2
    assert f"cannot read image {broken}" in capsys.readouterr().err
    assert main(["--ckpt", str(checkpoint), "--images", str(tmp_path / "nowhere.jpg")]) == 2
    assert f"image not found: {tmp_path / 'nowhere.jpg'}" in capsys.readouterr().err


def test_errors_name_the_checkpoint_and_the_models(checkpoint, images, tmp_path, capsys):
    assert main(["--ckpt", str(checkpoint), "--images", str(images[0]), "--model", "aa_resnet50"]) == 2
    assert f"checkpoint {checkpoint} holds a 'predict_tiny_aa' model, not 'aa_resnet50'" in capsys.readouterr().err
    assert main(["--ckpt", str(checkpoint), "--images", str(images[0]), "--layer", "layer9"]) == 2
    assert "AA layers: ['layer1.0.conv1', 'layer2.0.conv1']" in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["--ckpt", str(garbage), "--images", str(images[0])]) == 2
    assert f"cannot read checkpoint {garbage}: not a PyTorch checkpoint" in capsys.readouterr().err
    # weights of another shape under the same name: the strict load names both
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["model.fc.weight"] = torch.zeros(4, 99)
    state["state_dict"]["model.extra.weight"] = torch.zeros(1)
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    assert main(["--ckpt", str(other), "--images", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert (
        f"{other} ('predict_tiny_aa') does not fit the model 'predict_tiny_aa'" in err
        and "fc.weight (4, 99) vs (4, 16)" in err
    )
    assert "unexpected (1): extra.weight" in err


def test_list_layers(checkpoint, images, capsys):
    assert main(["--ckpt", str(checkpoint), "--images", str(images[0]), "--list-layers"]) == 0
    assert capsys.readouterr().out.split() == ["layer1.0.conv1", "layer2.0.conv1"]
