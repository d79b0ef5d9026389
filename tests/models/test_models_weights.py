"""No published weights: pretrained=True fails clearly; local files (timm's pretrained_cfg_overlay,
aa_lightning.models.load_checkpoint) load, resample relative tables, and reject other models."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file

import aa_lightning  # noqa: F401
from aa_lightning.models import NoPretrainedWeightsError, load_checkpoint
from aa_lightning.tasks import ImageClassifier

SMALL = dict(img_size=32, num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["aa_resnet50", "aa_wrn28_10", "wrn28_10", "aa_mnasnet_100", "semnasnet_125"])
def test_pretrained_without_weights_fails_with_instructions(name):
    with pytest.raises(NoPretrainedWeightsError) as err:
        timm.create_model(name, pretrained=True)
    message = str(err.value)
    assert f"no pretrained weights are published for '{name}'" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "aa_lightning.models.load_checkpoint" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_through_timm_pretrained_cfg_overlay(tmp_path, suffix):
    source = timm.create_model("aa_resnet26", **SMALL)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = timm.create_model(
        "aa_resnet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **SMALL
    )
    assert same_weights(source, loaded)


def lightning_checkpoint(path, model_name: str, model_kwargs: dict, num_classes: int = 5) -> ImageClassifier:
    """A real checkpoint of this project's ImageClassifier, written by Lightning's Trainer."""
    module = ImageClassifier(model_name, num_classes=num_classes, model_kwargs=model_kwargs)
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return module


def test_load_checkpoint_of_a_lightning_run(tmp_path):
    path = tmp_path / "last.ckpt"
    module = lightning_checkpoint(path, "aa_resnet26", {"img_size": 32})
    model = timm.create_model("aa_resnet26", **SMALL)
    assert load_checkpoint(model, path) is model
    assert same_weights(module.model, model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module.model.eval()(x), model.eval()(x))
    # timm's own file loading takes the same .ckpt (the 'model.' prefix is stripped by the filter)
    via_timm = timm.create_model(
        "aa_resnet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **SMALL
    )
    assert same_weights(module.model, via_timm)
    headless = timm.create_model("aa_resnet26", img_size=32, num_classes=0)
    load_checkpoint(headless, path)  # the classifier is skipped
    assert torch.equal(headless.layer4[0].conv2.qkv.weight, module.model.layer4[0].conv2.qkv.weight)


def test_load_checkpoint_of_another_model_names_both(tmp_path):
    path = tmp_path / "wrn.ckpt"
    lightning_checkpoint(path, "aa_wrn28_10", {"img_size": 8, "aa_heads": 4})
    model = timm.create_model("aa_resnet26", **SMALL)
    with pytest.raises(ValueError, match=r"wrn.ckpt is a checkpoint of 'aa_wrn28_10', not of 'aa_resnet26'.*aa_heads"):
        load_checkpoint(model, path)


def test_load_checkpoint_with_other_settings_names_the_differences(tmp_path):
    path = tmp_path / "kv.ckpt"
    lightning_checkpoint(path, "aa_resnet26", {"img_size": 32, "aa_k": 1.0, "aa_v": 1.0})
    with pytest.raises(
        ValueError,
        match=r"'aa_resnet26' with \{.*'aa_k': 1.0.*\}\) does not fit the model 'aa_resnet26'.*shape mismatches"
        r".*timm.create_model\('aa_resnet26', \*\*\{",
    ):
        load_checkpoint(timm.create_model("aa_resnet26", **SMALL), path)
    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("resnet26", num_classes=5).state_dict(), plain)
    with pytest.raises(ValueError, match=r"the checkpoint's model\) does not fit the model 'aa_resnet26'.*missing"):
        load_checkpoint(timm.create_model("aa_resnet26", **SMALL), plain)
    # strict=False: a plain ResNet's weights fill every non-augmented layer (the keys line up)
    resnet = torch.load(plain, weights_only=True)
    partial = load_checkpoint(timm.create_model("aa_resnet26", **SMALL), plain, strict=False)
    own = partial.state_dict()
    loaded = [k for k in own if k in resnet]
    assert all(torch.equal(own[k], resnet[k]) for k in loaded)
    assert sorted(set(own) - set(loaded)) == sorted(
        k for k in own if ".conv2." in k and k.startswith(("layer2", "layer3", "layer4"))
    )
    with pytest.raises(ValueError, match="shape mismatches"):  # strict=False still refuses wrong shapes
        load_checkpoint(timm.create_model("aa_resnet26", img_size=32, num_classes=7), plain, strict=False)


def test_relative_tables_are_resampled_to_the_models_img_size(tmp_path):
    source = timm.create_model("aa_resnet26", img_size=64, num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = load_checkpoint(timm.create_model("aa_resnet26", img_size=(32, 48), num_classes=5), path)
    old, new = source.layer2[0].conv2, model.layer2[0].conv2
    assert old.rel_h.shape[0] == 2 * 8 - 1 and new.rel_h.shape[0] == 2 * 4 - 1 and new.rel_w.shape[0] == 2 * 6 - 1
    for before, after in ((old.rel_h, new.rel_h), (old.rel_w, new.rel_w)):
        # linear resampling over the whole offset range keeps the extreme offsets and offset 0
        for row_before, row_after in ((0, 0), (-1, -1), (before.shape[0] // 2, after.shape[0] // 2)):
            assert torch.allclose(before[row_before], after[row_after])


def test_load_checkpoint_reads_without_unpickling_code(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": timm.create_model("aa_resnet26", **SMALL).state_dict(), "extra": pl.Trainer}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint(timm.create_model("aa_resnet26", **SMALL), path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(timm.create_model("aa_resnet26", **SMALL), tmp_path / "missing.ckpt")


def test_one_reader_for_lightning_timm_ema_ddp_and_safetensors_files(tmp_path):
    from aa_lightning.models.weights import read_checkpoint

    source = timm.create_model("aa_resnet26", **SMALL)
    state = source.state_dict()
    files = {
        "lightning.ckpt": {
            "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "criterion.weight": torch.ones(5)},
            "hyper_parameters": {"model_name": "aa_resnet26", "model_kwargs": {"img_size": 32}},
        },
        "timm_ema.pth": {"state_dict_ema": {f"module.{k}": v for k, v in state.items()}, "arch": "aa_resnet26"},
        "torchvision.pth": {"model": state, "epoch": 3},
        "plain.pt": state,
    }
    for name, contents in files.items():
        torch.save(contents, tmp_path / name)
    save_file(state, str(tmp_path / "weights.safetensors"))
    for name, model_name in [
        ("lightning.ckpt", "aa_resnet26"),
        ("timm_ema.pth", "aa_resnet26"),
        ("torchvision.pth", None),
        ("plain.pt", None),
        ("weights.safetensors", None),
    ]:
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint.state_dict.keys() == state.keys(), name
        assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in state.items()), name
        assert checkpoint.model_name == model_name, name
        assert same_weights(load_checkpoint(timm.create_model("aa_resnet26", **SMALL), checkpoint), source), name
    assert read_checkpoint(tmp_path / "lightning.ckpt").model_kwargs == {"img_size": 32}
    torch.save({"state_dict": {"model.fc.weight": "not a tensor"}}, tmp_path / "strings.ckpt")
    with pytest.raises(ValueError, match=r"strings.ckpt: holds no state dict"):
        read_checkpoint(tmp_path / "strings.ckpt")
