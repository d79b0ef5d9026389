"""The training order the recipes promise (issue 22, item 14): each epoch a permutation of the training set,
a different one every epoch, the same for the same seed, split over the DDP ranks without overlap; the loader
yields the samples in that order. Evaluation loaders keep the file order."""

from types import SimpleNamespace

import numpy as np
import pytest

from aa_lightning.data import SyntheticCIFARDataModule
from aa_lightning.data.loaders import make_loader


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    module = SyntheticCIFARDataModule(
        data_dir=str(tmp_path_factory.mktemp("order") / "data"),
        num_classes=4,
        train_size=48,
        test_size=8,
        val_split=8,
        batch_size=4,
        num_workers=0,
    )
    module.prepare_data()
    module.setup("fit")
    return module


def _order(loader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    n = len(loader.sampler.dataset)
    return [int(key) % n for key in loader.sampler]


def test_each_epoch_is_a_new_permutation_of_the_training_set(data):
    loader = data.train_dataloader()
    n = len(data.train_set)
    first, second = _order(loader, 0), _order(loader, 1)
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != list(range(n)) and first != second
    assert _order(data.train_dataloader(), 0) == first  # seeded: the same run sees the same order


def test_the_loader_yields_its_samplers_order(data):
    loader = data.train_dataloader()
    order = _order(loader, 0)
    seen = np.concatenate([batch[1].numpy() for batch in loader])
    assert len(seen) == len(order) // 4 * 4  # drop_last
    np.testing.assert_array_equal(seen, [int(data.train_set[i][1]) for i in order[: len(seen)]])


def test_ranks_split_the_epoch_without_overlap(data):
    shards = []
    for rank in (0, 1):
        trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = make_loader(data.train_set, batch_size=4, num_workers=0, train=True, trainer=trainer, seed=0)
        shards.append(_order(loader, 3))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(data.train_set)))


def test_evaluation_keeps_the_file_order(data):
    assert list(data.val_dataloader().sampler) == list(range(len(data.val_set)))
