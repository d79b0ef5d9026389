"""Every path that reads a file a user hands in refuses a file whose unpickling would run code (issue 22,
item 14): train.py --ckpt_path, predict --ckpt, load_checkpoint / read_checkpoint (export, the detection
backbone, timm's pretrained file). The file below runs ``Path.touch`` of a marker when unpickled with
``weights_only=False``; each path must refuse it, naming the file, and the marker must not exist."""

import pathlib

import pytest
import torch
from helpers.cli_helpers import aa_recipe, run_cli, run_main_in_process
from PIL import Image


class _Touch:
    """Unpickled (weights_only=False), it creates ``marker``: code run by torch.load."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "runs" / "evil" / "version_0" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}, "payload": _Touch(marker)}, path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really runs code when it is trusted
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_train_ckpt_path_refuses_it(malicious, tmp_path):
    path, marker = malicious
    result = run_cli("--config", str(aa_recipe(tmp_path)), "--ckpt_path", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"--ckpt_path: {path}" in result.stderr and "not a loadable checkpoint" in result.stderr
    assert not marker.exists()


def test_predict_refuses_it(malicious, tmp_path):
    from aa_lightning.predict import main

    path, marker = malicious
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = run_main_in_process(main, "--ckpt", str(path), "--images", str(image), cwd=tmp_path, program=["-m"])
    assert result.returncode == 2 and str(path) in result.stderr, result.stderr[-2000:]
    assert not marker.exists()


def test_the_weight_reader_refuses_it(malicious):
    from aa_lightning.models.weights import read_checkpoint

    path, marker = malicious
    with pytest.raises(ValueError, match=rf"cannot read checkpoint {path}: .*weights_only=True\) refuses to unpickle"):
        read_checkpoint(path)
    assert not marker.exists()


def test_an_unreadable_safetensors_file_is_one_line_naming_it(tmp_path):
    """Issue 22 item 15: a truncated / foreign .safetensors file is a ValueError naming the path (was the
    library's own error)."""
    from aa_lightning.models.weights import read_checkpoint

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=rf"^cannot read checkpoint {path}: not a readable safetensors file \("):
        read_checkpoint(path)
