"""export / inspect outputs (issue 12, item 10): an unwritable --out is one `error:` line, and an export
never mixes two checkpoints' files nor overwrites files it did not write."""

from __future__ import annotations

import json
import shutil

import pytest

from aa_lightning.export import main as export_main
from aa_lightning.predict import main as predict_main


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("command", ["predict", "export"])
def test_unwritable_out_is_one_error_line(checkpoint, images, tmp_path, capsys, command):  # noqa: F811
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = (
        (lambda out: predict_main(["--ckpt", str(checkpoint), "--images", str(images[0]), "--out", out]))
        if command == "predict"
        else (lambda out: export_main(["--ckpt", str(checkpoint), "--out", out]))
    )
    assert run(str(blocker / "sub")) == 2
    assert one_error_line(capsys).endswith(f"error: --out {blocker / 'sub'}: cannot write there (Not a directory)")
    assert run(str(blocker)) == 2
    assert one_error_line(capsys).endswith(f"error: --out {blocker}: it is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_export_over_another_export_replaces_only_its_files(checkpoint, images, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other.ckpt"
    shutil.copyfile(checkpoint, other)
    out = tmp_path / "export"
    assert export_main(["--ckpt", str(other), "--out", str(out), "--formats", "safetensors", "--no-check"]) == 0
    (out / "notes.txt").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.safetensors", "notes.txt"]
    assert export_main(["--ckpt", str(checkpoint), "--out", str(out), "--formats", "onnx", "--no-check"]) == 0
    # the other checkpoint's safetensors + config.json would pass for this checkpoint's: removed
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "notes.txt"]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["checkpoint"] == str(checkpoint) and manifest["files"] == ["model.onnx"]
    assert manifest["max_abs_difference"] == {} and (out / "notes.txt").read_text() == "mine"
    assert predict_main(["--ckpt", str(out), "--images", str(images[0])]) == 2  # no safetensors: not loadable
    assert "is not an export folder" in capsys.readouterr().err


def test_export_never_overwrites_files_it_did_not_write(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "hf_model"
    out.mkdir()
    (out / "config.json").write_text('{"someone": "else"}')
    (out / "model.safetensors").write_bytes(b"their weights")
    assert export_main(["--ckpt", str(checkpoint), "--out", str(out), "--formats", "onnx", "--no-check"]) == 2
    assert one_error_line(capsys).endswith(
        f"error: --out {out} already holds config.json, model.safetensors, not written by python -m "
        "aa_lightning.export (no export.json of it); choose an empty or new folder, or remove them yourself"
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"their weights"


def test_predict_never_overwrites_files_it_did_not_write(checkpoint, images, tmp_path, capsys):  # noqa: F811
    """--out the images' own folder: the figure <stem>.png would replace the input image <stem>.png."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "cat.png"
    shutil.copyfile(images[0], photo)
    before = photo.read_bytes()
    assert predict_main(["--ckpt", str(checkpoint), "--images", str(photo), "--out", str(folder)]) == 2
    assert one_error_line(capsys).endswith(
        f"error: --out {folder}: would overwrite cat.png, not written by an earlier "
        "predict run (not in its predictions.json); choose another --out folder"
    )
    assert photo.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["cat.png"]
    out = tmp_path / "out"  # an earlier predict run's own figures are replaced
    for _ in range(2):
        assert predict_main(["--ckpt", str(checkpoint), "--images", str(photo), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "predictions.json"]
