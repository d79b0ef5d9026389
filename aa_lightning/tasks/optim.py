"""Optimizers and learning-rate schedules shared by the classification and detection tasks.

Both tasks take the same settings (``optimizer``, ``base_lr``, ``reference_batch_size``,
``momentum``, ``nesterov``, ``betas``, ``weight_decay``, ``schedule``, ``min_lr_ratio``,
``lr_gamma``; warm-up and milestones in the task's unit) and build them with these helpers:

- ``peak_lr``: the paper's linear scaling rule, lr = base_lr * B_global / reference_batch_size,
  with B_global from :func:`global_batch_size`.
- ``build_optimizer``: torch's SGD (momentum, optional Nesterov) or AdamW, or any other optimizer of
  timm's factory by name (``timm.optim.create_optimizer_v2``: ``momentum``, ``nesterov``, ``lamb``,
  ``lars``, ``rmsproptf``, ...; extra keyword arguments such as ``eps``, ``alpha``, ``trust_clip`` from
  ``optimizer_kwargs``), always over timm's ``param_groups_weight_decay`` (no weight decay on biases
  and 1-D tensors, i.e. norms; the relative position tables of AugmentedConv2d are 2-D and *are*
  decayed, as in the paper's TF code where every non-BN variable is). ``sgd`` and ``adamw`` stay
  torch's own classes (timm's ``sgd`` is Nesterov SGD; this project's ``sgd`` takes ``nesterov``).
- ``warmup_schedule``: torch's ``LinearLR`` warm-up then ``CosineAnnealingLR`` (to
  ``min_lr_ratio``), ``MultiStepLR``, ``ConstantLR`` or an exponential staircase (``LambdaLR``:
  x ``gamma`` every ``decay_steps`` optimizer steps, timm's EfficientNet / MnasNet ``step`` schedule)
  in a ``SequentialLR``, stepped per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_weight_decay
from torch import nn
from torch.optim import lr_scheduler

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["cosine", "step", "constant", "exponential_step"]
SCHEDULES = ("cosine", "step", "constant", "exponential_step")
#: the optimizers built with torch's own classes, as this project's recipes and checkpoints always had them
TORCH_OPTIMIZERS = ("sgd", "adamw")


def optimizer_names() -> list[str]:
    """Every name :func:`build_optimizer` accepts: ``sgd``, ``adamw`` and timm's factory names (a
    ``lookahead_`` prefix wraps any of them in Lookahead)."""
    return sorted(set(TORCH_OPTIMIZERS) | set(list_optimizers()))


def check_optimizer_name(name: str, key: str = "model.optimizer") -> None:
    """A ``ValueError`` naming ``key`` and the allowed names unless ``name`` is one of :func:`optimizer_names`."""
    base = name[len("lookahead_") :] if name.startswith("lookahead_") else name
    if base not in optimizer_names():
        raise ValueError(f"{key} must be one of {', '.join(optimizer_names())} (or lookahead_<name>); got {name!r}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's ``param_groups_weight_decay`` (trainable parameters; biases and 1-D tensors undecayed),
    decayed group first as this project's checkpoints store them."""
    return param_groups_weight_decay(model, weight_decay)[::-1]


def global_batch_size(trainer: Any) -> int:
    """Images per optimizer step over all processes: batch per device x devices x nodes x accumulation.

    The batch per device is the data module's ``batch_size``, else the training loader's.
    """
    datamodule = getattr(trainer, "datamodule", None)
    per_device = getattr(datamodule, "batch_size", None)
    if per_device is None and trainer.train_dataloader is not None:
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
    if per_device is None:
        raise ValueError(
            "model.reference_batch_size needs the batch size: use a data module with batch_size "
            "(or set reference_batch_size: null to use base_lr as is)"
        )
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def peak_lr(base_lr: float, reference_batch_size: int | None, trainer: Any) -> tuple[float, int | None]:
    """``(base_lr * B_global / reference_batch_size, B_global)``; ``(base_lr, None)`` without a reference."""
    if not reference_batch_size:
        return base_lr, None
    global_batch = global_batch_size(trainer)
    return base_lr * global_batch / reference_batch_size, global_batch


def build_optimizer(
    model: nn.Module,
    name: OptimizerName,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
    optimizer_kwargs: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW (torch's), or timm's optimizer ``name``, over
    :func:`param_groups` of ``model``.

    timm's optimizers get ``lr``, ``momentum`` (where they have one), ``betas`` (where they have them)
    and ``optimizer_kwargs`` (which win); a keyword the optimizer does not take fails naming
    ``model.optimizer_kwargs``.
    """
    groups = param_groups(model, weight_decay)
    extra = dict(optimizer_kwargs or {})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **extra)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
    check_optimizer_name(name)
    try:
        # the groups carry their own weight_decay (0 for norms and biases); timm passes them through as they are
        return create_optimizer_v2(
            groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum, **{"betas": tuple(betas), **extra}
        )
    except TypeError as err:
        raise ValueError(f"model.optimizer_kwargs {extra} not accepted by optimizer {name!r}: {err}") from err


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: ScheduleName = "cosine",
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    decay_steps: float = 0.0,
) -> lr_scheduler.LRScheduler:
    """Per-step schedule (use with ``interval: step``) of the multiplier of the peak lr at step ``s``:

    warm-up ``(s + 1) / warmup_steps`` for ``s < warmup_steps`` (``LinearLR``), then ``cosine``:
    ``min + (1 - min) * 0.5 * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps)))``
    (``CosineAnnealingLR``), ``step``: ``gamma ** (number of milestones <= s)`` (``MultiStepLR``),
    ``constant``: 1, or ``exponential_step``: ``gamma ** floor(s / decay_steps)`` (``LambdaLR``; ``s`` counts
    from the run's first step, as timm's ``StepLRScheduler`` counts epochs from 0 under its warm-up).
    """
    after = max(0, warmup_steps)
    if schedule == "cosine":
        peak = max(group["lr"] for group in optimizer.param_groups)
        main: lr_scheduler.LRScheduler = lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps - after), eta_min=min_lr_ratio * peak
        )
    elif schedule == "step":  # milestones count from the end of the warm-up; those inside it apply at once
        main = lr_scheduler.MultiStepLR(optimizer, [max(0, m - after) for m in milestones], gamma)
    elif schedule == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "exponential_step":
        if decay_steps <= 0:
            raise ValueError(f"schedule exponential_step needs lr_decay_epochs > 0 (its period); got {decay_steps}")
        main = lr_scheduler.LambdaLR(optimizer, ExponentialStaircase(gamma, decay_steps, offset=after))
    else:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}")
    if after == 0:
        return main
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / after, end_factor=1.0, total_iters=max(1, after - 1))
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[after])


class ExponentialStaircase:
    """``gamma ** floor((k + offset) / period)`` at ``LambdaLR`` step ``k`` (``offset``: the warm-up steps
    before the scheduler starts, so the count is of the run's steps). An object, not a lambda, so the
    scheduler's state_dict holds its numbers."""

    def __init__(self, gamma: float, period: float, offset: int = 0) -> None:
        self.gamma, self.period, self.offset = float(gamma), float(period), int(offset)

    def __call__(self, k: int) -> float:
        return self.gamma ** math.floor((k + self.offset) / self.period)
