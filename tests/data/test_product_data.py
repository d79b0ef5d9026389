"""The product's data contract: a validation split held out of the training set is disjoint from it,
covers it, and is read without augmentation (for every DataModule that splits one off: the CIFAR
loader and the built-in set that inherits it)."""

import numpy as np
import pytest
import torch

from aa_lightning.data import CIFAR100DataModule, SyntheticCIFARDataModule
from aa_lightning.data.cifar_format import read_cifar_split, write_cifar100
from aa_lightning.data.transforms import CIFAR100_MEAN, CIFAR100_STD


def _unique_cifar(root, n_train: int = 60, n_test: int = 10, classes: int = 5) -> np.ndarray:
    """Random pickles whose training images are all different (pixel (0, 0) holds the index)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n_train)
    splits = {
        "train": (images, rng.integers(0, classes, n_train)),
        "test": (rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_test)),
    }
    write_cifar100(
        root, splits, [f"c{i}" for i in range(classes)], coarse_of_fine=[0] * classes, coarse_label_names=("a",)
    )
    return images


def _indices(dataset_images: np.ndarray) -> list[int]:
    return [int(image[0, 0, 0]) for image in dataset_images]


@pytest.mark.parametrize("val_split", [1, 17, 59])
def test_cifar_validation_split_is_disjoint_from_training_and_covers_the_training_file(tmp_path, val_split):
    stored = _unique_cifar(tmp_path)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), batch_size=7, num_workers=0, val_split=val_split, download=False)
    dm.setup("fit")
    train, val = _indices(dm.train_set.images), _indices(dm.val_set.images)
    assert len(set(train)) == len(train) == 60 - val_split and len(set(val)) == len(val) == val_split
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(60))
    # through the loader: every validation image exactly once, as stored (no pad-crop / flip)
    seen = []
    for images, _ in dm.val_dataloader():
        pixels = images.permute(0, 2, 3, 1).numpy() * np.array(CIFAR100_STD) + np.array(CIFAR100_MEAN)
        seen.append(np.rint(pixels * 255).astype(np.uint8))
    seen = np.concatenate(seen)
    assert sorted(_indices(seen)) == sorted(val)
    for image in seen:
        np.testing.assert_array_equal(image, stored[int(image[0, 0, 0])])


def test_builtin_set_holds_out_a_disjoint_validation_split_of_its_training_file(tmp_path):
    dm = SyntheticCIFARDataModule(
        data_dir=str(tmp_path), num_classes=4, train_size=64, test_size=8, val_split=16, batch_size=8, num_workers=0
    )
    dm.prepare_data()
    dm.setup("fit")
    images, labels = read_cifar_split(tmp_path, "train")
    keys = {image.tobytes(): i for i, image in enumerate(images)}
    assert len(keys) == 64  # the generated images are distinct, so an image names its index
    train = [keys[image.tobytes()] for image in dm.train_set.images]
    val = [keys[image.tobytes()] for image in dm.val_set.images]
    assert len(train) == 48 and len(val) == 16 and not set(train) & set(val)
    assert torch.equal(torch.as_tensor(dm.val_set.labels), torch.as_tensor(labels[val]))
