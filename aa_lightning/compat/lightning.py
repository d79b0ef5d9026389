"""Lightning: the fit loop's training-loader state, where no public way exists yet.

Lightning restores a stateful training loader (torchdata's ``StatefulDataLoader``, litdata's
``StreamingDataLoader``) from a checkpoint only when it builds the loader *after* reading the
checkpoint. A ``configure_optimizers`` that sizes its learning-rate schedule (through
``trainer.estimated_stepping_batches``) builds it before, and the saved position is silently dropped:
Lightning-AI/pytorch-lightning#20550 (open; the fix proposed in PR #21765 does what
:func:`restore_training_loader_state` does). The same fit-loop members size the loader of a
``max_steps`` run, whose schedule is given in epochs (:func:`build_training_loader`).

Every function checks the Lightning version first (:func:`~.versions.require_tested`): outside the
tested range it fails with one line instead of resuming from the wrong position.
"""

from __future__ import annotations

import lightning.pytorch as pl

from .versions import require_tested

TESTED = ("2.6", "2.7")


def build_training_loader(trainer: pl.Trainer) -> None:
    """Build the training loader now (``fit_loop.setup_data()``, what ``estimated_stepping_batches``
    calls for a ``max_epochs`` run), so that ``trainer.num_training_batches`` is known."""
    require_tested("lightning", *TESTED, "sizing the training loader before fit (fit_loop.setup_data)")
    trainer.fit_loop.setup_data()


def restore_training_loader_state(trainer: pl.Trainer) -> bool:
    """Hand the training loader the state a checkpoint saved for it, when Lightning built the loader before
    it read the checkpoint (#20550); a no-op otherwise. Sets the sampler's epoch first (the restored
    position lies inside that epoch) and makes a new iterator from the restored state. Returns whether a
    state was restored."""
    require_tested("lightning", *TESTED, "restoring the training loader's saved position (Lightning #20550)")
    from lightning.fabric.utilities.data import _set_sampler_epoch

    fit_loop = trainer.fit_loop
    if not getattr(fit_loop, "_combined_loader_states_to_load", None) or fit_loop._combined_loader is None:
        return False
    for loader in fit_loop._combined_loader.flattened:
        _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
    fit_loop._load_combined_loader_states()
    if fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)  # a new iterator, from the restored state
    return True
