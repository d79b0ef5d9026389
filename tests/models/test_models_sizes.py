"""Parameter counts and FLOPs: against the paper's tables and against an independent count from
the paper's layer definition (networks built on the ``meta`` device: no memory, no compute)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import aa_lightning  # noqa: F401
from aa_lightning.layers import AugmentedConv2d
from aa_lightning.models.complexity import count_flops, count_params

IMAGENET, CIFAR = (3, 224, 224), (3, 32, 32)

# paper row -> (timm name, kwargs, paper params in M)
PAPER_PARAMS = {
    "WRN-28-10": ("wrn28_10", {}, 36.3),
    "AA-WRN-28-10": ("aa_wrn28_10", {}, 36.2),
    "ResNet-34": ("resnet34", {}, 21.8),
    "AA-ResNet-34": ("aa_resnet34", {}, 20.7),
    "ResNet-50": ("resnet50", {}, 25.6),
    "AA-ResNet-50": ("aa_resnet50", {}, 25.8),
    "ResNet-101": ("resnet101", {}, 44.5),
    "AA-ResNet-101": ("aa_resnet101", {}, 45.4),
    "AA-ResNet-50 k=v=0.25": ("aa_resnet50", {"aa_k": 0.25, "aa_v": 0.25}, 24.3),
    "AA-ResNet-50 k=v=0.5": ("aa_resnet50", {"aa_k": 0.5, "aa_v": 0.5}, 22.3),
    "AA-ResNet-50 k=v=0.75": ("aa_resnet50", {"aa_k": 0.75, "aa_v": 0.75}, 20.7),
    "AA-ResNet-50 k=v=1.0": ("aa_resnet50", {"aa_k": 1.0, "aa_v": 1.0}, 19.4),
}
# Rows more than 2% off. The paper's own layer definition (conv branch Fout - dv, qkv 1x1 conv
# Fin -> 2dk + dv, W_O dv x dv) changes a w -> w 3x3 conv by -9 w dv + w (2 dk + dv) + dv^2 =
# (-9v + 2k + v + v^2) w^2: -0.39 w^2 at k = 2v = 0.2 and -1.44 w^2 at k = v = 0.25, so these AA
# networks must be *smaller* than (or as much smaller than) the paper lists; the same definition
# reproduces the paper's attention-dominated rows (k = v = 0.5 / 0.75 / 1.0) within 0.7%.
DIFFERS_FROM_PAPER = {"AA-ResNet-34", "AA-ResNet-50", "AA-ResNet-101", "AA-ResNet-50 k=v=0.25"}
# paper row -> (timm name, kwargs, input, paper GFLOPs) where our count is within 2%
PAPER_GFLOPS = {
    "WRN-28-10": ("wrn28_10", {}, CIFAR, 10.4),
    "ResNet-34": ("resnet34", {}, IMAGENET, 7.4),
    "ResNet-50": ("resnet50", {}, IMAGENET, 8.2),
    "AA-ResNet-50": ("aa_resnet50", {}, IMAGENET, 8.3),
    "ResNet-101": ("resnet101", {}, IMAGENET, 15.6),
}


def meta(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("row", PAPER_PARAMS)
def test_parameter_counts_against_the_paper(row):
    name, kwargs, paper = PAPER_PARAMS[row]
    ours = count_params(meta(name, **kwargs)) / 1e6
    if row in DIFFERS_FROM_PAPER:  # explained above; listed so that a change shows up here
        assert abs(ours / paper - 1) > 0.02 and ours < paper
    else:
        assert ours == pytest.approx(paper, rel=0.02)


def _round_to_heads(x: float, nh: int) -> int:
    return nh * math.floor(x / nh + 0.5)


def paper_dims(fout: int, k: float, v: float, nh: int, min_dkh: int = 1) -> tuple[int, int]:
    """(dk, dv): k Fout and v Fout to the nearest multiple of Nh; v = 1 -> dv = Fout; >= 1 head dim."""
    dv = fout if v == 1.0 else min(max(_round_to_heads(v * fout, nh), nh), fout)
    return max(_round_to_heads(k * fout, nh), min_dkh * nh), dv


def augmentation_delta(
    conv: torch.nn.Conv2d, input_hw: tuple[int, int], k: float, v: float, nh: int, min_dkh: int = 1
) -> int:
    """Parameters an AAConv adds over the plain ``conv`` it replaces (paper Section 3.3):
    conv branch loses dv filters; qkv 1x1 conv Fin -> 2dk + dv and W_O dv -> dv (with biases);
    relative tables (2H'-1 + 2W'-1) x dkh at the attention grid H' x W'."""
    fin, fout, ksize, stride = conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0]
    dk, dv = paper_dims(fout, k, v, nh, min_dkh)
    h, w = (math.ceil(s / stride) for s in input_hw)
    return -ksize * ksize * fin * dv + (fin + 1) * (2 * dk + dv) + (dv + 1) * dv + (2 * h - 1 + 2 * w - 1) * (dk // nh)


def resnet_augmented_convs(baseline):
    """(conv, input (H, W)) of the first 3x3 conv of every block in layer2-4 at 224."""
    convs = []
    for stage, reduction in ((2, 4), (3, 8), (4, 16)):
        for i, block in enumerate(getattr(baseline, f"layer{stage}")):
            conv = block.conv2 if hasattr(block, "conv3") else block.conv1
            size = 224 // reduction if i == 0 else 224 // (2 * reduction)
            convs.append((conv, (size, size)))
    return convs


@pytest.mark.parametrize(
    "name, baseline, kwargs, k, v",
    [
        ("aa_resnet26", "resnet26", {}, 0.25, 0.25),
        ("aa_resnet34", "resnet34", {}, 0.25, 0.25),
        ("aa_resnet50", "resnet50", {}, 0.2, 0.1),
        ("aa_resnet101", "resnet101", {}, 0.2, 0.1),
        ("aa_resnet152", "resnet152", {}, 0.2, 0.1),
        ("aa_resnet50", "resnet50", {"aa_k": 0.25, "aa_v": 0.25}, 0.25, 0.25),
        ("aa_resnet50", "resnet50", {"aa_k": 1.0, "aa_v": 1.0}, 1.0, 1.0),
    ],
)
def test_aa_resnet_counts_follow_the_layer_definition(name, baseline, kwargs, k, v):
    reference = meta(baseline)
    expected = count_params(reference) + sum(
        augmentation_delta(c, hw, k, v, 8) for c, hw in resnet_augmented_convs(reference)
    )
    assert count_params(meta(name, **kwargs)) == expected


def test_aa_wrn_count_follows_the_layer_definition():
    reference = meta("wrn28_10")
    sizes = {0: (32, 32), 1: (16, 16), 2: (8, 8)}
    delta = 0
    for s, stage in enumerate(reference.stages):
        for i, block in enumerate(stage):
            input_hw = sizes[s - 1] if (i == 0 and s > 0) else sizes[s]
            delta += augmentation_delta(block.conv1, input_hw, 0.2, 0.1, 8, min_dkh=20)
    assert count_params(meta("aa_wrn28_10")) == count_params(reference) + delta


def test_wrn28_10_is_zagoruyko_komodakis():
    """36,536,884 parameters for 100 classes: the count of the WRN authors' code (the paper's
    Table 1 rounds WRN-28-10 to 36.3M; 36.5M is what WRN-28-10 has)."""
    assert count_params(meta("wrn28_10")) == 36_536_884


@pytest.mark.parametrize(
    "multiplier, baseline",
    [("075", "semnasnet_075"), ("100", "semnasnet_100"), ("125", "semnasnet_125"), ("140", "semnasnet_140")],
)
def test_aa_mnasnet_overhead_is_the_papers(multiplier, baseline):
    """+0.1M to +0.35M over MnasNet-A1 (paper); exactly the layer definition's count."""
    reference = meta(baseline)
    blocks = [(3, 1, 14), (3, 2, 14), (3, 3, 14), (4, 0, 14), (4, 1, 14), (5, 0, 14), (5, 1, 7), (5, 2, 7), (6, 0, 7)]
    delta = sum(augmentation_delta(reference.blocks[s][b].conv_pw, (hw, hw), 0.1, 0.05, 4) for s, b, hw in blocks)
    ours = count_params(meta(f"aa_mnasnet_{multiplier}"))
    assert ours == count_params(reference) + delta
    assert 0.1e6 <= delta <= 0.35e6


