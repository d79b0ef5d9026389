"""What keeps a long run safe: the last state on disk, atomic writes, exact resume, clean stops.

- :class:`LastCheckpoint`: ``last.ckpt`` = the state at every save point (every N training steps
  and every epoch end), whatever the monitored metric did; separate from the best-by-metric
  ``ModelCheckpoint``; written through the public ``trainer.save_checkpoint``.
- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file beside the target, flushed,
  fsynced and renamed over it (``os.replace``), whatever ``$TMPDIR`` is.
- :class:`ExactResume`: torch's / numpy's / Python's global random states saved in the checkpoint and
  restored at the first training step after a resume (dropout and stochastic depth continue), and the
  training loader's saved position restored even when the loader was built before the checkpoint was
  read (``trainer.estimated_stepping_batches`` in ``configure_optimizers`` does that: Lightning #20550,
  worked around in :mod:`aa_lightning.compat.lightning`).
- :class:`StopOnSignal`: SIGTERM / SIGINT finish the current step, save ``last.ckpt`` and stop the
  run with :class:`RunInterrupted` (the CLI exits 143 / 130).
- :class:`NonFiniteLossGuard`: a NaN / inf training loss stops the run with :class:`NonFiniteLossError`
  naming the step, the value and the last good checkpoint (before any checkpoint of that step).
- :class:`StopAnywhere`: SIGTERM / SIGINT at any other moment of the process (start-up, the sanity check,
  validation or test outside a training epoch, after fitting) stop it at once with :class:`RunInterrupted`
  (exit 143 / 130), never a silent exit 0.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from aa_lightning.atomic_files import atomic_open
from aa_lightning.compat.lightning import restore_training_loader_state


class RunInterrupted(Exception):
    """The run was stopped by a signal after saving a resumable checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (the message names the step, the value and the last checkpoint)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into a temporary file beside ``path``, flush + fsync, then ``os.replace`` onto ``path``.

    A reader (or a resume after a kill) sees the old file or the new one, never a partial one; a
    failed write removes its temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(target, "wb") as handle:
        torch.save(obj, handle)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with local checkpoints written by :func:`atomic_torch_save`
    (remote ``fsspec`` paths keep Lightning's own writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


class LastCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` every ``every_n_train_steps`` optimizer steps (0: only at epoch ends) and at
    the end of every training epoch (after its validation), whatever any monitored metric did.

    A step save that falls on an epoch's last batch is left to the epoch-end save, which follows
    the epoch's validation (so the checkpoint also holds that epoch's best score). Written with the
    public ``trainer.save_checkpoint`` (so through the trainer's CheckpointIO, atomically, on every DDP
    rank's call) into the best-checkpoint callback's folder (``<run>/checkpoints``), or ``dirpath``.
    """

    FILE_NAME = "last.ckpt"

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            raise ValueError(
                f"checkpoint_every_n_steps must be >= 0 (0: at epoch ends only), got {every_n_train_steps}"
            )
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self._saved_at_step: int | None = None
        self.path = ""  # the file this callback writes (empty before the first save)

    @property
    def state_key(self) -> str:
        # the key checkpoints of earlier versions (a ModelCheckpoint subclass) stored this callback's state under
        return "LastCheckpoint{'kind': 'last'}"

    def _folder(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        best = trainer.checkpoint_callback
        if best is not None and getattr(best, "dirpath", None):
            return Path(best.dirpath)
        logger = trainer.logger
        if logger is not None and logger.log_dir is not None:
            return Path(logger.log_dir) / "checkpoints"
        return Path(trainer.default_root_dir) / "checkpoints"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch-end save follows
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` now (unless this step is saved already or the trainer is not fitting)."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or trainer.sanity_checking or trainer.fast_dev_run or self._saved_at_step == trainer.global_step:
            return
        path = self._folder(trainer) / self.FILE_NAME
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: loops, optimizer, callbacks
        self._saved_at_step = trainer.global_step
        self.path = str(path)

    def state_dict(self) -> dict[str, Any]:
        return {"path": self.path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the path follows the run folder of this run, not the one written in the checkpoint


def _last_checkpoint(trainer: pl.Trainer) -> LastCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """The newest checkpoint written by this run (``last.ckpt`` or the best one), or a sentence saying there is none."""
    paths = [getattr(cb, "best_model_path", "") for cb in trainer.checkpoint_callbacks]
    paths += [getattr(cb, "last_model_path", "") for cb in trainer.checkpoint_callbacks]
    paths += [cb.path for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
    existing = [p for p in paths if p and os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else "none saved yet"


class ExactResume(pl.Callback):
    """Saves the global random states (torch CPU and CUDA, numpy, Python) in every checkpoint; after a
    resume, restores them right before the first training step, so dropout / stochastic depth
    draw what the uninterrupted run would have drawn.

    Also hands the training loader its saved state (Lightning's ``_FitLoop`` loads it only when it
    builds the loader after the checkpoint is read; a ``configure_optimizers`` that asks for
    ``trainer.estimated_stepping_batches`` builds it before, and the saved position would be lost).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_training_loader_state(trainer)  # Lightning #20550, in aa_lightning.compat.lightning

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }  # loadable with weights_only
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class StopOnSignal(pl.Callback):
    """SIGTERM / SIGINT during training: finish the current step, write ``last.ckpt`` (a resumable,
    mid-epoch state), then raise :class:`RunInterrupted` (exit 143 / 130 from the CLI).

    The handlers are installed at the start of training and removed at its end; a second signal
    while stopping gets the default behaviour (immediate exit). Under DDP the ranks agree on the
    stop at every step (one all-reduce of a flag).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._stop_at_epoch_end = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second signal: do what the default would
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        self.received = None
        self._stop_at_epoch_end = False
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last batch: a checkpoint here would come before the epoch's validation and end-of-epoch
            # hooks, and a run resumed from it does not continue exactly. Stop once the epoch has ended instead.
            self._stop_at_epoch_end = True
            return
        self._stop(trainer, f"batch {batch_idx}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # also a signal that came during the epoch's validation: stop here rather than a step later
        received = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if self._stop_at_epoch_end or received:
            self._stop_at_epoch_end = False
            self._stop(trainer, "its end")

    def _stop(self, trainer: pl.Trainer, where: str) -> None:
        signum = self.received if self.received is not None else signal.SIGTERM
        last = _last_checkpoint(trainer)
        if last is not None:
            last.save_now(trainer)  # the save point LastCheckpoint itself uses (mid-epoch, or the epoch's end)
            saved = last.path
        else:
            saved = "no checkpoint (no LastCheckpoint callback)"
        name = signal.Signals(signum).name
        raise RunInterrupted(
            f"stopped by {name} after step {trainer.global_step} (epoch {trainer.current_epoch}, {where}); "
            f"saved {saved}; resume with --ckpt_path last (same --run_name)",
            signum,
        )


class StopAnywhere:
    """Process-wide SIGTERM / SIGINT handlers for the moments :class:`StopOnSignal` does not cover: the signal
    raises :class:`RunInterrupted` where the process is (nothing is saved by this stop; the message names the
    trainer's stage and the run's last checkpoint). Lightning's own SIGTERM handler, installed when a trainer
    call starts, keeps calling this one; its ``SIGTERMException`` (a ``SystemExit`` with status 0) is not left to
    decide the exit status.

    Use as a context manager around the whole job (main thread only); ``trainer`` is set once it is built.
    """

    def __init__(self) -> None:
        self.trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopAnywhere:
        import threading

        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in StopOnSignal.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def stage(self) -> str:
        """Where the process is: the trainer's running stage (``sanity_check``, ``train``, ``validate``,
        ``test``...), ``start-up`` before the trainer exists, ``between stages`` otherwise."""
        if self.trainer is None:
            return "start-up"
        stage = self.trainer.state.stage
        return stage.value if stage is not None else "between stages"

    def interrupted(self, signum: int) -> RunInterrupted:
        """The :class:`RunInterrupted` of ``signum`` at this moment."""
        last = last_good_checkpoint(self.trainer) if self.trainer is not None else "none saved yet"
        return RunInterrupted(
            f"stopped by {signal.Signals(signum).name} ({self.stage()}); nothing was saved by this stop, the run's "
            f"last checkpoint is {last}; resume with --ckpt_path last (same --run_name) once one exists",
            signum,
        )

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: what it would do without this handler
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise self.interrupted(signum)


class NonFiniteLossGuard(pl.Callback):
    """Stops the run at the first training step whose loss is NaN or infinite (on any DDP rank), before
    any checkpoint of that step is written, with a message naming the step, the value and the last
    good checkpoint."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = loss.detach().float()
        finite = bool(torch.isfinite(value).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        shown = value.item() if value.numel() == 1 else value.tolist()
        raise NonFiniteLossError(
            f"training stopped: the loss is {shown} (not finite) at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {batch_idx}); the last good checkpoint is "
            f"{last_good_checkpoint(trainer)}. Lower model.base_lr, check the data, or try trainer.gradient_clip_val."
        )
