"""aa_lightning.augment: the public post-construction step that makes the AA-ResNets / AA-MnasNets out of
timm's own networks, applied to timm's other ResNet-family networks (ResNeXt, ResNet-D, SE-ResNet).

The family tests mirror what timm's tests/models/test_models.py checks of a model (forward, backward with a
gradient for every parameter, the default cfg's keys, features_only / forward_intermediates, a classifier
reset); structure checks build the full-size networks on the ``meta`` device.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import BlurPool2d

import aa_lightning
from aa_lightning.layers import AugmentedConv2d
from aa_lightning.models.complexity import count_params

FAMILY = ["resnext50_32x4d", "resnet50d", "seresnet50"]
#: one block per stage at a quarter of the widths: every kind of AA layer (strided, unstrided, grouped
#: for ResNeXt) at three grid sizes, small enough for a CPU test
SMALL = dict(layers=(1, 2, 2, 1), channels=(16, 32, 64, 128))

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def meta(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def augmented(model) -> dict[str, AugmentedConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AugmentedConv2d)}


def test_augment_is_public():
    assert aa_lightning.augment is aa_lightning.models.augment
    assert "augment" in aa_lightning.__all__ and "augment" in aa_lightning.models.__all__


@pytest.mark.parametrize("name", FAMILY)
def test_augment_swaps_the_3x3_conv_of_every_block_in_the_chosen_stages(name):
    model = meta(name)
    plain = {
        n: (m.in_channels, m.out_channels, m.stride[0], m.groups)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    }
    assert aa_lightning.augment(model, stages=(2, 3, 4), k=0.2, v=0.1, heads=8) is model
    layers = augmented(model)
    blocks = {2: 4, 3: 6, 4: 3}
    assert set(layers) == {f"layer{s}.{i}.conv2" for s, n in blocks.items() for i in range(n)}
    assert model.augmented_blocks == [f"layer{s}.{i}" for s, n in blocks.items() for i in range(n)]
    for n, layer in layers.items():
        stage, first = int(n[5]), n.split(".")[1] == "0"
        fin, fout, stride, groups = plain[n]
        assert (layer.in_channels, layer.out_channels, layer.stride, layer.num_heads) == (fin, fout, stride, 8)
        assert layer.conv.groups == groups and (fout - layer.dv) % groups == 0  # ResNeXt: whole groups
        size = 224 // 2 ** (stage if first else stage + 1)  # the block's input: the stage's input if strided
        assert layer.feat_size == (size, size)
        assert layer.rel_h.shape[0] == layer.rel_w.shape[0] == 2 * math.ceil(size / stride) - 1


def test_resnext_grouped_convs_keep_whole_groups():
    """ResNeXt's 3x3 convs have 32 groups: dv is a multiple of lcm(Nh, groups) so the conv branch
    (Fout - dv channels) still splits into the 32 groups (layer2: 256 wide, v = 0.1 -> dv = 32)."""
    layers = augmented(aa_lightning.augment(meta("resnext50_32x4d"), heads=8))
    assert [(layers[f"layer{s}.0.conv2"].dk, layers[f"layer{s}.0.conv2"].dv) for s in (2, 3, 4)] == [
        (48, 32),
        (104, 64),
        (208, 96),
    ]
    assert layers["layer2.0.conv2"].conv.out_channels == 224 and layers["layer2.0.conv2"].conv.groups == 32


def test_the_registered_aa_resnets_are_augmented_timm_resnets():
    """aa_resnet50 is timm's resnet50 + augment: the same modules, keys, shapes and parameter count."""
    ours = meta("aa_resnet50")
    theirs = aa_lightning.augment(meta("resnet50"), stages=(2, 3, 4), k=0.2, v=0.1, heads=8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    assert count_params(ours) == count_params(theirs) and type(ours) is timm.models.resnet.ResNet
    mnas = meta("aa_mnasnet_100")
    plain = aa_lightning.augment(meta("semnasnet_100"), stages=None, min_reduction=16, k=0.1, v=0.05, heads=4)
    assert {k: v.shape for k, v in mnas.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert type(mnas) is timm.models.efficientnet.EfficientNet and mnas.augmented_blocks == plain.augmented_blocks


def test_feature_sizes_are_read_from_the_model_not_a_stride_table():
    """timm's anti-aliased ResNet (aa_layer) strides after conv2, not in it: conv2 of a stage's first
    block runs at the stage's input size with stride 1, and its tables are sized for that."""
    model = aa_lightning.augment(meta("resnet50", aa_layer=BlurPool2d), stages=(2,), img_size=64)
    first, second = model.layer2[0].conv2, model.layer2[1].conv2
    assert (first.stride, first.feat_size, first.rel_h.shape[0]) == (1, (16, 16), 2 * 16 - 1)
    assert (second.stride, second.feat_size, second.rel_h.shape[0]) == (1, (8, 8), 2 * 8 - 1)
    dilated = aa_lightning.augment(meta("resnet50d", output_stride=8), stages=(3, 4), img_size=(64, 96))
    assert {m.feat_size for m in augmented(dilated).values()} == {(8, 12)}  # dilation: stages 3-4 stay at /8
    assert dilated.layer4[1].conv2.conv.dilation == (4, 4)


def test_min_reduction_picks_the_blocks_by_their_input_resolution():
    """stages=None, min_reduction=16: every block whose conv input is at 1/16 of the image or below
    (as the AA-MnasNets choose theirs): layer3.0's input is at 1/8, layer4.0's at 1/16."""
    model = aa_lightning.augment(meta("resnet50"), stages=None, min_reduction=16, heads=4)
    assert model.augmented_blocks == [*(f"layer3.{i}" for i in range(1, 6)), "layer4.0", "layer4.1", "layer4.2"]
    assert model.layer4[0].conv2.feat_size == (14, 14) and model.layer4[1].conv2.feat_size == (7, 7)


@pytest.mark.parametrize("name", FAMILY)
def test_augmented_family_forward_backward(name):
    """timm's test_model_forward + test_model_backward, and the same output with grad checkpointing."""
    torch.manual_seed(0)
    model = aa_lightning.augment(timm.create_model(name, num_classes=42, **SMALL), heads=4, img_size=64)
    assert len(augmented(model)) == 5
    model.train()
    outputs = model(torch.randn(2, 3, 64, 64))
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    model.eval()
    x = torch.randn(1, 3, 48, 80)  # not the size the tables were built for: resampled in the layer
    with torch.no_grad():
        outputs = model(x)
        model.set_grad_checkpointing()
        assert torch.allclose(model(x), outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY)
def test_augmented_family_default_cfg_and_classifier_reset(name):
    """timm's test_model_default_cfgs: the cfg keys, the first conv / classifier in the state dict,
    forward_features / forward_head shapes, reset_classifier (at 224 on the meta device)."""
    model = aa_lightning.augment(meta(name)).eval()
    cfg = model.pretrained_cfg
    for key in ("input_size", "pool_size", "mean", "std", "first_conv", "classifier", "num_classes", "crop_pct"):
        assert key in cfg, key
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    x = torch.zeros(1, *cfg["input_size"], device="meta")
    features = model.forward_features(x)
    assert features.shape == (1, model.num_features, *cfg["pool_size"])
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (1, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == features.shape
    model.reset_classifier(7, "avg")
    assert model(x).shape == (1, 7)


@pytest.mark.parametrize("name", FAMILY)
def test_augmented_family_features(name):
    """timm's test_model_forward_features and test_model_forward_intermediates on augmented networks:
    augment works on a features_only network too (the same convs, the same feature shapes)."""
    torch.manual_seed(0)
    model = aa_lightning.augment(timm.create_model(name, **SMALL), heads=4, img_size=64).eval()
    features_only = aa_lightning.augment(timm.create_model(name, features_only=True, **SMALL), heads=4, img_size=64)
    assert set(augmented(features_only)) == set(augmented(model))
    features_only.load_state_dict(model.state_dict(), strict=False)  # the features model has no head
    features_only.eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
        features = features_only(x)
    channels, reductions = features_only.feature_info.channels(), features_only.feature_info.reduction()
    assert reductions == [2, 4, 8, 16, 32] and [f.shape[1] for f in intermediates] == channels
    for r, f, g in zip(reductions, features, intermediates, strict=True):
        assert f.shape[-2:] == (math.ceil(40 / r), math.ceil(56 / r)) and torch.allclose(f, g, atol=1e-6)


def test_augment_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"augment: stages must be a subset of \(1, 2, 3, 4\) \(the model's "):
        aa_lightning.augment(meta("resnet18"), stages=(2, 5))
    with pytest.raises(ValueError, match=r"augment: layer2.0.conv1 is already an AugmentedConv2d"):
        aa_lightning.augment(aa_lightning.augment(meta("resnet18")))
    with pytest.raises(ValueError, match=r"augment: no stage of VisionTransformer"):
        aa_lightning.augment(meta("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match=r"aa_heads \(Nh\) must be an integer >= 1; got True"):
        aa_lightning.augment(meta("resnet18"), heads=True)
    with pytest.raises(ValueError, match=r"img_size must be an int or \(H, W\) of ints >= 1; got \(True, 64\)"):
        aa_lightning.augment(meta("resnet18"), img_size=(True, 64))


def test_no_private_timm_module_outside_the_compat_module():
    """Only aa_lightning/compat/timm.py may use timm's private API (goal: public ground)."""
    package = Path(aa_lightning.__file__).parent
    private = re.compile(r"\btimm(\.\w+)*\._\w+|from\s+timm[\w.]*\s+import\s+(.*[\s,(])?_\w+")
    offenders = [
        f"{path.relative_to(package)}:{i}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.relative_to(package).parts[0] != "compat"
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if private.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("version", ["1.1.0", "1.0.8", "2.0.0.dev0", "unknown"])
def test_timm_private_use_checks_the_timm_version(monkeypatch, version):
    """The one private use (MnasNet-A1 at 1.25) fails in one line naming the version outside the
    tested range, instead of building whatever another timm's private generator builds."""
    from aa_lightning.compat import timm as _timm_compat

    monkeypatch.setattr(timm, "__version__", version)
    for name in ("semnasnet_125", "aa_mnasnet_125"):
        with pytest.raises(
            RuntimeError,
            match=rf"^aa_lightning.compat.timm: timm {re.escape(version)} is "
            r"outside the tested range >=1\.0\.9,<1\.1\.0 [^\n]*$",
        ):
            meta(name)
    _timm_compat.check_timm_version("1.0.31")  # the tested one
    assert type(meta("aa_mnasnet_100")).__name__ == "EfficientNet"  # public entry points need no check


@pytest.mark.parametrize("name", ["aa_mnasnet_075", "semnasnet_125"])  # the public entry + augment, the compat path
def test_mnasnet_weights_load_after_the_augment_step(tmp_path, name):
    """pretrained=True with a local file: timm's loader runs after augment (the file has the AA layers),
    for the classifier and the features_only network."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    kwargs = dict(img_size=32) if name.startswith("aa_") else {}
    source = timm.create_model(name, num_classes=5, **kwargs)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    overlay = dict(file=str(path), num_classes=5)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, **kwargs)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    features = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, **kwargs)
    own = features.state_dict()
    assert own and all(torch.equal(v, source.state_dict()[k]) for k, v in own.items())
    assert loaded.pretrained_cfg["architecture"] == name and "classifier" not in features.pretrained_cfg


def test_new_layers_are_initialized_as_the_model_family_initializes_its_convs():
    """timm's ResNet init (Kaiming normal, fan out; biases left) and EfficientNet init (the same std,
    zero biases) reach the convs of the new AA layers, as when they were built inside the network."""
    torch.manual_seed(0)
    resnet = timm.create_model("aa_resnet50", layers=(1, 1, 1, 1), img_size=64)
    mnasnet = timm.create_model("aa_mnasnet_100", img_size=64)
    for model, zero_bias in ((resnet, False), (mnasnet, True)):
        for name, layer in augmented(model).items():
            for conv in (layer.conv, layer.qkv, layer.proj):
                fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
                assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.2), name
                if conv.bias is not None:
                    assert bool((conv.bias == 0).all()) == zero_bias, name
