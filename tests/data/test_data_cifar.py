"""CIFAR-100 format, the built-in relation data set and the CIFAR DataModules, on generated pickles."""

import pickle

import numpy as np
import pytest
import torch

from aa_lightning.data import CIFAR100DataModule, SyntheticCIFARDataModule
from aa_lightning.data.cifar_format import read_cifar_meta, read_cifar_split, write_cifar100
from aa_lightning.data.synthetic.cifar import write_synthetic_cifar
from aa_lightning.data.synthetic.relations import render_relation_images
from aa_lightning.data.transforms import CIFAR100_MEAN, CIFAR100_STD


def _random_cifar(root, n_train=40, n_test=20, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    splits = {
        "train": (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_train)),
        "test": (rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_test)),
    }
    write_cifar100(
        root,
        splits,
        [f"class_{i}" for i in range(classes)],
        coarse_of_fine=[i % 2 for i in range(classes)],
        coarse_label_names=("a", "b"),
    )
    return splits


def test_written_pickles_load_like_the_official_files(tmp_path):
    splits = _random_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    # the snippet of the CIFAR web page: Python 2 strings come back as bytes
    with open(folder / "train", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert sorted(entry) == [b"batch_label", b"coarse_labels", b"data", b"filenames", b"fine_labels"]
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (40, 3072)
    images, labels = splits["train"]
    # row layout: 1024 red, 1024 green, 1024 blue values, each in raster order
    np.testing.assert_array_equal(entry[b"data"][3, :1024], images[3, :, :, 0].reshape(-1))
    np.testing.assert_array_equal(entry[b"data"][3, 2048:], images[3, :, :, 2].reshape(-1))
    assert entry[b"fine_labels"] == labels.tolist()
    assert entry[b"coarse_labels"] == [label % 2 for label in labels.tolist()]
    # torchvision's reader: encoding="latin1" gives str keys
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta["fine_label_names"] == [f"class_{i}" for i in range(5)]
    # our reader round-trips exactly
    read_images, read_labels = read_cifar_split(tmp_path, "test")
    np.testing.assert_array_equal(read_images, splits["test"][0])
    np.testing.assert_array_equal(read_labels, splits["test"][1])
    assert read_cifar_meta(tmp_path) == meta["fine_label_names"]


def test_reader_refuses_pickles_that_would_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "train").write_bytes(pickle.dumps({"data": Evil(), "fine_labels": []}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
        read_cifar_split(tmp_path, "train")


def test_relation_images_are_deterministic_balanced_and_need_both_shapes():
    a_images, a_labels = render_relation_images(60, num_classes=6, seed=3)
    b_images, b_labels = render_relation_images(60, num_classes=6, seed=3)
    c_images, _ = render_relation_images(60, num_classes=6, seed=4)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (60, 32, 32, 3) and a_images.dtype == np.uint8
    assert np.bincount(a_labels).tolist() == [10] * 6


def test_relation_classes_are_the_direction_from_square_to_plus():
    """Find the square (the only 5x5 solid block) and the plus in each image and check the angle."""
    from aa_lightning.data.synthetic.relations import SHAPE_RADIUS

    images, labels = render_relation_images(40, num_classes=8, seed=1, angle_margin=0.3)
    r = SHAPE_RADIUS
    for image, label in zip(images.astype(int), labels):
        square = plus = None
        for y in range(r, 32 - r):
            for x in range(r, 32 - r):
                block = image[y - r : y + r + 1, x - r : x + r + 1]
                if (block == block[0, 0]).all():
                    square = (y, x)
                cross = np.concatenate([image[y - r : y + r + 1, x], image[y, x - r : x + r + 1]])
                corners = image[[y - r, y - r, y + r, y + r], [x - r, x + r, x - r, x + r]]
                if (cross == cross[0]).all() and not (corners == cross[0]).all(axis=1).any():
                    plus = (y, x)
        assert square is not None and plus is not None
        angle = np.degrees(np.arctan2(-(plus[0] - square[0]), plus[1] - square[1])) % 360
        sector = 360 / 8
        offset = (angle - label * sector + 180) % 360 - 180
        assert abs(offset) <= sector * 0.2 + 6  # +-9 degrees by construction, + rounding of the pixel grid
        assert 9 <= np.hypot(plus[0] - square[0], plus[1] - square[1]) <= 21


def test_synthetic_files_are_written_once_and_regenerated_when_arguments_change(tmp_path):
    assert write_synthetic_cifar(str(tmp_path), num_classes=4, train_size=20, test_size=8, data_seed=0)
    before = (tmp_path / "cifar-100-python" / "train").read_bytes()
    assert not write_synthetic_cifar(str(tmp_path), num_classes=4, train_size=20, test_size=8, data_seed=0)
    assert write_synthetic_cifar(str(tmp_path), num_classes=4, train_size=20, test_size=8, data_seed=1)
    assert (tmp_path / "cifar-100-python" / "train").read_bytes() != before
    assert len(read_cifar_meta(tmp_path)) == 4


def test_cifar_datamodule_reads_generated_pickles_with_a_validation_split(tmp_path):
    splits = _random_cifar(tmp_path, n_train=40, n_test=20)
    dm = CIFAR100DataModule(
        data_dir=str(tmp_path), batch_size=8, num_workers=0, val_split=10, download=False, pad=0, hflip=False
    )
    dm.setup("fit")
    assert dm.num_classes == 5 and len(dm.train_set) == 30 and len(dm.val_set) == 10
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    # without augmentation the tensor is the normalized stored image
    index = int(np.sort(np.random.Generator(np.random.PCG64(0)).permutation(40)[:10])[0])
    expected = (splits["train"][0][index] / 255.0 - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)
    np.testing.assert_allclose(images[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert int(labels[0]) == splits["train"][1][index]
    dm.setup("test")
    assert len(dm.test_set) == 20


def test_cifar_datamodule_validates_on_the_test_set_without_a_split(tmp_path):
    _random_cifar(tmp_path)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), batch_size=8, num_workers=0, val_split=0, download=False)
    dm.setup("fit")
    assert len(dm.train_set) == 40 and dm.val_set is dm.test_set and len(dm.val_set) == 20


def test_cifar_training_augmentation_pads_crops_and_is_reproducible(tmp_path):
    _random_cifar(tmp_path)
    batches = []
    for _ in range(2):
        dm = CIFAR100DataModule(data_dir=str(tmp_path), batch_size=40, num_workers=0, download=False, seed=7)
        dm.setup("fit")
        torch.manual_seed(0)
        batches.append(next(iter(dm.train_dataloader()))[0])
    torch.testing.assert_close(batches[0], batches[1])
    # zero padding shows up as the normalized value of black pixels on some borders
    black = torch.tensor([-m / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)]).view(3, 1)
    border_black = [
        (img[:, 0, :] - black).abs().max() < 1e-4 or (img[:, :, 0] - black).abs().max() < 1e-4 for img in batches[0]
    ]
    assert 0 < sum(border_black) < 40


def test_workers_get_different_augmentation_streams(tmp_path):
    from aa_lightning.data.cifar import ArrayImageDataset
    from aa_lightning.data.transforms import cifar_train_transform

    same = np.repeat(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(1, 32, 32, 3), 8, axis=0)
    dataset = ArrayImageDataset(same, np.zeros(8, dtype=np.int64), cifar_train_transform(seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    outputs = [x[0] for x, _ in loader]  # items 0, 2, 4 .. from worker 0; 1, 3, 5 .. from worker 1
    assert any(not torch.equal(outputs[i], outputs[i + 1]) for i in range(0, 8, 2))
    torch.manual_seed(1)
    first = [x[0] for x, _ in loader]
    torch.manual_seed(1)
    second = [x[0] for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_missing_cifar_names_the_path_and_how_to_get_it(tmp_path):
    dm = CIFAR100DataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    dm.prepare_data()  # download off: nothing to do
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in message
    assert "--data.download true" in message and "cifar-100-python.tar.gz" in message


def test_synthetic_datamodule_generates_then_reads_through_the_cifar_loader(tmp_path):
    dm = SyntheticCIFARDataModule(
        data_dir=str(tmp_path), num_classes=4, train_size=40, test_size=12, batch_size=4, num_workers=0, val_split=8
    )
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "cifar-100-python" / "train").is_file()
    assert dm.num_classes == 4 and len(dm.train_set) == 32 and len(dm.val_set) == 8
    assert dm.hparams.hflip is False  # flips would change this data's classes
    images, _ = read_cifar_split(tmp_path, "train")
    reference, _ = render_relation_images(40, 4, seed=0)
    np.testing.assert_array_equal(images, reference)


@pytest.mark.parametrize("kwargs, key", [({"batch_size": 0}, "data.batch_size"), ({"val_split": -1}, "data.val_split")])
def test_bad_datamodule_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        CIFAR100DataModule(**kwargs)
