"""Every recipe in configs/ parses (alone or composed with its base), names a registered model, and says what the
paper says."""

from pathlib import Path

import pytest
import timm
import yaml

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.training.cli import AACLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OVERRIDES = {"quickstart_baseline.yaml": "quickstart.yaml"}  # override file -> the recipe it is composed after
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in OVERRIDES)
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI warns when pytest's argv sits beside args


def resolved(capsys, *configs: Path) -> dict:
    args = [arg for config in configs for arg in ("--config", str(config))]
    with pytest.raises(SystemExit) as info:
        AACLI(args=[*args, "--print_config"])
    assert info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_names_a_registered_model(recipe, capsys):
    config = resolved(capsys, recipe)
    assert config["seed_everything"] == 0
    if config["model"]["class_path"] == "aa_lightning.tasks.ImageClassifier":
        name = config["model"]["init_args"]["model_name"]
        assert timm.is_model(name), f"{recipe.name}: {name} is not a timm model"


@pytest.mark.parametrize("ablation", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_overrides_compose_with_the_aa_resnet50_recipe(ablation, capsys):
    config = resolved(capsys, CONFIGS / "imagenet_aa_resnet50.yaml", ablation)
    expected = yaml.safe_load(ablation.read_text())["model"]["init_args"]["model_kwargs"]
    assert config["model"]["init_args"]["model_name"] == "aa_resnet50"
    assert config["model"]["init_args"]["model_kwargs"] == expected
    assert config["trainer"]["max_epochs"] == 100  # the rest of the recipe is untouched


@pytest.mark.parametrize("name, model", [("cifar100_wrn28_10", "wrn28_10"), ("cifar100_aa_wrn28_10", "aa_wrn28_10")])
def test_cifar_recipes_follow_the_paper(name, model, capsys):
    config = resolved(capsys, CONFIGS / f"{name}.yaml")
    init = config["model"]["init_args"]
    assert init["model_name"] == model and init["num_classes"] == 100
    assert init["optimizer"] == "sgd" and init["momentum"] == 0.9 and init["schedule"] == "cosine"
    assert init["base_lr"] == 0.2 and init["reference_batch_size"] == 256  # 0.2 x B / 256
    assert init["warmup_epochs"] == pytest.approx(0.05 * config["trainer"]["max_epochs"])  # 5% of the epochs
    data = config["data"]["init_args"]
    assert config["data"]["class_path"].endswith("CIFAR100DataModule") and data["pad"] == 4 and data["hflip"]


@pytest.mark.parametrize("depth", ["34", "50", "101"])
def test_imagenet_recipes_follow_the_standard_resnet_recipe(depth, capsys):
    for model in (f"resnet{depth}", f"aa_resnet{depth}"):
        config = resolved(capsys, CONFIGS / f"imagenet_{model}.yaml")
        init = config["model"]["init_args"]
        assert init["model_name"] == model and init["num_classes"] == 1000
        assert (init["base_lr"], init["reference_batch_size"], init["weight_decay"], init["warmup_epochs"]) == (
            0.1,
            256,
            1e-4,
            5,
        )
        data = config["data"]["init_args"]
        assert (data["train_size"], data["resize_size"], data["eval_size"]) == (224, 256, 224)


def test_quickstart_baseline_is_the_same_run_without_attention(capsys):
    aa = resolved(capsys, CONFIGS / "quickstart.yaml")
    baseline = resolved(capsys, CONFIGS / "quickstart.yaml", CONFIGS / "quickstart_baseline.yaml")
    assert baseline["model"]["init_args"]["model_name"] == "wrn28_10"
    kwargs = aa["model"]["init_args"]["model_kwargs"]
    assert baseline["model"]["init_args"]["model_kwargs"] == {
        k: v for k, v in kwargs.items() if not k.startswith("aa_")
    }
    assert baseline["data"] == aa["data"] and baseline["seed_everything"] == aa["seed_everything"]
    assert not baseline["trainer"]["callbacks"] and aa["trainer"]["callbacks"][0]["class_path"].endswith(
        "AttentionMapLogger"
    )
