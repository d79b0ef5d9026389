"""DataLoader construction shared by the DataModules (classification and detection).

Training loaders shuffle and drop the last incomplete batch (Lightning swaps in a
``DistributedSampler`` under DDP). Evaluation loaders under DDP get an
``UnrepeatedDistributedSampler``: every image is evaluated exactly once over all processes (the
default ``DistributedSampler`` pads by repeating images, which biases the metrics), and the
torchmetrics states are summed across processes at the end of the epoch.
"""
from __future__ import annotations

from typing import Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    trainer: Optional[pl.Trainer] = None,
    pin_memory: Optional[bool] = None,
    persistent_workers: bool = True,
    collate_fn: Optional[Callable] = None,
    worker_init_fn: Optional[Callable] = None,
) -> DataLoader:
    """A DataLoader with pinned memory on CUDA, persistent workers and exactly-once evaluation under DDP."""
    sampler = None
    if not train and trainer is not None and trainer.world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn,
    )


class SplitLoaders:
    """``train/val/test_dataloader`` of a LightningDataModule from its ``train_set``, ``val_set``
    and ``test_set``, each through ``_loader(dataset, train)``. The default ``_loader`` is
    :func:`make_loader` with the module's ``batch_size``, ``num_workers`` and its
    ``pin_memory`` / ``persistent_workers`` hyper-parameters."""

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            train=train,
            trainer=self.trainer,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
