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


# -- the modern recipes (issue 23) --------------------------------------------------------------------------------
RSB_ROWS = {  # arXiv 2110.00476 Table 1: epochs, train size, LAMB lr, weight decay, mixup alpha, RandAugment, drop path
    "a1": (600, 224, 5e-3, 0.01, 0.2, 0.05),
    "a2": (300, 224, 5e-3, 0.02, 0.1, 0.05),
    "a3": (100, 160, 8e-3, 0.02, 0.1, 0.0),
}
MODERN = sorted(
    [p for p in CONFIGS.glob("imagenet_*_a[123].yaml")]
    + [p for p in CONFIGS.glob("imagenet_*mnasnet_*.yaml")]
    + [p for p in CONFIGS.glob("cifar100_*_autoaugment.yaml")]
    + [CONFIGS / "quickstart_modern.yaml"]
)


def without_model_name(config: dict) -> dict:
    config = yaml.safe_load(yaml.safe_dump(config))
    del config["model"]["init_args"]["model_name"]
    return config


def test_every_modern_recipe_exists():
    names = {p.stem for p in MODERN}
    expected = {f"imagenet_{m}_{row}" for m in ("resnet50", "aa_resnet50") for row in RSB_ROWS}
    expected |= {f"imagenet_{aa}mnasnet_{w}" for aa in ("", "aa_") for w in ("075", "100", "140")}
    expected |= {"cifar100_wrn28_10_autoaugment", "cifar100_aa_wrn28_10_autoaugment", "quickstart_modern"}
    assert names == expected


@pytest.mark.parametrize("row", sorted(RSB_ROWS))
def test_resnet_strikes_back_recipes_follow_table_1_and_differ_only_in_the_model(row, capsys):
    epochs, train_size, lr, wd, mixup, drop_path = RSB_ROWS[row]
    baseline = resolved(capsys, CONFIGS / f"imagenet_resnet50_{row}.yaml")
    aa = resolved(capsys, CONFIGS / f"imagenet_aa_resnet50_{row}.yaml")
    assert baseline["model"]["init_args"]["model_name"] == "resnet50"
    assert aa["model"]["init_args"]["model_name"] == "aa_resnet50"
    assert without_model_name(baseline) == without_model_name(aa)
    init, data = aa["model"]["init_args"], aa["data"]["init_args"]
    assert aa["trainer"]["max_epochs"] == epochs
    assert (init["optimizer"], init["base_lr"], init["reference_batch_size"], init["weight_decay"]) == (
        "lamb",
        lr,
        2048,
        wd,
    )
    assert (init["schedule"], init["warmup_epochs"], init["loss"], init["bce_target_thresh"]) == (
        "cosine",
        5,
        "bce",
        0.2,
    )
    assert init["label_smoothing"] == 0.0 and init["model_kwargs"].get("drop_path_rate", 0.0) == drop_path
    mixing = init["mixing"]
    assert (mixing["mixup_alpha"], mixing["cutmix_alpha"], mixing["label_smoothing"]) == (mixup, 1.0, 0.0)
    assert (data["train_size"], data["eval_size"], data["resize_size"]) == (train_size, 224, 235)  # crop 0.95
    assert not any("EMA" in cb["class_path"] for cb in aa["trainer"]["callbacks"])  # Table 1: no EMA


@pytest.mark.parametrize("width", ["075", "100", "140"])
def test_mnasnet_recipes_follow_timms_efficientnet_hyper_parameters(width, capsys):
    baseline = resolved(capsys, CONFIGS / f"imagenet_mnasnet_{width}.yaml")
    aa = resolved(capsys, CONFIGS / f"imagenet_aa_mnasnet_{width}.yaml")
    assert without_model_name(baseline) == without_model_name(aa)
    init = aa["model"]["init_args"]
    assert (init["optimizer"], init["optimizer_kwargs"], init["base_lr"], init["reference_batch_size"]) == (
        "rmsproptf",
        {"alpha": 0.9, "eps": 0.001},
        0.016,
        256,
    )
    assert (init["schedule"], init["lr_decay_epochs"], init["lr_gamma"], init["weight_decay"]) == (
        "exponential_step",
        2.4,
        0.97,
        1e-5,
    )
    assert init["model_kwargs"] == {"drop_rate": 0.2, "drop_path_rate": 0.2}
    (ema,) = [cb for cb in aa["trainer"]["callbacks"] if cb["class_path"].endswith("ModelEMA")]
    assert ema["init_args"]["decay"] == 0.9999


def test_cifar_autoaugment_recipes_differ_only_in_the_model(capsys):
    baseline = resolved(capsys, CONFIGS / "cifar100_wrn28_10_autoaugment.yaml")
    aa = resolved(capsys, CONFIGS / "cifar100_aa_wrn28_10_autoaugment.yaml")
    assert without_model_name(baseline) == without_model_name(aa)
    assert aa["trainer"]["max_epochs"] == 200 and aa["model"]["init_args"]["warmup_epochs"] == 10


def _one_step_size(config: dict) -> int:
    return 32 if "CIFAR" in config["data"]["class_path"] else 64


HEAVY = ("resnet50", "wrn28_10_autoaugment")  # 25-36M parameters: 3-8 s a step on 2 shared cores


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(p, marks=pytest.mark.slow) if any(h in p.stem for h in HEAVY) else p for p in MODERN],
    ids=[p.stem for p in MODERN],
)
def test_modern_recipe_builds_its_model_and_runs_one_training_step(recipe, capsys, tmp_path):
    """The recipe's task (its optimizer, loss, mixing, schedule) and its EMA callback, one optimizer step on random
    images of a small size (the data sets are not here)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from aa_lightning.callbacks import ModelEMA
    from aa_lightning.tasks import ImageClassifier

    config = resolved(capsys, recipe)
    init = dict(config["model"]["init_args"])
    model = ImageClassifier(**init)
    size, classes = _one_step_size(config), init["num_classes"]
    images, labels = torch.randn(4, 3, size, size), torch.randint(0, classes, (4,))
    callbacks = [
        ModelEMA(**cb.get("init_args", {})) for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("EMA")
    ]
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        gradient_clip_val=config["trainer"].get("gradient_clip_val"),
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=4))
    assert trainer.global_step == 1
    state = trainer.optimizers[0].state  # the optimizer stepped (an EMA that starts later puts the start weights back)
    assert state and all(torch.isfinite(t).all() for s in state.values() for t in s.values() if torch.is_tensor(t))


def test_a_printed_modern_config_reruns_to_the_same_settings(capsys, tmp_path):
    """--print_config writes the typed mixing settings and the EMA callback so that the file parses to the same."""
    first = resolved(capsys, CONFIGS / "quickstart_modern.yaml")
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(first))
    again = resolved(capsys, path)
    assert again == first
    assert first["model"]["init_args"]["mixing"]["cutmix_alpha"] == 1.0
