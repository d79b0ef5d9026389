"""Optimizers and learning-rate schedules shared by the classification and detection tasks.

- ``param_groups``: no weight decay on normalization weights, biases and 1-D parameters
  (the relative position tables of AugmentedConv2d are 2-D and *are* decayed, as in the paper's
  TF code where every non-BN variable is).
- ``scaled_lr``: the paper's linear scaling rule, lr = base_lr * B_global / 256.
- ``warmup_schedule``: linear warm-up from 0, then cosine (to ``min_lr_ratio``) or step decay,
  evaluated per optimizer step.
"""
from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["cosine", "step", "constant"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a no-decay group (norms, biases, 1-D tensors)."""
    decay, no_decay = [], []
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, norm_types):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay_ids or p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scaled_lr(base_lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """The paper's linear scaling rule: ``base_lr * global_batch_size / reference_batch_size``."""
    return base_lr * global_batch_size / reference_batch_size


def build_optimizer(
    params: Iterable[dict],
    name: OptimizerName,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over pre-built parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas))
    raise ValueError(f"optimizer must be one of 'sgd', 'adamw'; got {name!r}")


def warmup_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: ScheduleName = "cosine",
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (linear from ~0 to 1).
    Then ``cosine``: ``min + (1 - min) * 0.5 * (1 + cos(pi * t))`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1];
    ``step``: ``gamma ** (number of milestones <= step)``; ``constant``: 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(1 for m in milestones if step >= m)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, max(0.0, (step - warmup_steps) / span))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"schedule must be one of 'cosine', 'step', 'constant'; got {schedule!r}")


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: ScheduleName = "cosine",
    min_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` applying :func:`warmup_factor` (use with ``interval: step``)."""

    def factor(step: int) -> float:
        return warmup_factor(step, total_steps, warmup_steps, schedule, min_lr_ratio, milestones, gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
