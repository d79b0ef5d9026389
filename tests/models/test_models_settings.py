"""The AA settings as create_model kwargs: where attention goes, its dims, tables, errors.

Structure checks build the networks on the ``meta`` device (no memory, no compute)."""

from __future__ import annotations

import pytest
import timm
import torch

import aa_lightning  # noqa: F401
from aa_lightning.layers import AugmentedConv2d


def meta(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def augmented(model) -> dict[str, AugmentedConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AugmentedConv2d)}


@pytest.mark.parametrize(
    "name, conv, blocks",
    [
        ("aa_resnet26", "conv2", (2, 2, 2)),
        ("aa_resnet34", "conv1", (4, 6, 3)),
        ("aa_resnet50", "conv2", (4, 6, 3)),
        ("aa_resnet101", "conv2", (4, 23, 3)),
        ("aa_resnet152", "conv2", (8, 36, 3)),
    ],
)
def test_aa_resnets_augment_the_first_3x3_conv_of_every_block_in_stages_2_to_4(name, conv, blocks):
    layers = augmented(meta(name))
    expected = {f"layer{stage}.{i}.{conv}" for stage, n in zip((2, 3, 4), blocks) for i in range(n)}
    assert set(layers) == expected
    for n, layer in layers.items():
        assert layer.kernel_size == 3 and layer.num_heads == 8 and layer.position == "relative"
        assert layer.stride == (2 if n.split(".")[1] == "0" else 1)
        grid = 224 // {"layer2": 8, "layer3": 16, "layer4": 32}[n.split(".")[0]]
        assert layer.rel_h.shape[0] == layer.rel_w.shape[0] == 2 * grid - 1  # tables at the 224 input's grids


def test_paper_ratios_become_dims():
    """ResNet-50: k = 2v = 0.2, Nh 8 -> dk, dv rounded to multiples of 8; ResNet-34: k = v = 0.25."""
    r50 = augmented(meta("aa_resnet50"))
    assert [(r50[n].dk, r50[n].dv) for n in ("layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2")] == [
        (24, 16),
        (48, 24),
        (104, 48),
    ]
    r34 = augmented(meta("aa_resnet34"))
    assert [(r34[n].dk, r34[n].dv) for n in ("layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1")] == [
        (32, 32),
        (64, 64),
        (128, 128),
    ]


