"""Test-only Lightning callbacks loaded by train.py subprocesses (tests/ is put on their PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class StepProbe(pl.Callback):
    """Appends ``{"step", "indices"...}`` per training step to ``report`` (JSON lines); at optimizer step
    ``kill_at`` sends ``signal_name`` to its own process (``KILL``: no chance to save anything)."""

    def __init__(self, report: str, kill_at: int = -1, signal_name: str = "KILL") -> None:
        self.report, self.kill_at, self.signal_name = Path(report), kill_at, signal_name

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images, targets = batch
        line = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "targets": targets.tolist(),
            "image_sum": float(images.double().sum()),
        }
        with self.report.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if trainer.global_step == self.kill_at:
            if self.signal_name == "KILL" and "_pytest" in sys.modules:  # in the test process: it would end the suite
                raise RuntimeError("a StepProbe that SIGKILLs needs a fresh process: run_cli(..., fresh_process=True)")
            os.kill(os.getpid(), getattr(signal, f"SIG{self.signal_name}"))


class ResumeSnapshot(pl.Callback):
    """At the first training step of a fit that resumed, before anything changes, saves what the run holds:
    the weights, the optimizer state, the learning rate and the best score, to ``path`` (torch.save)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._done:
            return
        self._done = True
        optimizer = trainer.optimizers[0]
        torch.save(
            {
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "lr": [group["lr"] for group in optimizer.param_groups],
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                "best_model_score": trainer.checkpoint_callback.best_model_score,
                "best_model_path": trainer.checkpoint_callback.best_model_path,
                "global_step": trainer.global_step,
            },
            self.path,
        )


class FinalWeights(pl.Callback):
    """Saves the module's state_dict at the end of fitting to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path)


class SignalAt(pl.Callback):
    """Sends ``signal_name`` (``TERM``, ``INT``) to its own process when the Lightning hook ``hook`` runs
    (e.g. ``on_sanity_check_start``, ``on_fit_start``, ``on_test_start``); once."""

    def __init__(self, hook: str, signal_name: str = "TERM") -> None:
        self.signal_name = signal_name
        self._sent = False
        setattr(self, hook, self._send)

    def _send(self, *args: Any, **kwargs: Any) -> None:
        if not self._sent:
            self._sent = True
            os.kill(os.getpid(), getattr(signal, f"SIG{self.signal_name}"))


class RaiseAt(pl.Callback):
    """Raises ``RuntimeError(message)`` when the Lightning hook ``hook`` runs (a fault after the resume check)."""

    def __init__(self, hook: str, message: str = "probe failure") -> None:
        self.message = message
        setattr(self, hook, self._raise)

    def _raise(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(self.message)
