"""litdata's ``StreamingDataset`` / ``StreamingDataLoader`` made to resume exactly, as the folder reader does.

Imported by :mod:`aa_lightning.data.streaming` when the data are set up (this module imports litdata).

- :class:`SeededStreamingDataset`: each training sample's augmentation is re-seeded from
  (seed, epoch, index of the sample in the shards) — :func:`~aa_lightning.data.loaders.sample_seed`, the
  folder reader's rule — so it depends neither on the worker that loads it nor on a resume.
- :class:`ResumableStreamingDataLoader`: a loader restored mid-epoch (``load_state_dict``) replays the rest
  of that epoch and then starts the next epoch as a fresh one. litdata's own loader leaves its "restoring"
  mode only when an epoch's iterator is run to exhaustion; Lightning stops asking for batches at the epoch's
  length (or its ``limit_train_batches``), before that, so the next epoch replayed the finished one's end:
  an empty epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from .loaders import sample_seed


class SeededStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose transforms (those with ``set_random_seed``) are re-seeded before each sample
    read by iteration with :func:`sample_seed` ``(seed, epoch, index)``: ``epoch`` counts from 0 (litdata's
    from 1), ``index`` is the sample's position in the shards, ``seed`` the dataset's (the shuffle's) seed."""

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, ChunkedIndex):
            seed = sample_seed(self.seed, self.current_epoch - 1, int(index.index))
            for transform in getattr(self, "transform", None) or []:
                if hasattr(transform, "set_random_seed"):
                    transform.set_random_seed(seed)
        return super().__getitem__(index)


class ResumableStreamingDataLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` that leaves the restored epoch when the next one begins.

    A new iterator starts the next epoch (a new shuffle, all of its samples), as litdata does after an
    uninterrupted epoch, once the restored epoch is over: all of its samples were yielded (litdata's own
    test, ``yielded < len(dataset)``, at ``load_state_dict``), or ``run_epoch`` (e.g. the trainer's
    ``current_epoch``) has moved on since the state was loaded (an epoch cut short by ``limit_train_batches``).
    Other arguments: as ``StreamingDataLoader``.
    """

    def __init__(self, *args: Any, run_epoch: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        self.run_epoch = run_epoch
        self._restored_in: int | None = None
        super().__init__(*args, **kwargs)

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._restored_in = self.run_epoch() if self.run_epoch is not None else None

    def __iter__(self) -> Any:
        if self.restore:
            # litdata's own counter of the samples yielded in the epoch (the one its state_dict saves)
            delivered = self._num_samples_yielded_streaming >= len(self.dataset)
            moved_on = self.run_epoch is not None and self.run_epoch() != self._restored_in
            if delivered or moved_on:
                self.restore = False
        yield from super().__iter__()
