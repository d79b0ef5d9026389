"""Regenerating a synthetic set removes only the files its generator wrote (issue 22, item 3): a file the user
put inside a generated sub-folder stops the regeneration, named, and is kept."""

from __future__ import annotations

import pytest

from aa_lightning.data.cifar_format import read_cifar_split
from aa_lightning.data.synthetic.cifar import write_synthetic_cifar
from aa_lightning.data.synthetic.coco import generate_synthetic_coco

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
CIFAR_ARGS = dict(num_classes=4, train_size=8, test_size=4)
COCO_ARGS = dict(num_train=3, num_val=2, image_size=64, min_object_size=8)


def test_a_user_file_inside_the_generated_cifar_folder_is_kept(tmp_path):
    assert write_synthetic_cifar(str(tmp_path), **CIFAR_ARGS, data_seed=0)
    notes = tmp_path / "cifar-100-python" / "my_notes.txt"
    notes.write_text("mine")
    before = read_cifar_split(tmp_path, "train")[0]
    assert not write_synthetic_cifar(str(tmp_path), **CIFAR_ARGS, data_seed=0)  # same set: nothing to do
    with pytest.raises(
        ValueError,
        match=rf"refusing to regenerate .* in {tmp_path}: besides its own files the folder holds "
        r"cifar-100-python/my_notes.txt, which the generator did not write",
    ):
        write_synthetic_cifar(str(tmp_path), **CIFAR_ARGS, data_seed=1)
    assert notes.read_text() == "mine"
    assert (read_cifar_split(tmp_path, "train")[0] == before).all()  # the old set is untouched too
    notes.unlink()
    assert write_synthetic_cifar(str(tmp_path), **CIFAR_ARGS, data_seed=1)  # only its own files: regenerated


def test_a_user_folder_or_image_inside_the_generated_coco_set_is_kept(tmp_path):
    generate_synthetic_coco(tmp_path, **COCO_ARGS)
    (tmp_path / "train2017" / "extra").mkdir()
    mine = tmp_path / "val2017" / "000000000099.jpg"  # named like a generated image, but not one of this set's
    mine.write_bytes(b"someone's photo")
    with pytest.raises(
        ValueError,
        match=r"besides its own files the folder holds train2017/extra, val2017/000000000099.jpg, which the generator",
    ):
        generate_synthetic_coco(tmp_path, **{**COCO_ARGS, "num_train": 4})
    assert mine.read_bytes() == b"someone's photo" and (tmp_path / "train2017" / "extra").is_dir()


def test_a_writer_that_writes_more_than_its_file_list_publishes_nothing(tmp_path):
    """The file list is what a later regeneration may remove: a writer and list that disagree are a bug, caught."""
    from aa_lightning.data.synthetic.generated import write_generated_set

    def write(folder):
        (folder / "a.bin").write_bytes(b"a")
        (folder / "b.bin").write_bytes(b"b")

    with pytest.raises(RuntimeError, match=r"the generator wrote b.bin, which its file list lacks"):
        write_generated_set(tmp_path / "set", "stamp.json", {"v": 1}, lambda found: ["a.bin"], write, lambda f: True)
    assert list(tmp_path.iterdir()) == []
