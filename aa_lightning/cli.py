"""The one entry point of every task: ``python train.py --config configs/<recipe>.yaml``.

LightningCLI with the model and the data chosen by ``class_path`` in the recipe (subclass modes
on; dotted overrides such as ``--model.model_name aa_resnet50`` or ``--data.batch_size 64`` reach
``init_args``). It fits, then tests one checkpoint (``--test_ckpt_path best``, ``last``, a path, or
``null`` to skip), then prints a summary. Beyond the Trainer's own options it adds:

- ``--ckpt_path``: resume; ``last`` finds the newest ``<runs_dir>/<run_name>/version_N/checkpoints/last.ckpt``
  and continues logging into that ``version_N`` (a path inside such a folder does the same).
- ``--run_name`` / ``--runs_dir``: TensorBoard logs under ``<runs_dir>/<run_name>/version_N/``
  (default name: the last ``--config`` file's stem, else the model name).
- ``--checkpoint.*``: the ModelCheckpoint (best and last); its ``monitor`` defaults to the task's
  metric (``checkpoint_monitor`` of the LightningModule class, e.g. ``val/top1``, max).
- ``--image_grid.*``: the grid of augmented training images logged at the start.

``trainer.sync_batchnorm`` needs CUDA (torch's SyncBatchNorm is GPU-only): on CPU it is switched
off with a warning, so a multi-GPU recipe still runs on a laptop.
"""
from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's use of jsonargparse, not the user's

import torch  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402

import aa_lightning  # noqa: E402,F401  (registers the AA models with timm)
from aa_lightning.callbacks import RunSummary, TrainingImageGrid  # noqa: E402

_VERSION_DIR = re.compile(r"^version_(\d+)$")

# Library noise that a user can do nothing about: Lightning's own use of a deprecated torch
# pytree API, and its advertisements for its cloud products (printed at every start).
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropTips())


def _import_class(class_path: str) -> Optional[type]:
    module_name, _, name = class_path.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[name])
        return getattr(module, name)
    except (ImportError, AttributeError, ValueError):
        return None


def find_last_checkpoint(runs_dir: str, run_name: str) -> tuple[Path, int]:
    """The newest ``<runs_dir>/<run_name>/version_N/checkpoints/last.ckpt`` and its N."""
    root = Path(runs_dir) / run_name
    found = []
    for folder in root.glob("version_*"):
        match = _VERSION_DIR.match(folder.name)
        if match and (folder / "checkpoints" / "last.ckpt").is_file():
            found.append((int(match.group(1)), folder / "checkpoints" / "last.ckpt"))
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt found; "
            "pass --run_name of the run to resume (or a checkpoint path)"
        )
    version, path = max(found)
    return path, version


class AACLI(LightningCLI):
    """LightningCLI for aa-lightning recipes: fit, test, summary (see the module docstring)."""

    def __init__(self, args: Any = None, start_time: Optional[float] = None) -> None:
        self.start_time = time.perf_counter() if start_time is None else start_time
        self.resume_version: Optional[int] = None
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the tasks own their optimizer and schedule
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
            parser_kwargs={
                "description": "Train and test an aa-lightning recipe: python train.py --config configs/<recipe>.yaml",
                "allow_abbrev": False,  # a misspelt key fails instead of being completed
            },
            args=args,
            run=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume training: 'last' (newest last.ckpt of --run_name) or a checkpoint path.")
        parser.add_argument("--test_ckpt_path", type=Optional[str], default="best",
                            help="Checkpoint tested after fitting: 'best', 'last', a path, or null to skip the test.")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="Logs go to <runs_dir>/<run_name>/version_N (default: the last --config file's name).")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Root folder of the TensorBoard runs.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1, "checkpoint.filename": "best-{epoch}-{step}"})
        parser.add_lightning_class_args(TrainingImageGrid, "image_grid")

    # -- resolution of the run's defaults -------------------------------------------------------------
    def _run_name(self) -> str:
        if self.config.get("run_name"):
            return self.config.run_name
        configs = self.config.get("config") or []
        if configs:
            return Path(str(configs[-1])).stem
        model_args = self.config.model.get("init_args") or Namespace()
        return str(model_args.get("model_name") or self.config.model.class_path.rpartition(".")[2])

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        cfg.run_name = self._run_name()
        # the task's own metric for ModelCheckpoint unless the config names one
        if cfg.checkpoint.get("monitor") is None:
            task = _import_class(cfg.model.class_path)
            monitor = getattr(task, "checkpoint_monitor", None)
            if monitor is not None:
                cfg.checkpoint.monitor, cfg.checkpoint.mode = monitor
        # resuming: find 'last', and keep logging into the run's version folder
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            path, self.resume_version = find_last_checkpoint(cfg.runs_dir, cfg.run_name)
            cfg.ckpt_path = str(path)
        elif ckpt_path:
            path = Path(ckpt_path)
            if not path.is_file():
                raise FileNotFoundError(f"--ckpt_path: no checkpoint at {path}")
            match = _VERSION_DIR.match(path.parent.parent.name)
            if path.parent.name == "checkpoints" and match and path.parent.parent.parent.resolve() == (Path(cfg.runs_dir) / cfg.run_name).resolve():
                self.resume_version = int(match.group(1))
        # SyncBatchNorm is GPU-only in torch
        trainer_cfg = cfg.trainer
        on_cuda = torch.cuda.is_available() and str(trainer_cfg.get("accelerator")) in ("auto", "gpu", "cuda")
        if trainer_cfg.get("sync_batchnorm") and not on_cuda:
            rank_zero_warn(
                "trainer.sync_batchnorm is ignored on this run: torch.nn.SyncBatchNorm needs CUDA GPUs, and this run is on "
                f"accelerator={trainer_cfg.get('accelerator')!r} without CUDA; each process normalizes over its own batch."
            )
            trainer_cfg.sync_batchnorm = False

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        logger = self.config.trainer.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = TensorBoardLogger(save_dir=self.config.runs_dir, name=self.config.run_name, version=self.resume_version)
        self.run_summary = RunSummary()
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        kwargs["callbacks"] = callbacks + [self.run_summary]
        return super().instantiate_trainer(**kwargs)

    # -- the job ---------------------------------------------------------------------------------------
    def fit_and_test(self) -> Optional[dict[str, float]]:
        """``trainer.fit`` (resuming from ``ckpt_path``), then ``trainer.test`` of ``test_ckpt_path``; prints the summary."""
        cfg = self.config
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=cfg.ckpt_path)
        results = None
        tested = cfg.test_ckpt_path
        ckpt = self.trainer.checkpoint_callback
        checkpoints = {"best": ckpt.best_model_path, "last": ckpt.last_model_path} if ckpt is not None else {}
        if tested and not self.trainer.interrupted:
            if tested == "best" and not checkpoints.get("best"):
                rank_zero_warn("no best checkpoint (no monitored metric was logged): testing the last weights instead")
                tested = None
            output = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=tested)
            results = output[0] if output else {}
        if self.trainer.is_global_zero:
            report = self.run_summary.report(
                self.trainer, results, tested or "final", checkpoints, time.perf_counter() - self.start_time
            )
            print(report, flush=True)
        return results


def main(args: Any = None, start_time: Optional[float] = None) -> Optional[dict[str, float]]:
    """Parse the recipe and overrides (``args`` or ``sys.argv``), fit, test, print the summary.

    ``start_time``: ``time.perf_counter()`` at process start, so the summary's wall time counts imports.
    """
    cli = AACLI(args=args, start_time=start_time)
    return cli.fit_and_test()


if __name__ == "__main__":  # pragma: no cover
    main()
