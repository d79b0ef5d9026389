"""The class-folder scan shared by the ImageNet folder reader and the shard converter (issue 22, items 9 and 15):
a folder link that leads back into the tree (a loop, or another class's images under this class) is refused
naming the link; links to folders outside the tree are followed; an empty class folder is one error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from aa_lightning.data import ImageNetDataModule
from aa_lightning.data.class_folders import ImageTreeError, scan_class_folders
from aa_lightning.data.prepare import ConversionError, list_split, main


def image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 20 % 256, 0, 0)).save(path)


@pytest.fixture()
def tree(tmp_path) -> Path:
    """src/{train,val}/{n01,n02}: 3 training images per class (one in a sub-folder), 1 validation image."""
    src = tmp_path / "src"
    for wnid in ("n01", "n02"):
        for name in ("a.JPEG", "b.png", "deeper/c.jpg"):
            image(src / "train" / wnid / name)
        image(src / "val" / wnid / "v.JPEG")
    return src


def datamodule(src: Path) -> ImageNetDataModule:
    return ImageNetDataModule(data_dir=str(src), batch_size=2, num_workers=0, train_size=8, eval_size=8, resize_size=8)


@pytest.mark.parametrize("link, points_to", [("n01/loop", ".."), ("n02/deeper/more", "../../n01"), ("n02/up", "../..")])
def test_a_folder_link_back_into_the_tree_is_refused_by_the_reader_and_the_converter(tree, tmp_path, link, points_to):
    path = tree / "train" / link
    os.symlink(points_to, path)
    message = rf"^{path} is a symbolic link to {os.path.realpath(path)}, which is inside the image folder "
    with pytest.raises(ImageTreeError, match=message + rf"{tree}/train \(or holds it\)"):
        datamodule(tree).setup("fit")
    with pytest.raises(ConversionError, match=message):
        list_split(tree, "train")


def test_the_converter_command_says_so_in_one_line_and_writes_nothing(tree, tmp_path, capsys):
    os.symlink("..", tree / "train" / "n01" / "loop")
    assert main(["imagenet", "--src", str(tree), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tree}/train/n01/loop is a symbolic link to {tree}/train, ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_class_folder_linking_to_another_class_is_refused(tree):
    os.symlink("n01", tree / "train" / "n03")
    with pytest.raises(ImageTreeError, match=rf"^{tree}/train/n03 is a symbolic link to {tree}/train/n01, which is"):
        datamodule(tree).setup("fit")  # ImageFolder read n01's images a second time as class n03


def test_folders_outside_the_tree_are_followed_once_in_image_folder_order(tree, tmp_path):
    elsewhere = tmp_path / "disk2"
    image(elsewhere / "n03" / "x.JPEG")
    image(elsewhere / "extra" / "e.JPEG")
    os.symlink(elsewhere / "n03", tree / "train" / "n03")  # a class folder on another disk
    os.symlink(elsewhere / "extra", tree / "train" / "n01" / "extra")  # a sub-folder on another disk
    os.symlink(tree / "train" / "n02" / "a.JPEG", tree / "val" / "n02" / "linked.JPEG")  # file links are files
    for split, count in (("train", 8), ("val", 3)):
        classes, samples = scan_class_folders(tree / split)
        expected_classes, class_to_idx = find_classes(str(tree / split))
        assert classes == expected_classes == ["n01", "n02", "n03"][: len(classes)]
        assert samples == make_dataset(str(tree / split), class_to_idx, extensions=IMG_EXTENSIONS)  # torchvision's
        assert len(samples) == count
    dm = datamodule(tree)
    with pytest.raises(ValueError, match="same class folders"):  # val has no n03: the scan itself went through
        dm.setup("fit")
    os.unlink(tree / "train" / "n03")
    dm.setup("fit")
    assert len(dm.train_set) == 7 and len(dm.val_set) == 3
    assert dm.train_set.samples[:4] == [
        (str(tree / "train" / "n01" / name), 0) for name in ("a.JPEG", "b.png", "deeper/c.jpg", "extra/e.JPEG")
    ]


def test_the_same_outside_folder_reached_twice_is_refused(tree, tmp_path):
    image(tmp_path / "disk2" / "shared" / "s.JPEG")
    os.symlink(tmp_path / "disk2" / "shared", tree / "train" / "n01" / "s")
    os.symlink(tmp_path / "disk2" / "shared", tree / "train" / "n02" / "s")
    with pytest.raises(
        ImageTreeError,
        match=rf"^{tree}/train/n02/s is a symbolic link to {tmp_path}/disk2/shared, a folder already read as "
        rf"{tree}/train/n01/s",
    ):
        datamodule(tree).setup("fit")  # ImageFolder read s.JPEG as an image of n01 and of n02


def test_an_empty_class_folder_is_one_line_naming_it(tree):
    (tree / "train" / "n02" / "a.JPEG").unlink()
    (tree / "train" / "n02" / "b.png").unlink()
    (tree / "train" / "n02" / "deeper" / "c.jpg").unlink()
    (tree / "train" / "n02" / "notes.txt").write_text("not an image")
    message = (
        rf"^class folder {tree}/train/n02 holds no image \(no \.jpg, \.jpeg, \.png, .* file\); every class folder "
        rf"under {tree}/train needs at least one: add its images or remove the folder$"
    )
    with pytest.raises(ImageTreeError, match=message) as info:
        datamodule(tree).setup("fit")
    assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match=message):
        list_split(tree, "train")