def test_aa_wrn_keeps_20_key_dims_per_head():
    layers = augmented(meta("aa_wrn28_10"))
    assert set(layers) == {f"stages.{s}.{b}.conv1" for s in range(3) for b in range(4)}
    for n, layer in layers.items():
        width = 160 * 2 ** int(n.split(".")[1])
        assert (layer.dk, layer.dv, layer.num_heads) == (160, width // 10, 8)  # dk = max(0.2 Fout, 20 Nh)
        grid = {0: 32, 1: 16, 2: 8}[int(n.split(".")[1])]
        assert layer.rel_h.shape == (2 * grid - 1, 20)
    assert layers["stages.1.0.conv1"].stride == 2 and layers["stages.0.0.conv1"].in_channels == 16


def test_aa_mnasnet_augments_the_expansion_convs_at_14x14_and_below():
    model = meta("aa_mnasnet_100")
    layers = augmented(model)
    expected = [
        "blocks.3.1",
        "blocks.3.2",
        "blocks.3.3",
        "blocks.4.0",
        "blocks.4.1",
        "blocks.5.0",
        "blocks.5.1",
        "blocks.5.2",
        "blocks.6.0",
    ]
    assert model.augmented_blocks == expected and set(layers) == {f"{b}.conv_pw" for b in expected}
    for n, layer in layers.items():
        assert layer.kernel_size == 1 and layer.num_heads == 4 and layer.dv == round(0.05 * layer.out_channels / 4) * 4
        grid = 7 if n.startswith(("blocks.5.1", "blocks.5.2", "blocks.6")) else 14  # the input of blocks.5.0 is 14x14
        assert layer.rel_h.shape[0] == 2 * grid - 1
    wider = meta("aa_mnasnet_100", aa_min_reduction=8)
    assert wider.augmented_blocks == ["blocks.2.1", "blocks.2.2", "blocks.3.0"] + expected  # + the 28x28 inputs


def test_fully_attentional_ablation():
    for name, layer in augmented(meta("aa_resnet50", aa_k=1.0, aa_v=1.0)).items():
        assert layer.conv is None and layer.dv == layer.dk == layer.out_channels, name


@pytest.mark.parametrize("position", ["none", "sine", "coord", "relative"])
def test_position_heads_and_backend_reach_every_layer(position):
    layers = augmented(meta("aa_resnet50", aa_position=position, aa_heads=4, aa_backend="reference"))
    assert len(layers) == 13
    for layer in layers.values():
        assert (layer.position, layer.num_heads, layer.backend) == (position, 4, "reference")
        assert (layer.rel_h is not None) == (position == "relative")
        assert layer.qkv.in_channels == layer.in_channels + (2 if position == "coord" else 0)


def test_img_size_sizes_the_tables():
    layer = augmented(meta("aa_resnet50", img_size=(64, 96)))["layer2.0.conv2"]
    assert layer.feat_size == (16, 24) and layer.rel_h.shape[0] == 2 * 8 - 1 and layer.rel_w.shape[0] == 2 * 12 - 1
    layer = augmented(meta("aa_resnet50", img_size=200))["layer3.0.conv2"]  # 200 / 8 = 25 -> ceil(25 / 2) = 13
    assert layer.feat_size == (25, 25) and layer.rel_h.shape[0] == 2 * 13 - 1
    overlay = augmented(meta("aa_resnet50", pretrained_cfg_overlay=dict(input_size=(3, 128, 128))))["layer4.0.conv2"]
    assert overlay.rel_h.shape[0] == 2 * 4 - 1
    dilated = augmented(meta("aa_resnet50", output_stride=16))["layer4.1.conv2"]  # dilation: layer4 stays at /16
    assert dilated.rel_h.shape[0] == 2 * 14 - 1 and dilated.conv.dilation == (2, 2)


def test_aa_stages_choose_the_augmented_stages():
    assert {n.split(".")[0] for n in augmented(meta("aa_resnet50", aa_stages=(4,)))} == {"layer4"}
    assert {n.split(".")[1] for n in augmented(meta("aa_wrn28_10", aa_stages=(2, 3)))} == {"1", "2"}


def test_timm_resnet_kwargs_pass_through_layers_and_channels():
    """An AA-ResNet-18 at half width, as the detection quickstart builds it: the same shapes as
    timm's resnet18 with those kwargs apart from the augmented convs."""
    kwargs = dict(layers=(2, 2, 2, 2), channels=(32, 64, 128, 256), stem_width=32)
    layers = augmented(meta("aa_resnet34", aa_heads=4, img_size=128, **kwargs))
    assert set(layers) == {f"layer{s}.{i}.conv1" for s in (2, 3, 4) for i in range(2)}
    assert [layers[f"layer{s}.1.conv1"].rel_h.shape[0] for s in (2, 3, 4)] == [2 * 16 - 1, 2 * 8 - 1, 2 * 4 - 1]
    ours = meta("aa_resnet34", aa_v=0.0, **kwargs).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in meta("resnet18", **kwargs).state_dict().items()
    }


