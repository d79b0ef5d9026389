"""torchmetrics: gather a metric's list states once per process, not once per element.

torchmetrics' list states (``MeanAveragePrecision`` keeps one tensor per image) are gathered element
by element, one collective per element: when the processes hold different numbers of elements — which
is what an unrepeated sampler gives, so that every validation image counts once — the collectives no
longer pair up (gloo: "Received data size doesn't match expected size"; NCCL: a hang). Its public
``dist_sync_fn`` is still called once per element, so there is no public hook: the private
``Metric._sync_dist`` and ``Metric._reductions`` are used here (upstream: Lightning-AI/torchmetrics#2170,
"Imbalanced metric states with drop_last=False", and #3336; the slow DDP test with uneven shards in
tests/training/test_detection_cli.py fails if their roles change).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .versions import require_tested

TESTED = ("1.4", "2.0")


class PerProcessListGather:
    """Mixin for a ``torchmetrics.Metric``: its states are gathered with one ``all_gather_object`` per
    process (the whole list at once) and concatenated in rank order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_tested("torchmetrics", *TESTED, "the per-process gather of the detection metric's states")
        super().__init__(*args, **kwargs)

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        group = process_group or self.process_group
        world_size = dist.get_world_size(group)
        for attr in self._reductions:
            local = [x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in getattr(self, attr)]
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, local, group=group)
            setattr(self, attr, [item for part in gathered for item in part])
