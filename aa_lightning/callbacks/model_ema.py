"""ModelEMA: Lightning's ``EMAWeightAveraging`` whose averaged weights are also what a test after fitting reports.

The EMA of the weights (Polyak averaging; timm's ``ModelEmaV3``, the EfficientNet / MnasNet recipes):
theta_ema <- decay * theta_ema + (1 - decay) * theta after every ``update_every_n_steps``-th optimizer step
from ``update_starting_at_step`` on (the first update copies theta). Lightning's callback keeps it in a
``torch.optim.swa_utils.AveragedModel``, swaps it into the module for every validation epoch, copies it into
the module when training ends, and saves it as the checkpoint's ``state_dict`` (the raw weights under
``current_model_state``, the update count under ``averaging_state``, its last update step in the callback
state), so ``last.ckpt`` resumes both exactly and every reader of ``state_dict`` (predict, export,
``load_from_checkpoint``) gets the EMA weights.

One change: Lightning's ``on_load_checkpoint`` also runs when ``trainer.test(ckpt_path=...)`` follows
``trainer.fit`` in the same process (the averaged model still exists), and there it loads the *raw*
``current_model_state`` into the module, so the test would report the raw weights of the best checkpoint
(seen with lightning 2.6.6). :class:`ModelEMA` restores both models only while fitting; outside fit
the module keeps the checkpoint's ``state_dict``, the EMA weights.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class ModelEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` (``decay``, ``update_every_n_steps``, ``update_starting_at_step`` / ``_epoch``,
    ``use_buffers``, ``device``) with validation *and* test reporting the EMA weights.

    Use in ``trainer.callbacks``::

        - class_path: aa_lightning.callbacks.ModelEMA
          init_args: {decay: 0.9999, update_starting_at_step: 100}
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        use_buffers: bool = True,
        device: str | None = None,
    ) -> None:
        for key, ok, allowed, value in [
            ("decay", 0.0 <= decay < 1.0, "in [0, 1)", decay),
            ("update_every_n_steps", update_every_n_steps >= 1, ">= 1", update_every_n_steps),
            (
                "update_starting_at_step",
                update_starting_at_step is None or update_starting_at_step >= 0,
                "null or >= 0",
                update_starting_at_step,
            ),
        ]:
            if not ok:
                raise ValueError(f"ModelEMA.{key} must be {allowed}, got {value!r}")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self.decay = decay

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)  # resume: the raw weights and the EMA
        # test / validate / predict: the module keeps checkpoint["state_dict"], the EMA weights