@pytest.mark.parametrize("name", ["aa_resnet50", "aa_wrn28_10", "aa_mnasnet_100"])
def test_without_attention_the_model_is_its_baseline(name):
    baseline = {"aa_resnet50": "resnet50", "aa_wrn28_10": "wrn28_10", "aa_mnasnet_100": "semnasnet_100"}[name]
    ours, theirs = meta(name, aa_v=0.0).state_dict(), meta(baseline).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_non_augmented_keys_line_up_with_timm_resnet50():
    ours, theirs = meta("aa_resnet50").state_dict(), meta("resnet50").state_dict()
    augmented_prefixes = tuple(n + "." for n in augmented(meta("aa_resnet50")))
    shared = {k for k in ours if not k.startswith(augmented_prefixes)}
    assert shared == {k for k in theirs if not k.startswith(augmented_prefixes)}
    assert all(ours[k].shape == theirs[k].shape for k in shared)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aa_v=1.5), r"aa_v \(dv / Fout\) must be a number in \[0, 1\]"),
        (dict(aa_k=0.0), r"aa_k \(dk / Fout\) must be a number > 0"),
        (dict(aa_heads=0), r"aa_heads \(Nh\) must be an integer >= 1"),
        (
            dict(aa_position="absolute"),
            r"aa_position must be one of \('relative', 'none', 'sine', 'coord'\); got 'absolute'",
        ),
        (dict(aa_backend="cuda"), r"aa_backend must be one of"),
        (
            dict(aa_headz=4),
            r"unknown AA argument\(s\) \['aa_headz'\]; this model accepts \[.*'aa_heads'.*'aa_stages'.*'img_size'\]",
        ),
        (
            dict(aa_k=1.0, aa_v=1.0, aa_heads=7),
            r"aa_k=1.0, aa_v=1.0, aa_heads=7: v = 1.0 needs dv = Fout = 128 divisible by num_heads = 7",
        ),
        (dict(aa_stages=(0, 2)), r"aa_stages must be a subset of \(1, 2, 3, 4\)"),
        (dict(img_size=(224,)), r"img_size must be an int or \(H, W\)"),
    ],
)
def test_bad_settings_fail_naming_the_kwarg(kwargs, message):
    with pytest.raises(ValueError, match=message):
        meta("aa_resnet50", **kwargs)


@pytest.mark.parametrize(
    "name, heads, width",
    [
        ("aa_resnet26", 256, 128),  # stage 2's 3x3 convs are 128 wide
        ("aa_wrn28_10", 200, 160),  # group 1's convs are 160 wide
        ("aa_mnasnet_100", 500, 480),  # the first augmented conv_pw (80 -> 480); later ones are wider
    ],
)
def test_heads_wider_than_a_layer_fail_naming_layer_width_and_heads(name, heads, width):
    """aa_heads > Fout used to give that layer dv = 0 (a plain conv) and a model with fewer, or zero,
    AA layers without a word (aa_dims(64, 0.2, 0.1, 100) == (100, 0))."""
    with pytest.raises(
        ValueError,
        match=rf"AA layer on the .*conv \d+->{width} .*aa_heads={heads}: "
        rf"num_heads = {heads} exceeds the layer's width Fout = {width}",
    ):
        meta(name, aa_heads=heads)


def test_aa_dims_refuses_more_heads_than_channels():
    from aa_lightning.layers import aa_dims

    with pytest.raises(ValueError, match="num_heads = 100 exceeds the layer's width Fout = 64"):
        aa_dims(64, 0.2, 0.1, 100)
    assert aa_dims(64, 0.2, 0.1, 64) == (64, 64)  # one channel per head still exists
    assert aa_dims(64, 0.2, 0.0, 100) == (0, 0)  # no attention asked for: a plain conv, no error


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("aa_resnet50", dict(aa_heads=True), r"aa_heads \(Nh\) must be an integer >= 1; got True"),
        ("aa_resnet50", dict(aa_v=True), r"aa_v \(dv / Fout\) must be a number in \[0, 1\] .*; got True"),
        ("aa_resnet50", dict(aa_k=True), r"aa_k \(dk / Fout\) must be a number > 0 .*; got True"),
        ("aa_resnet50", dict(aa_min_dkh=True), r"aa_min_dkh must be an integer >= 1; got True"),
        ("aa_resnet50", dict(aa_rel_init_std=True), r"aa_rel_init_std must be a number > 0 .*; got True"),
        ("aa_resnet50", dict(aa_stages=(True, 2)), r"aa_stages must be a subset of \(1, 2, 3, 4\); got \(True, 2\)"),
        ("aa_wrn28_10", dict(aa_stages=[True]), r"aa_stages must be a subset of \(1, 2, 3\) .*; got \(True,\)"),
        ("aa_resnet50", dict(img_size=True), r"img_size must be an int or \(H, W\) of ints >= 1; got True"),
        ("aa_mnasnet_100", dict(aa_min_reduction=True), r"aa_min_reduction must be an integer >= 2 .*; got True"),
    ],
)
def test_booleans_are_not_numbers(name, kwargs, message):
    """A YAML ``true`` is a Python int: aa_heads: true built 1 head, aa_v: true a fully attentional
    layer, aa_stages: [true] stage 1, img_size: true a 1x1 table. Each is refused, naming the setting."""
    with pytest.raises(ValueError, match=message):
        meta(name, **kwargs)
