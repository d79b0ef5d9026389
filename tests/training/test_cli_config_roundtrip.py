"""One parser: ``model_kwargs`` / ``backbone_kwargs`` merged over their sources by the parser itself, so what
``--print_config`` prints, what the run saves as ``config.yaml`` and what it builds agree, and a printed config
reruns to the same model (issue 21, goal 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.cli_helpers import REPO

from aa_lightning.training.cli import AACLI, main

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = REPO / "configs" / "quickstart.yaml"
QUICKSTART_KWARGS = yaml.safe_load(QUICKSTART.read_text())["model"]["init_args"]["model_kwargs"]
QUICKSTART_DETECTION = REPO / "configs" / "quickstart_detection.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI warns when pytest's argv sits beside args


def printed_config(capsys, *args: str) -> str:
    """What ``train.py *args --print_config`` prints (in-process)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        AACLI(args=[*args, "--print_config"])
    assert info.value.code in (None, 0)
    return capsys.readouterr().out


def parameters(cli: AACLI) -> int:
    return sum(p.numel() for p in cli.model.parameters())


def small_quickstart(tmp_path: Path) -> list[str]:
    """The quickstart recipe on a few images, one training step, no test: the model is the recipe's."""
    return [
        "--config",
        str(QUICKSTART),
        "--data.init_args.data_dir",
        str(tmp_path / "data"),
        "--data.init_args.train_size",
        "48",
        "--data.init_args.test_size",
        "10",
        "--data.init_args.val_split",
        "16",
        "--data.init_args.batch_size",
        "8",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--image_grid.num_images",
        "0",
        "--test_ckpt_path",
        "null",
        "--runs_dir",
        str(tmp_path / "runs"),
    ]


def test_a_printed_config_with_a_kwargs_override_reruns_to_the_same_model(tmp_path, capsys):
    """The issue's new user: quickstart + ``--model.init_args.model_kwargs '{aa_k: 0.3}'``, printed, rerun with
    ``--config`` of the printed file: the same 0.30M AA-WRN-10-2 (not a 36.4M WRN-28-10), the same hparams; the
    run saves the config it printed, and that file reruns to the same model too."""
    args = [*small_quickstart(tmp_path), "--model.init_args.model_kwargs", "{aa_k: 0.3}"]
    merged = {**QUICKSTART_KWARGS, "aa_k": 0.3}

    text = printed_config(capsys, *args)
    printed = yaml.safe_load(text)
    assert printed["model"]["init_args"]["model_name"] == "aa_wrn28_10"
    assert printed["model"]["init_args"]["model_kwargs"] == merged
    my_yaml = tmp_path / "my.yaml"
    my_yaml.write_text(text)

    direct = AACLI(args=args)
    rerun = AACLI(args=["--config", str(my_yaml)])
    assert dict(direct.model.hparams.model_kwargs) == merged
    assert dict(rerun.model.hparams) == dict(direct.model.hparams)
    assert parameters(rerun) == parameters(direct)
    assert 250_000 < parameters(rerun) < 350_000  # the quickstart's AA-WRN-10-2 (0.30M)

    main(["--config", str(my_yaml), "--run_name", "rerun"])
    saved_path = tmp_path / "runs" / "rerun" / "version_0" / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    assert saved["model"] == printed["model"]
    assert saved["data"] == printed["data"]
    assert parameters(AACLI(args=["--config", str(saved_path)])) == parameters(direct)


def test_override_files_and_dotted_keys_merge_into_the_printed_config(capsys):
    """A second --config and a dotted key add to the recipe's kwargs in the printed config; a source that names
    another model_name starts from its own kwargs (none: {})."""
    kv050 = REPO / "configs" / "ablations" / "aa_resnet50_kv050.yaml"
    config = yaml.safe_load(printed_config(capsys, "--config", str(QUICKSTART), "--config", str(kv050)))
    assert config["model"]["init_args"]["model_kwargs"] == {**QUICKSTART_KWARGS, "aa_k": 0.5, "aa_v": 0.5}

    config = yaml.safe_load(printed_config(capsys, "--config", str(QUICKSTART), "--model.model_kwargs.aa_heads", "4"))
    assert config["model"]["init_args"]["model_kwargs"] == {**QUICKSTART_KWARGS, "aa_heads": 4}

    config = yaml.safe_load(
        printed_config(
            capsys, "--config", str(QUICKSTART), "--model.model_name", "wrn28_10", "--model.model_kwargs", "{depth: 10}"
        )
    )
    assert config["model"]["init_args"]["model_name"] == "wrn28_10"
    assert config["model"]["init_args"]["model_kwargs"] == {"depth": 10}

    config = yaml.safe_load(printed_config(capsys, "--config", str(QUICKSTART), "--model.model_name", "resnet10t"))
    assert config["model"]["init_args"]["model_kwargs"] == {}

    # the same model named again keeps merging
    config = yaml.safe_load(
        printed_config(
            capsys, "--config", str(QUICKSTART), "--model.model_name", "aa_wrn28_10", "--model.model_kwargs={aa_v: 0.4}"
        )
    )
    assert config["model"]["init_args"]["model_kwargs"] == {**QUICKSTART_KWARGS, "aa_v": 0.4}


def test_backbone_kwargs_merge_and_another_backbone_starts_afresh(capsys):
    recipe = yaml.safe_load(QUICKSTART_DETECTION.read_text())["model"]["init_args"]["backbone_kwargs"]
    config = yaml.safe_load(
        printed_config(capsys, "--config", str(QUICKSTART_DETECTION), "--model.backbone_kwargs", "{aa_heads: 2}")
    )
    assert config["model"]["init_args"]["backbone_kwargs"] == {**recipe, "aa_heads": 2}
    config = yaml.safe_load(
        printed_config(
            capsys,
            "--config",
            str(QUICKSTART_DETECTION),
            "--model.backbone",
            "resnet18",
            "--model.backbone_kwargs",
            "{channels: [32, 64, 128, 256], stem_width: 32}",
        )
    )
    assert config["model"]["init_args"]["backbone"] == "resnet18"
    assert config["model"]["init_args"]["backbone_kwargs"] == {"channels": [32, 64, 128, 256], "stem_width": 32}
