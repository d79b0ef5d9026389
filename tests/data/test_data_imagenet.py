"""ImageNetDataModule on a generated class-folder tree of JPEGs."""

import numpy as np
import pytest
import torch
from PIL import Image

from aa_lightning.data import ImageNetDataModule
from aa_lightning.data.imagenet import ImageDecodeError, RGBLoader
from aa_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CLASSES = ["n01440764", "n01443537", "n01484850"]


def _halves(width: int, height: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2 :] = right
    return Image.fromarray(array)


@pytest.fixture()
def imagenet_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for wnid in CLASSES:
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = int(rng.integers(60, 120)), int(rng.integers(60, 120))
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                image.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return tmp_path


def test_folders_become_sorted_classes_and_batches_have_the_crop_size(imagenet_tree):
    dm = ImageNetDataModule(
        data_dir=str(imagenet_tree), batch_size=4, num_workers=0, train_size=32, eval_size=24, resize_size=28
    )
    dm.setup("fit")
    assert dm.class_names == CLASSES and dm.num_classes == 3
    assert len(dm.train_set) == 9 and len(dm.val_set) == 6
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 24, 24)
    assert labels.tolist() == [0, 0, 1, 1]  # sorted folders, no shuffling in evaluation
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 6


def test_eval_transform_is_resize_short_side_then_center_crop(tmp_path):
    """512x384 image, left half red / right half blue -> resize 256 (341x256) -> center crop 224.

    The colour boundary at x = 170.5 of the resized image lands at 170.5 - 58.5 = 112 of the crop.
    """
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        _halves(512, 384).save(tmp_path / split / "a" / "x.png")
    dm = ImageNetDataModule(data_dir=str(tmp_path), batch_size=1, num_workers=0)
    dm.setup("validate")
    image, _ = dm.val_set[0]
    assert image.shape == (3, 224, 224)
    rgb = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    red_columns = (rgb[0].mean(0) > 0.5).nonzero().flatten()
    assert red_columns.min() == 0 and abs(int(red_columns.max()) - 111) <= 1
    assert torch.allclose(rgb[2, :, 120:], torch.ones(224, 104), atol=0.02)


def test_draft_decoding_keeps_both_sides_at_least_the_requested_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(path)
    full = RGBLoader()(str(path))
    drafted = RGBLoader(min_size=256)(str(path))
    assert full.shape == (600, 800, 3)
    assert drafted.shape == (300, 400, 3)  # DCT scaling by 1/2: the largest reduction with both sides >= 256


def test_a_corrupt_image_names_the_file(imagenet_tree):
    bad = imagenet_tree / "val" / CLASSES[1] / "broken.JPEG"
    good = (imagenet_tree / "val" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG").read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    dm = ImageNetDataModule(
        data_dir=str(imagenet_tree), batch_size=2, num_workers=0, train_size=32, eval_size=24, resize_size=28
    )
    dm.setup("validate")
    with pytest.raises(ImageDecodeError, match="broken.JPEG"):
        for _ in dm.val_dataloader():
            pass


def test_missing_folders_say_where_they_looked(tmp_path):
    dm = ImageNetDataModule(data_dir=str(tmp_path / "imagenet"))
    with pytest.raises(FileNotFoundError, match=r"imagenet/val.*data/README.md"):
        dm.setup("fit")


def test_train_and_val_must_share_classes(imagenet_tree):
    (imagenet_tree / "train" / "n99999999").mkdir()
    Image.new("RGB", (40, 40)).save(imagenet_tree / "train" / "n99999999" / "x.JPEG")
    dm = ImageNetDataModule(data_dir=str(imagenet_tree), num_workers=0)
    with pytest.raises(ValueError, match="only in train: \\['n99999999'\\]"):
        dm.setup("fit")
