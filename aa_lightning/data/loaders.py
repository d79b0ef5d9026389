"""DataLoader construction shared by the DataModules (classification and detection).

Training loaders shuffle and drop the last incomplete batch. They are built so that a run killed
at any step resumes exactly (docs/training.md, "Faults and resuming"):

- the loader is torchdata's ``StatefulDataLoader``, whose position inside the epoch Lightning saves
  in every checkpoint and restores on resume;
- the order comes from :class:`EpochSampler`, a ``DistributedSampler`` shuffled by a generator seeded
  with (seed, epoch) (Lightning calls ``set_epoch``), split over the DDP ranks;
- each sample's augmentation is seeded from (seed, epoch, index) by :class:`SeededSamples`, so it
  depends neither on the process start, nor on the worker that loads it, nor on a resume;
- the loader's own generator (worker base seeds) is seeded too: creating an iterator draws nothing
  from torch's global generator (which dropout and stochastic depth use).

Evaluation loaders under DDP get an ``UnrepeatedDistributedSampler``: every image is evaluated
exactly once over all processes (the default ``DistributedSampler`` pads by repeating images, which
biases the metrics), and the torchmetrics states are summed across processes at the end of the epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata 0.11 calls a deprecated torch API at every new iterator; nothing a user can act on
warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated", category=UserWarning)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` (a 32-bit value of numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` (shuffled from ``seed + epoch``, split over ``num_replicas`` ranks) whose
    indices also carry the epoch: it yields ``epoch * len(dataset) + index``, which
    :class:`SeededSamples` decodes in whatever process loads the sample (workers included)."""

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        for index in super().__iter__():
            yield offset + int(index)


class SeededSamples(Dataset):
    """``dataset[index]`` with its ``transform`` re-seeded to :func:`sample_seed` ``(seed, epoch, index)``
    first; keys are :class:`EpochSampler`'s ``epoch * len(dataset) + index`` (a plain index is epoch 0).

    The transform must have ``set_random_seed`` (an :class:`~aa_lightning.data.transforms.AlbumentationsTransform`
    or an albumentations ``Compose``); without one the sample is returned unchanged. Other attributes
    (``transform``, ``labels``, ...) are the wrapped data set's.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), len(self.dataset))
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def check_loader_settings(batch_size: int, num_workers: int) -> None:
    """A ``ValueError`` naming ``data.batch_size`` / ``data.num_workers`` when a DataLoader cannot take them."""
    if batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    trainer: pl.Trainer | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    collate_fn: Callable | None = None,
    worker_init_fn: Callable | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader with pinned memory on CUDA, persistent workers and exactly-once evaluation under DDP.

    Training (``train=True``): a resumable ``StatefulDataLoader`` over :class:`SeededSamples` with an
    :class:`EpochSampler`, both seeded with ``seed`` (see the module docstring).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn,
    )
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if train:
        sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        generator = torch.Generator().manual_seed(seed)  # worker base seeds; torch's global generator is left alone
        return StatefulDataLoader(
            SeededSamples(dataset, seed), sampler=sampler, drop_last=True, generator=generator, **common
        )
    sampler = None
    if world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, shuffle=False, sampler=sampler, drop_last=False, **common)


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
            seed=self.hparams.get("seed", 0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
