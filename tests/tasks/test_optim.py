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


@pytest.mark.parametrize("total, warmup, period, gamma", [(40, 0, 2.4, 0.97), (40, 5, 3.0, 0.5), (30, 7, 2.5, 0.8)])
def test_exponential_step_is_gamma_to_the_floor_of_step_over_period(total, warmup, period, gamma):
    lrs = run_schedule(total, warmup, "exponential_step", gamma=gamma, decay_steps=period)
    expected = [
        0.3 * ((s + 1) / warmup if s < warmup else gamma ** math.floor(s / period)) for s in range(total)
    ]  # timm's StepLRScheduler: decays counted from the run's start, the warm-up overriding its first steps
    assert [lr[0] for lr in lrs] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(lr[0] == lr[1] for lr in lrs)


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
    with pytest.raises(ValueError, match="one of 'cosine', 'step', 'constant', 'exponential_step'; got 'linear'"):
        warmup_schedule(optimizer, 10, 2, "linear")
    with pytest.raises(ValueError, match=r"model\.optimizer must be one of .*lamb.*; got 'lambda'"):
        build_optimizer(torch.nn.Linear(2, 2), "lambda", 0.1, 0.0)


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


TIMM_OPTIMIZERS = {  # name -> (class name, extra kwargs given through optimizer_kwargs)
    "momentum": ("SGD", {}),
    "nesterov": ("SGD", {}),
    "lamb": ("Lamb", {"trust_clip": True}),
    "lars": ("Lars", {"trust_clip": True}),
    "rmsproptf": ("RMSpropTF", {"eps": 1e-3, "alpha": 0.9}),
    "adamp": ("AdamP", {}),
}


@pytest.mark.parametrize("name", sorted(TIMM_OPTIMIZERS))
def test_timm_optimizers_build_by_name_with_norms_and_biases_undecayed(name):
    class_name, extra = TIMM_OPTIMIZERS[name]
    model = timm.create_model("test_resnet", num_classes=4)
    optimizer = build_optimizer(model, name, 0.01, 0.05, momentum=0.8, optimizer_kwargs=extra)
    assert type(optimizer).__name__ == class_name
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == 0.01
        for key, value in extra.items():
            assert group[key] == value, (key, group[key])
        if "momentum" in group:
            assert group["momentum"] == 0.8
        expected = 0.0 if all(p.ndim <= 1 for p in group["params"]) else 0.05
        assert group["weight_decay"] == expected, [names[id(p)] for p in group["params"]][:3]
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed and all(model.get_parameter(n).ndim > 1 for n in decayed)
    assert "fc.bias" not in decayed and not any(".bn" in n or "norm" in n for n in decayed)
    loss = model(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()  # and it steps


def test_nesterov_and_momentum_differ_as_timm_names_them():
    model = torch.nn.Linear(3, 2)
    assert build_optimizer(model, "nesterov", 0.1, 0.0).param_groups[0]["nesterov"]
    assert not build_optimizer(model, "momentum", 0.1, 0.0).param_groups[0]["nesterov"]


def test_bad_optimizer_kwargs_fail_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.optimizer_kwargs \{'gamma': 2.0\} not accepted by optimizer 'lamb'"):
        build_optimizer(torch.nn.Linear(2, 2), "lamb", 0.1, 0.0, optimizer_kwargs={"gamma": 2.0})
