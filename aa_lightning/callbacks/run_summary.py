"""RunSummary: remember the validation metrics of every epoch; format the end-of-run report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger


def _format_metrics(metrics: dict[str, float], prefix: str) -> str:
    parts = []
    for key, value in metrics.items():
        if not key.startswith(prefix) or key == f"{prefix}images":
            continue
        name = key[len(prefix) :]
        parts.append(f"{name} {100 * value:.2f}%" if name.startswith("top") else f"{name} {value:.4g}")
    return "  ".join(parts)


class RunSummary(pl.Callback):
    """Records ``val/*`` metrics after each validation epoch (not the sanity check).

    :meth:`report` gives the best validation epoch (by the ModelCheckpoint monitor, the first of
    equal values as ModelCheckpoint keeps it), the test metrics, where the logs and checkpoints
    are, and the ``tensorboard`` command.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def best_record(self, monitor: str | None, mode: str) -> dict[str, Any] | None:
        records = [r for r in self.history if monitor in r["metrics"] and math.isfinite(r["metrics"][monitor])]
        if not records:
            return self.history[-1] if self.history else None
        sign = 1.0 if mode == "max" else -1.0
        best = records[0]
        for record in records[1:]:
            if sign * record["metrics"][monitor] > sign * best["metrics"][monitor]:
                best = record
        return best

    def report(
        self,
        trainer: pl.Trainer,
        test_results: dict[str, float] | None,
        tested: str | None,
        checkpoints: dict[str, str],
        wall_seconds: float,
    ) -> str:
        """The summary text; ``checkpoints``: ``{"best": path, "last": path}`` as they were after fitting."""
        ckpt: ModelCheckpoint | None = trainer.checkpoint_callback
        monitor, mode = (ckpt.monitor, ckpt.mode) if ckpt is not None else (None, "max")
        best = self.best_record(monitor, mode)
        lines = ["", "=" * 78, "run summary", "-" * 78]
        model = trainer.lightning_module
        name = getattr(model.hparams, "model_name", None) or type(model).__name__
        params = sum(p.numel() for p in model.parameters()) / 1e6
        lines.append(f"model        {name} ({params:.3f}M parameters), {trainer.global_step} optimizer steps")
        if best is not None:
            which = f"best by {monitor}" if monitor else "last"
            lines.append(f"val ({which}, epoch {best['epoch']})  {_format_metrics(best['metrics'], 'val/')}")
        if test_results:
            images = test_results.get("test/images")
            on = f", {int(images)} images" if images else ""
            lines.append(f"test ({tested} checkpoint{on})  {_format_metrics(test_results, 'test/')}")
        for kind, path in checkpoints.items():
            if path:
                lines.append(f"{kind} ckpt    {path}")
        logger = trainer.logger
        if logger is not None and logger.log_dir:
            log_dir = Path(logger.log_dir)
            lines.append(f"logs         {log_dir}")
            if isinstance(logger, TensorBoardLogger):
                lines.append(f"tensorboard  tensorboard --logdir {log_dir.parent}")
        minutes, seconds = divmod(int(round(wall_seconds)), 60)
        lines.append(f"wall time    {minutes}m{seconds:02d}s")
        lines.append("=" * 78)
        return "\n".join(lines)
