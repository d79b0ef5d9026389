"""Corrupt checkpoints are refused, naming the file and what is wrong (issue 22, item 8): a bit flipped after the write
fails the zip's CRC-32 check; non-finite weights or optimizer state are named by tensor. ``--ckpt_path last`` falls
back to the newest intact checkpoint with a warning; the predict path (read_checkpoint) refuses the same files."""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch


def save_checkpoint(path: Path, weight: torch.Tensor, momentum: torch.Tensor | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    optimizer = {"state": {0: {"momentum_buffer": momentum if momentum is not None else torch.zeros_like(weight)}}}
    optimizer["param_groups"] = [{"lr": 0.1, "params": [0]}]
    torch.save({"state_dict": {"model.fc.weight": weight}, "optimizer_states": [optimizer], "global_step": 3}, path)


def flip_a_bit_of_the_last_tensor(path: Path) -> None:
    """Flip one bit inside the bytes of the file's last tensor record (``.../data/1``: the momentum buffer)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if re.search(r"/data/1$", i.filename))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 5] ^= 0x40  # an exponent bit of one float32: 0.0 -> 2.0, 1.0 -> 1.1e35-like
    path.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_fails_its_checksum_and_last_falls_back(tmp_path):
    from aa_lightning.training.cli import CheckpointError, find_last_checkpoint, load_checkpoint_file

    folder = tmp_path / "runs" / "r" / "version_0" / "checkpoints"
    save_checkpoint(folder / "best-epoch=0-step=3.ckpt", torch.ones(4, 4))
    save_checkpoint(folder / "last.ckpt", torch.ones(4, 4))
    flip_a_bit_of_the_last_tensor(folder / "last.ckpt")
    flipped = torch.load(folder / "last.ckpt", weights_only=True)  # torch itself reads it without a word
    assert not torch.equal(flipped["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.zeros(4, 4))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(folder / "last.ckpt")
    message = str(info.value)
    assert str(folder / "last.ckpt") in message and "checksum" in message and "data/1" in message, message
    assert "\n" not in message
    with pytest.warns(UserWarning, match=re.escape(str(folder / "last.ckpt"))):
        path, version, _ = find_last_checkpoint(str(tmp_path / "runs"), "r")
    assert path == folder / "best-epoch=0-step=3.ckpt" and version == 0


@pytest.mark.parametrize(
    "weight, momentum, named",
    [
        (torch.tensor([[1.0, float("inf")]]), None, "state_dict['model.fc.weight']"),
        (torch.ones(1, 2), torch.tensor([[0.0, float("nan")]]), "optimizer_states[0]['state'][0]['momentum_buffer']"),
    ],
)
def test_non_finite_weights_or_optimizer_state_are_refused_naming_the_tensor(tmp_path, weight, momentum, named):
    from aa_lightning.training.cli import CheckpointError, load_checkpoint_file

    path = tmp_path / "last.ckpt"
    save_checkpoint(path, weight, momentum)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message and named in message and "1 of 2 values" in message, message


def test_the_predict_reader_refuses_corrupt_and_non_finite_checkpoints(tmp_path):
    from aa_lightning.models.weights import read_checkpoint

    flipped = tmp_path / "flipped.ckpt"
    save_checkpoint(flipped, torch.ones(4, 4))
    flip_a_bit_of_the_last_tensor(flipped)
    with pytest.raises(ValueError, match=re.escape(str(flipped)) + r".*checksum"):
        read_checkpoint(flipped)
    nan = tmp_path / "nan.ckpt"
    save_checkpoint(nan, torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=re.escape(str(nan)) + r".*fc\.weight.*1 of 2 values"):
        read_checkpoint(nan)
    from safetensors.torch import save_file

    tensors = tmp_path / "inf.safetensors"
    save_file({"fc.weight": torch.tensor([float("inf"), 0.0, 1.0])}, str(tensors))
    with pytest.raises(ValueError, match=re.escape(str(tensors)) + r".*fc\.weight.*1 of 3 values"):
        read_checkpoint(tensors)
    good = tmp_path / "good.ckpt"
    save_checkpoint(good, torch.ones(2, 2))
    assert torch.equal(read_checkpoint(good).state_dict["fc.weight"], torch.ones(2, 2))
