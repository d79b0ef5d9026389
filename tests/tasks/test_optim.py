"""tasks.optim: the torch schedulers against the schedule's closed form, weight-decay groups, optimizers."""

import math

import pytest
import timm
import torch

from aa_lightning.tasks.optim import build_optimizer, param_groups, warmup_schedule


def closed_form(step, total, warmup, schedule, min_lr_ratio=0.0, milestones=(), gamma=0.1):
    """The multiplier of the peak lr at optimizer step ``step``, as docs/training.md states it."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(1 for m in milestones if step >= m)
    t = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def run_schedule(total, warmup, schedule, **kwargs):
    weight, bias = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}], lr=0.3, momentum=0.9)
    scheduler = warmup_schedule(optimizer, total, warmup, schedule, **kwargs)
    lrs = []
    for _ in range(total):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "total, warmup, schedule, kwargs",
    [
        (40, 5, "cosine", {}),
        (40, 0, "cosine", {}),
        (40, 1, "cosine", {}),
        (30, 7, "cosine", {"min_lr_ratio": 0.1}),
        (10, 12, "cosine", {}),  # warm-up longer than the run
        (40, 5, "step", {"milestones": [10, 25, 25], "gamma": 0.5}),
        (40, 0, "step", {"milestones": [0, 3], "gamma": 0.1}),
        (40, 6, "step", {"milestones": [2, 6, 30], "gamma": 0.2}),  # milestones inside the warm-up
        (20, 4, "constant", {}),
        (20, 0, "constant", {}),
    ],
)
def test_schedule_follows_its_closed_form_at_every_step(total, warmup, schedule, kwargs):
    lrs = run_schedule(total, warmup, schedule, **kwargs)
    expected = [0.3 * closed_form(s, total, warmup, schedule, **kwargs) for s in range(total)]
    assert [lr[0] for lr in lrs] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(lr[0] == lr[1] for lr in lrs)  # every group follows the schedule


def test_unknown_schedule_and_optimizer_are_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="schedule must be one of 'cosine', 'step', 'constant'; got 'linear'"):
        warmup_schedule(optimizer, 10, 2, "linear")
    with pytest.raises(ValueError, match="optimizer must be one of 'sgd', 'adamw'; got 'lamb'"):
        build_optimizer(torch.nn.Linear(2, 2), "lamb", 0.1, 0.0)


def test_weight_decay_groups_leave_norms_and_biases_undecayed():
    model = timm.create_model("test_resnet", num_classes=4)
    model.fc.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    norms = {
        f"{m}.{p}"
        for m, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert norms and norms <= undecayed and "fc.bias" in undecayed
    assert "conv1.0.weight" in decayed and all(p.ndim > 1 for p in decay["params"])
    assert "fc.weight" not in decayed | undecayed  # frozen parameters are left out
    assert decayed | undecayed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_sgd_is_plain_momentum_unless_nesterov_is_asked_for():
    model = torch.nn.Linear(3, 2)
    sgd = build_optimizer(model, "sgd", 0.1, 1e-4, momentum=0.8)
    assert type(sgd) is torch.optim.SGD and all(not g["nesterov"] and g["momentum"] == 0.8 for g in sgd.param_groups)
    assert build_optimizer(model, "sgd", 0.1, 1e-4, nesterov=True).param_groups[0]["nesterov"]
    adamw = build_optimizer(model, "adamw", 0.1, 1e-4, betas=(0.8, 0.99))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["betas"] == (0.8, 0.99)
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0]
