"""Image-classification inputs read right or refused by name (issue 12, item 10): CIFAR labels outside
the meta file's classes, 16-bit PNGs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from aa_lightning.data import CIFAR100DataModule, ImageNetDataModule
from aa_lightning.data.cifar_format import write_cifar100
from aa_lightning.data.imagenet import RGBLoader
from aa_lightning.predict import read_image


@pytest.mark.parametrize("split, stage", [("train", "fit"), ("test", "test")])
def test_cifar_label_outside_the_classes_names_file_and_label(tmp_path, split, stage):
    rng = np.random.default_rng(0)
    labels = {"train": np.array([0, 1, 2, 0, 1, 2]), "test": np.array([0, 1, 2, 1])}
    labels[split][3] = 7  # 3 class names in meta: 7 is no class
    splits = {s: (rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8), y) for s, y in labels.items()}
    write_cifar100(tmp_path, splits, ["a", "b", "c"], coarse_of_fine=[0, 0, 0, 0, 0, 0, 0, 0])
    dm = CIFAR100DataModule(data_dir=str(tmp_path), batch_size=2, num_workers=0, download=False, val_split=2)
    with pytest.raises(
        ValueError,
        match=rf"{tmp_path}/cifar-100-python/{split}: fine label 7 of image 3 is outside "
        r"0..2 \(the 3 classes of its meta file\); 1 of \d labels are",
    ):
        dm.setup(stage)


def grey16(path, values: np.ndarray) -> None:
    assert cv2.imwrite(str(path), values.astype(np.uint16))


def test_16_bit_png_is_read_at_its_range_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768], [40000, 50000, 65000, 65535]], dtype=np.uint16)
    grey16(tmp_path / "g16.png", values)
    expected = np.rint(values / 257.0).astype(np.uint8)  # 1000 -> 4, 32768 -> 128, 65535 -> 255
    for read in (RGBLoader(), RGBLoader(min_size=2), read_image):
        rgb = read(str(tmp_path / "g16.png"))
        assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
        np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))
    # an 8-bit PNG is unchanged, and a 16-bit RGB PNG keeps its colours (PIL scales those itself)
    eight = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgb8.png"), eight[..., ::-1])
    np.testing.assert_array_equal(RGBLoader()(str(tmp_path / "rgb8.png")), eight)
    cv2.imwrite(str(tmp_path / "rgb16.png"), (eight.astype(np.uint16) * 257)[..., ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), eight)


def test_imagenet_datamodule_reads_16_bit_pngs(tmp_path):
    for split in ("train", "val"):
        for wnid, level in (("n01", 30000), ("n02", 60000)):
            (tmp_path / split / wnid).mkdir(parents=True)
            grey16(tmp_path / split / wnid / "a.png", np.full((40, 40), level))
    dm = ImageNetDataModule(
        data_dir=str(tmp_path),
        batch_size=2,
        num_workers=0,
        train_size=32,
        eval_size=32,
        resize_size=32,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    for image, label in zip(images, labels):
        level = (30000, 60000)[int(label)]
        np.testing.assert_allclose(image.numpy(), round(level / 257) / 255, atol=1e-6)  # not 1.0 (white)