def test_semnasnet_125_scales_timms_mnasnet_a1():
    ours, timms = meta("semnasnet_125"), meta("semnasnet_100")
    assert ours.conv_stem.out_channels == 40 and ours.blocks[-1][-1].conv_pwl.out_channels == 400
    assert [len(s) for s in ours.blocks] == [len(s) for s in timms.blocks]
    assert count_params(timms) < count_params(ours) < count_params(meta("semnasnet_140"))


@pytest.mark.parametrize("row", PAPER_GFLOPS)
def test_gflops_against_the_paper(row):
    """The paper counts FLOPs as 2 x multiply-adds (ResNet-50: 8.2 = 2 x 4.1 GMACs)."""
    name, kwargs, input_size, paper = PAPER_GFLOPS[row]
    assert count_flops(meta(name, **kwargs), input_size) / 1e9 == pytest.approx(paper, rel=0.02)


@pytest.mark.parametrize("position", ["relative", "none"])
def test_flops_of_one_aaconv(position):
    """Convs + qkv + W_O + Q K^T + A V + relative logits, 2 FLOPs per multiply-add."""
    fin, fout, dk, dv, nh, stride, size = 32, 64, 24, 16, 4, 2, 14
    layer = AugmentedConv2d(fin, fout, 3, stride, dk=dk, dv=dv, num_heads=nh, position=position, feat_size=size)
    h = w = size // stride
    length = h * w
    expected = 2 * length * (9 * fin * (fout - dv) + fin * (2 * dk + dv) + dv * dv)
    expected += 2 * nh * length * length * (dk // nh + dv // nh)
    if position == "relative":
        expected += 2 * nh * length * (2 * w - 1 + 2 * h - 1) * (dk // nh)
    assert count_flops(layer, (fin, size, size)) == expected
    with torch.device("meta"):
        on_meta = AugmentedConv2d(fin, fout, 3, stride, dk=dk, dv=dv, num_heads=nh, position=position, feat_size=size)
    assert count_flops(on_meta, (fin, size, size)) == expected
    assert layer.backend == "auto"  # restored after counting with the reference backend
