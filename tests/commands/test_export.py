"""ONNX export of AA layers: the backend switch, dynamic batch, onnxruntime and onnx's reference evaluator."""

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from aa_lightning.export import export_onnx, run_onnx
from aa_lightning.layers import AugmentedConv2d, attention_backend


def aa_network(positions=("relative", "relative")) -> nn.Module:
    """16x16 -> conv -> strided AA conv (8x8 grid) -> fully attentional AA conv(s) -> 4 logits, chunked backend."""
    torch.manual_seed(0)
    first, *rest = positions
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        AugmentedConv2d(8, 8, 3, 2, dk=8, dv=4, num_heads=2, position=first, feat_size=16, backend="chunked"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    ]
    for position in rest:
        layers.append(
            AugmentedConv2d(8, 8, 3, 1, dk=8, dv=8, num_heads=4, position=position, feat_size=8, backend="chunked")
        )
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("backend", ["onnx", "fused", "reference"])
def test_onnx_graph_reproduces_the_chunked_pytorch_model(tmp_path, backend):
    model = aa_network()
    path = export_onnx(model, tmp_path / "m.onnx", 16, backend=backend)
    assert [m.backend for m in model.modules() if isinstance(m, AugmentedConv2d)] == ["chunked", "chunked"]  # restored
    images = torch.randn(5, 3, 16, 16)  # another batch size than the export's example: the batch axis is dynamic
    with torch.no_grad():
        expected = model(images).numpy()
    logits, runtime = run_onnx(path, images)
    assert runtime.startswith("onnxruntime")
    assert logits.shape == (5, 4)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def graph_constants(path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every initializer and Constant node value of the ONNX file."""
    import onnx

    graph = onnx.load(str(path)).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = tuple(attribute.t.dims)
    return shapes


@pytest.mark.parametrize("size", [16, 24])  # 8x8 and 12x12 attention grids (tables resampled at 24)
def test_onnx_form_is_one_attention_op_per_layer_and_matches_pytorch(tmp_path, size):
    """The export default: an ONNX Attention op per relative layer, fed by MatMul / Pad / Add only
    (no Gather or Scatter, no (HW)x(HW) constant), and the logits of the chunked PyTorch model."""
    import onnx

    model = aa_network()
    path = export_onnx(model, tmp_path / "m.onnx", size)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    assert not {"Gather", "GatherND", "GatherElements", "ScatterND", "ScatterElements", "Einsum"} & set(ops)
    grid = (size // 2) ** 2
    assert not [name for name, shape in graph_constants(path).items() if shape.count(grid) >= 2]
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(images).numpy()
    logits, runtime = run_onnx(path, images)
    assert runtime.startswith("onnxruntime")
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_onnx_form_below_opset_23_is_matmul_softmax_matmul(tmp_path):
    import onnx

    model = aa_network()
    path = export_onnx(model, tmp_path / "m.onnx", 16, opset=18)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Attention" not in ops and ops.count("Softmax") == 2
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, images)[0], model(images).numpy(), rtol=1e-4, atol=1e-5)


def test_every_position_encoding_exports(tmp_path):
    model = aa_network(("none", "sine", "coord"))
    images = torch.randn(2, 3, 16, 16)
    logits, _ = run_onnx(export_onnx(model, tmp_path / "m.onnx", 16), images)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=1e-4, atol=1e-5)


def test_without_onnxruntime_the_checked_graph_runs_in_the_reference_evaluator(tmp_path, monkeypatch):
    model = aa_network()
    path = export_onnx(model, tmp_path / "m.onnx", 16)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    images = torch.randn(2, 3, 16, 16)
    logits, runtime = run_onnx(path, images)
    assert runtime == "onnx.reference"
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=1e-4, atol=1e-5)


def test_backend_switch_is_restored_after_an_error():
    model = aa_network()
    with pytest.raises(RuntimeError, match="boom"):
        with attention_backend(model, "reference") as count:
            assert count == 2 and all(
                m.backend == "reference" for m in model.modules() if isinstance(m, AugmentedConv2d)
            )
            raise RuntimeError("boom")
    assert all(m.backend == "chunked" for m in model.modules() if isinstance(m, AugmentedConv2d))


def test_onnx_export_rejects_the_chunked_backend(tmp_path):
    with pytest.raises(ValueError, match=r"one of \('onnx', 'fused', 'reference'\)"):
        export_onnx(aa_network(), tmp_path / "m.onnx", 16, backend="chunked")


# -- the command, on a trained checkpoint ---------------------------------------------------------------


def test_export_command_round_trips_through_timm_and_onnx(checkpoint, images, tmp_path, capsys):  # noqa: F811
    import timm

    from aa_lightning.export import main
    from aa_lightning.predict import main as predict_main
    from aa_lightning.tasks import ImageClassifier

    out = tmp_path / "export"
    assert main(["--ckpt", str(checkpoint), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.onnx", "model.safetensors"]
    report = json.loads((out / "export.json").read_text())["max_abs_difference"]
    assert set(report) == {"onnx", "safetensors"} and all(v < 1e-4 for v in report.values())
    assert "onnxruntime" in capsys.readouterr().out

    trained = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
        by_name = timm.create_model(
            "predict_tiny_aa",
            pretrained=True,
            num_classes=4,
            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=4),
        ).eval()
        torch.testing.assert_close(by_name(x), expected, rtol=0, atol=0)
        by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(by_folder(x), expected, rtol=0, atol=0)
    cfg = by_folder.pretrained_cfg
    assert cfg["label_names"] == [f"plus_at_{a:03d}deg_of_square" for a in (0, 90, 180, 270)]
    assert tuple(cfg["input_size"]) == (3, 32, 32) and tuple(cfg["mean"]) == pytest.approx((0.5071, 0.4865, 0.4409))
    assert "tag" not in json.loads((out / "config.json").read_text())["pretrained_cfg"]  # not timm's released weights
    logits, _ = run_onnx(out / "model.onnx", x)
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-5)

    # predict reads the export folder like the checkpoint
    for source, folder in ((checkpoint, tmp_path / "a"), (out, tmp_path / "b")):
        assert predict_main(["--ckpt", str(source), "--images", str(images[0]), "--out", str(folder)]) == 0
    from_ckpt, from_export = (json.loads((tmp_path / f / "predictions.json").read_text())[0]["top_k"] for f in "ab")
    assert [p["name"] for p in from_ckpt] == [p["name"] for p in from_export]
    np.testing.assert_allclose(
        [p["probability"] for p in from_ckpt], [p["probability"] for p in from_export], rtol=1e-5
    )


def test_export_command_names_both_models_on_a_mismatch(checkpoint, tmp_path, capsys):  # noqa: F811
    from aa_lightning.export import main

    assert main(["--ckpt", str(checkpoint), "--out", str(tmp_path), "--model", "aa_wrn28_10"]) == 2
    assert f"checkpoint {checkpoint} holds a 'predict_tiny_aa' model, not 'aa_wrn28_10'" in capsys.readouterr().err
