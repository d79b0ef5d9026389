"""Parameter and FLOP counts as the paper reports them.

FLOPs = 2 x multiply-adds of every convolution, linear layer and matrix product (torch's
``FlopCounterMode``): the paper's ResNet-50 at 224 is 8.2 GFLOPs = 2 x the usual 4.1 GMACs.
In an AA layer that includes the qkv / output 1x1 convs and the attention products Q K^T
(2 Nh (HW)^2 dkh), the relative logits (2 Nh HW (2H-1 + 2W-1) dkh, as the appendix computes
them) and A V (2 Nh (HW)^2 dvh). Not counted: softmax, normalization, activations, pooling,
additions. The AA layers run ``backend="reference"`` (explicit matmuls) while counting, so the
count does not depend on which fused kernel a backend would use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers import attention_backend


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_flops_by_op(model: nn.Module, input_size: Sequence[int], backend: str = "reference") -> dict[str, int]:
    """FLOPs (2 x MACs) of one eval-mode forward pass of one image [1, *input_size], by aten op
    (``convolution``: convs incl. the AA qkv / W_O 1x1 convs; ``bmm``: the attention products;
    ``addmm`` / ``mm``: linear layers).

    Works on a model built on the ``meta`` device (shapes only, no compute), e.g.
    ``with torch.device("meta"): model = timm.create_model(name)``.
    """
    parameter = next(model.parameters())
    x = torch.zeros(1, *input_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with attention_backend(model, backend), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def count_flops(model: nn.Module, input_size: Sequence[int], backend: str = "reference") -> int:
    """Total FLOPs (2 x MACs) of one image [1, *input_size]; see :func:`count_flops_by_op`."""
    return sum(count_flops_by_op(model, input_size, backend).values())
