"""The synthetic data generators never delete or overwrite data they did not write, and a killed
generation leaves no half set under the data set's name (issue 12, item 1)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aa_lightning.data import SyntheticCIFARDataModule
from aa_lightning.data.cifar_format import read_cifar_split, write_cifar100
from aa_lightning.data.synthetic.cifar import write_synthetic_cifar
from aa_lightning.data.synthetic.coco import SyntheticCOCODataModule, generate_synthetic_coco

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
COCO_ARGS = dict(num_train=3, num_val=2, image_size=64, min_object_size=8)
CIFAR_ARGS = dict(num_classes=4, train_size=8, test_size=4)


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (folders as '<dir>')."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def real_cifar(root: Path) -> None:
    """A CIFAR-100-format set that the generator did not write (no synthetic.json stamp)."""
    rng = np.random.default_rng(0)
    splits = {
        split: (rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 6))
        for split in ("train", "test")
    }
    write_cifar100(root, splits, ["apple", "bee", "cat"])


def real_coco(root: Path) -> None:
    """A COCO layout that the generator did not write (no synthetic_coco.json stamp)."""
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        (root / split / "000000000139.jpg").write_bytes(b"\xff\xd8 someone's photo")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [], "annotations": []}')


def test_cifar_generator_refuses_a_real_cifar_folder(tmp_path):
    root = tmp_path / "data"
    real_cifar(root)
    before = tree(root)
    with pytest.raises(
        ValueError,
        match=rf"refusing to write .* into {root}: the folder is not empty "
        r"\(cifar-100-python\) and has no synthetic.json stamp",
    ):
        write_synthetic_cifar(str(root), **CIFAR_ARGS)
    dm = SyntheticCIFARDataModule(data_dir=str(root), batch_size=2, num_workers=0, **CIFAR_ARGS)
    with pytest.raises(ValueError, match="no synthetic.json stamp"):
        dm.prepare_data()
    assert tree(root) == before
    assert os.listdir(tmp_path) == ["data"]  # no temporary sibling left either


def test_coco_generator_refuses_a_real_coco_folder(tmp_path):
    real_coco(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"refusing to write .* into {tmp_path}: the folder is not empty "
        r"\(annotations, train2017, val2017\) and has no synthetic_coco.json stamp",
    ):
        generate_synthetic_coco(tmp_path, **COCO_ARGS)
    dm = SyntheticCOCODataModule(root=str(tmp_path), num_workers=0, **COCO_ARGS)
    with pytest.raises(ValueError, match="no synthetic_coco.json stamp"):
        dm.prepare_data()
    assert tree(tmp_path) == before


def test_a_foreign_stamp_or_file_is_not_the_generators(tmp_path):
    (tmp_path / "synthetic.json").write_text('{"made_by": "another tool"}')  # same name, not this generator's
    with pytest.raises(ValueError, match="no synthetic.json stamp of this generator"):
        write_synthetic_cifar(str(tmp_path), **CIFAR_ARGS)
    with pytest.raises(ValueError, match="it is a file, not a folder"):
        write_synthetic_cifar(str(tmp_path / "synthetic.json"), **CIFAR_ARGS)
    assert (tmp_path / "synthetic.json").read_text() == '{"made_by": "another tool"}'


def test_missing_or_empty_folders_are_written_and_own_sets_regenerated(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_synthetic_cifar(str(empty), **CIFAR_ARGS)
    assert write_synthetic_cifar(str(tmp_path / "new" / "deeper"), **CIFAR_ARGS)
    assert tree(empty) == tree(tmp_path / "new" / "deeper")
    assert not write_synthetic_cifar(str(empty), **CIFAR_ARGS)  # already there: untouched
    assert write_synthetic_cifar(str(empty), **{**CIFAR_ARGS, "train_size": 12})  # own set, other arguments
    assert len(read_cifar_split(empty, "train")[1]) == 12
    (empty / "cifar-100-python" / "test").unlink()  # an own set missing a file is made whole again
    assert write_synthetic_cifar(str(empty), **{**CIFAR_ARGS, "train_size": 12})
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]  # no temporary siblings left


def test_own_set_with_foreign_files_is_not_regenerated(tmp_path):
    generate_synthetic_coco(tmp_path, **COCO_ARGS)
    (tmp_path / "notes.txt").write_text("mine")
    assert generate_synthetic_coco(tmp_path, **COCO_ARGS) == tmp_path  # same set: nothing to do
    before = tree(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"refusing to regenerate .* in {tmp_path}: besides its own files the "
        r"folder holds notes.txt, which the generator did not write",
    ):
        generate_synthetic_coco(tmp_path, **{**COCO_ARGS, "num_train": 4})
    assert tree(tmp_path) == before
    (tmp_path / "notes.txt").unlink()
    generate_synthetic_coco(tmp_path, **{**COCO_ARGS, "num_train": 4, "train_split": "tr"})  # old split names go
    assert sorted(os.listdir(tmp_path)) == ["annotations", "synthetic_coco.json", "tr", "val2017"]
    assert sorted(os.listdir(tmp_path / "annotations")) == ["instances_tr.json", "instances_val2017.json"]


def test_killed_generation_leaves_no_half_set(tmp_path):
    """SIGKILL in the middle of writing the images: the data set's folder does not exist afterwards
    (only a hidden .partial sibling), and the next generation writes the whole set."""
    root = tmp_path / "shapes"
    code = (
        "import sys; from aa_lightning.data.synthetic.coco import generate_synthetic_coco; "
        "generate_synthetic_coco(sys.argv[1], num_train=5000, num_val=2, image_size=64, min_object_size=8)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # wait until images are being written
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".shapes.partial-")]
            if partial and (partial[0] / "train2017").is_dir() and len(os.listdir(partial[0] / "train2017")) > 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the generation ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not root.exists()
    generate_synthetic_coco(root, **COCO_ARGS)
    assert len(os.listdir(root / "train2017")) == 3 and (root / "synthetic_coco.json").is_file()


def test_write_cifar100_never_overwrites(tmp_path):
    real_cifar(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=rf"refusing to overwrite {tmp_path}/cifar-100-python/train, .*/meta"):
        real_cifar(tmp_path)
    assert tree(tmp_path) == before


def test_a_symlinked_data_folder_is_written_where_it_points(tmp_path):
    (tmp_path / "scratch" / "set").mkdir(parents=True)
    (tmp_path / "data").symlink_to(tmp_path / "scratch" / "set")
    assert write_synthetic_cifar(str(tmp_path / "data"), **CIFAR_ARGS)
    assert (tmp_path / "data").is_symlink() and (tmp_path / "scratch" / "set" / "synthetic.json").is_file()
    assert write_synthetic_cifar(str(tmp_path / "data"), **{**CIFAR_ARGS, "data_seed": 1})  # regenerated in place
    assert (tmp_path / "data").is_symlink() and sorted(os.listdir(tmp_path / "scratch")) == ["set"]
