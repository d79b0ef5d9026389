"""CIFAR-100 pickles whose arrays have the wrong type are refused by name (issue 22, item 11): float pixels in
[0, 1] (were cast to all-black uint8), int64 pixels above 255 (wrapped modulo 256), fractional labels
(truncated)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from aa_lightning.data import CIFAR100DataModule, cifar_format
from aa_lightning.data.cifar_format import read_cifar_split, write_cifar100

N = 6


def write_split(root, split: str, data, fine_labels) -> None:
    """A real CIFAR-100 python pickle (protocol 2, Python 2 strings, the official keys) holding these arrays as they
    are (the project's writer of the official format, which write_cifar100 uses after casting to uint8)."""
    entry = {
        b"filenames": [f"x_{i}.png".encode() for i in range(N)],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine_labels,
        b"coarse_labels": [0] * N,
        b"data": data,
    }
    cifar_format._dump(entry, root / "cifar-100-python" / split)
    assert pickle.loads((root / "cifar-100-python" / split).read_bytes(), encoding="bytes")[b"data"].dtype == data.dtype


@pytest.fixture()
def cifar(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8), np.arange(N) % 3) for s in ("train", "test")}
    write_cifar100(tmp_path, splits, ["a", "b", "c"])
    return tmp_path


def pixels(dtype, high) -> np.ndarray:
    values = np.linspace(0, high, N * 3072).reshape(N, 3072)
    return values.astype(dtype)


@pytest.mark.parametrize(
    "data, labels, message",
    [
        (
            pixels(np.float32, 1.0),
            [0, 1, 2, 0, 1, 2],
            r"'data' is float32 with values in \[0, 1\]; expected uint8 pixel values 0..255",
        ),
        (
            pixels(np.int64, 454),
            [0, 1, 2, 0, 1, 2],
            r"'data' is int64 with values in \[0, 454\]; expected uint8 pixel values 0..255",
        ),
        (
            pixels(np.uint8, 255),
            [0, 1, 3.7, 0, 1, 2],
            r"fine label 3.7 of image 2 is a float, not an integer; expected integer class indices",
        ),
        (
            pixels(np.uint8, 255),
            np.array([0, 1, 2, 0, 1.5, 2]),
            r"'fine_labels' is float64 \(e.g. 1.5 of image 4\); expected integer class indices",
        ),
    ],
)
@pytest.mark.parametrize("split, stage", [("train", "fit"), ("test", "test")])
def test_wrong_array_types_name_file_found_and_expected(cifar, split, stage, data, labels, message):
    write_split(cifar, split, data, labels)
    with pytest.raises(ValueError, match=rf"^{cifar}/cifar-100-python/{split}: {message}"):
        read_cifar_split(cifar, split)
    dm = CIFAR100DataModule(data_dir=str(cifar), batch_size=2, num_workers=0, download=False)
    with pytest.raises(ValueError, match=rf"{cifar}/cifar-100-python/{split}: {message}"):
        dm.setup(stage)


def test_lossless_integer_arrays_are_read_exactly(cifar):
    """int64 pixels within 0..255 and numpy integer labels lose nothing: read as the uint8 / int64 they are."""
    data = pixels(np.int64, 255)
    write_split(cifar, "train", data, np.array([0, 1, 2, 0, 1, 2], dtype=np.int32))
    images, labels = read_cifar_split(cifar, "train")
    assert images.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(images.transpose(0, 3, 1, 2).reshape(N, -1), data)
