"""The learning-rate rule of the recipes, term by term (issue 22, item 14): peak = base_lr x B_global /
reference_batch_size with B_global = batch per device x processes (devices x nodes) x gradient accumulation."""

from types import SimpleNamespace

import pytest

from aa_lightning.tasks.optim import global_batch_size, peak_lr


def trainer(batch_size: int, world_size: int, accumulate: int) -> SimpleNamespace:
    return SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=batch_size),
        train_dataloader=None,
        world_size=world_size,
        accumulate_grad_batches=accumulate,
    )


@pytest.mark.parametrize(
    ("batch_size", "world_size", "accumulate", "global_batch"),
    [(32, 1, 1, 32), (32, 8, 1, 256), (32, 1, 4, 128), (16, 4, 2, 128), (64, 16, 1, 1024)],
)
def test_every_term_of_the_global_batch(batch_size, world_size, accumulate, global_batch):
    run = trainer(batch_size, world_size, accumulate)
    assert global_batch_size(run) == global_batch
    lr, used = peak_lr(0.1, 256, run)
    assert used == global_batch and lr == pytest.approx(0.1 * global_batch / 256, rel=1e-12)


def test_no_reference_batch_keeps_base_lr():
    assert peak_lr(0.3, None, trainer(32, 8, 2)) == (0.3, None)


def test_the_loaders_batch_size_without_a_data_module():
    run = SimpleNamespace(
        datamodule=None, train_dataloader=SimpleNamespace(batch_size=8), world_size=2, accumulate_grad_batches=3
    )
    assert global_batch_size(run) == 48
