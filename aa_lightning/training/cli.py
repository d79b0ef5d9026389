"""The one entry point of every task: ``python train.py --config configs/<recipe>.yaml``.

LightningCLI with the model and the data chosen by ``class_path`` in the recipe (subclass modes
on; dotted overrides such as ``--model.model_name aa_resnet50`` or ``--data.batch_size 64`` reach
``init_args``). It fits, then tests one checkpoint (``--test_ckpt_path best``, ``last``, a path, or
``null`` to skip), then prints a summary. Beyond the Trainer's own options it adds:

- ``--ckpt_path``: resume; ``last`` finds the newest intact checkpoint of
  ``<runs_dir>/<run_name>/version_*/checkpoints/`` (``last.ckpt`` first; a file that does not load is
  skipped with a warning naming it) and continues logging into that ``version_N`` (a path inside such a
  folder does the same). The checkpoint is loaded and checked before anything is written to the run folder:
  its zip records' CRC-32, finite weights and optimizer state, the model (names and shapes of every tensor) and
  the settings its schedule and loader position were built from (:func:`check_resume_settings`: another batch
  size, world size, base_lr, max_epochs or num_workers is refused, naming it). Until the resume has succeeded the
  run writes nothing to its folder (:class:`ResumeGate`); the temporary files of killed saves there are removed.
- A new run claims its ``version_N`` folder exclusively (:func:`claim_version`): runs started together get their own.
- SIGTERM / SIGINT at any moment exit 143 / 130; a ``ValueError`` of this project's classes while the model or the
  data is built is one ``error:`` line (``AA_LIGHTNING_DEBUG=1``: the traceback); a recipe with a duplicate key is
  an error naming the file and the key.
- ``--checkpoint_every_n_steps``: ``last.ckpt`` is written every N optimizer steps and at every epoch end
  (:class:`~aa_lightning.training.faults.LastCheckpoint`), so a killed run resumes where it was (docs/training.md,
  "Faults and resuming"). All checkpoints are written atomically; SIGTERM / SIGINT save ``last.ckpt`` and exit
  143 / 130; a non-finite training loss stops the run naming the step and the last good checkpoint.
- ``model_kwargs`` / ``backbone_kwargs`` given in several places (recipe, a second ``--config``, the command line)
  are merged key by key by the parser itself (:class:`AAArgumentParser`), later sources winning; a source that
  names another ``model_name`` / ``backbone`` starts from the kwargs it gives itself. ``--print_config`` and the
  run's ``config.yaml`` hold the merged dict, so either reruns to the same model.
- ``--run_name`` / ``--runs_dir``: TensorBoard logs under ``<runs_dir>/<run_name>/version_N/``
  (default name: the last ``--config`` file's stem, else the model name).
- ``--checkpoint.*``: the best-checkpoint ModelCheckpoint; its ``monitor`` defaults to the task's
  metric (``checkpoint_monitor`` of the LightningModule class, e.g. ``val/top1``, max).
- ``--image_grid.*``: the grid of augmented training images logged at the start.

``trainer.sync_batchnorm`` needs CUDA (torch's SyncBatchNorm is GPU-only): on CPU it is switched
off with a warning, so a multi-GPU recipe still runs on a laptop.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import aa_lightning  # noqa: F401  (registers the AA models with timm)
from aa_lightning.callbacks import RunSummary, TrainingImageGrid
from aa_lightning.data.streaming import ObjectStoreError
from aa_lightning.models.weights import (
    TorchFileError,
    describe_differences,
    load_torch_file,
    non_finite_tensors,
    state_dict_differences,
)
from aa_lightning.training.faults import (
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    NonFiniteLossError,
    NonFiniteLossGuard,
    RunInterrupted,
    StopAnywhere,
    StopOnSignal,
)

_VERSION_DIR = re.compile(r"^version_(\d+)$")

# Library noise that a user can do nothing about: Lightning's own use of a deprecated torch
# pytree API, and its advertisements for its cloud products (printed at every start).
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropTips())


def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[name])
        return getattr(module, name)
    except (ImportError, AttributeError, ValueError):
        return None


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing, unreadable or does not fit the model (one line, naming the file)."""


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint (memory-mapped, on the CPU), or a :class:`CheckpointError`
    naming the file and what is wrong with it (empty, truncated, not a checkpoint)."""
    try:
        checkpoint = load_torch_file(path, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"--ckpt_path: no checkpoint file at {path}") from None
    except TorchFileError as err:
        size = path.stat().st_size
        if err.kind == "empty":
            raise CheckpointError(
                f"--ckpt_path: {path} is empty (0 bytes): not a checkpoint (a write that was killed?)"
            ) from None
        if err.kind == "checksum":
            raise CheckpointError(
                f"--ckpt_path: {path} fails its checksum (the CRC-32 of record {err.detail!r} does not match its "
                "bytes): the file was damaged after it was written; resume from another checkpoint"
            ) from None
        raise CheckpointError(
            f"--ckpt_path: {path} ({size} bytes) is not a loadable checkpoint (truncated or not a checkpoint): "
            f"{err.detail}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"--ckpt_path: {path} is not a Lightning checkpoint (no 'state_dict' in it)")
    non_finite = non_finite_tensors(checkpoint["state_dict"], "state_dict")
    non_finite += non_finite_tensors(checkpoint.get("optimizer_states") or [], "optimizer_states")
    if non_finite:
        more = f" and {len(non_finite) - 1} more tensors" if len(non_finite) > 1 else ""
        raise CheckpointError(
            f"--ckpt_path: {path} holds non-finite values: {non_finite[0]}{more}; a diverged or damaged state "
            "does not resume: resume from an earlier checkpoint"
        )
    return checkpoint


def run_checkpoints(runs_dir: str, run_name: str) -> list[tuple[int, Path]]:
    """Every ``<runs_dir>/<run_name>/version_N/checkpoints/*.ckpt`` as (N, path), the ones to try first first:
    newest version first; in it ``last.ckpt`` first, then the others newest first."""
    root = Path(runs_dir) / run_name
    found = []
    for folder in root.glob("version_*"):
        match = _VERSION_DIR.match(folder.name)
        if not match:
            continue
        for path in (folder / "checkpoints").glob("*.ckpt"):
            if path.is_file():
                found.append((int(match.group(1)), path.name == "last.ckpt", path.stat().st_mtime, path))
    found.sort(key=lambda item: item[:3], reverse=True)
    return [(version, path) for version, _, _, path in found]


def claim_version(root: Path) -> int:
    """Create ``root/version_N`` for a new run, N one above the highest existing version, and return N. The folder
    is created exclusively (``os.mkdir``): of runs started together, each gets its own N (a loser takes the next)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for m in (_VERSION_DIR.match(p.name) for p in root.iterdir()) if m]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{version}")
            return version
        except FileExistsError:
            version += 1


def find_last_checkpoint(runs_dir: str, run_name: str) -> tuple[Path, int, dict[str, Any]]:
    """The newest intact checkpoint of the run (see :func:`run_checkpoints`), its version N and its loaded
    content; every checkpoint tried that does not load gets a warning that names it."""
    root = Path(runs_dir) / run_name
    candidates = run_checkpoints(runs_dir, run_name)
    if not candidates:
        raise CheckpointError(
            f"--ckpt_path last: no checkpoint under {root}/version_*/checkpoints/; "
            "pass --run_name of the run to resume (or a checkpoint path)"
        )
    for version, path in candidates:
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as err:
            rank_zero_warn(f"{err}; trying the next newest checkpoint of {root}")
            continue
        if path.name != "last.ckpt" or path != candidates[0][1]:
            rank_zero_warn(f"--ckpt_path last: resuming from {path}, the newest intact checkpoint of {root}")
        return path, version, checkpoint
    raise CheckpointError(
        f"--ckpt_path last: none of the {len(candidates)} checkpoints under {root} loads (see the warnings above)"
    )


def check_checkpoint_fits(checkpoint: dict[str, Any], path: Path, model: torch.nn.Module) -> None:
    """A :class:`CheckpointError` naming both sides when ``checkpoint`` was trained with another model
    (``model_name`` / ``backbone`` / ``num_classes``) or holds other tensors or shapes than ``model``."""
    saved = checkpoint.get("hyper_parameters") or {}
    current = getattr(model, "hparams", {}) or {}
    for key in ("model_name", "backbone", "num_classes", "model_kwargs", "backbone_kwargs"):
        if key in saved and key in current and saved[key] != current[key]:
            if key.endswith("_kwargs") and not saved[key] and not current[key]:
                continue
            raise CheckpointError(
                f"--ckpt_path {path} was trained with model {key}={saved[key]!r}, but this run builds "
                f"{key}={current[key]!r}; resume with the checkpoint's own config "
                f"({path.parent.parent / 'config.yaml'}) or pass a matching checkpoint"
            )
    differences = state_dict_differences(model.state_dict(), checkpoint.get("state_dict") or {})
    if any(differences):
        raise CheckpointError(
            f"--ckpt_path {path} does not fit this run's model ({type(model).__name__}): "
            f"{describe_differences(*differences)}; resume with the checkpoint's own config "
            f"({path.parent.parent / 'config.yaml'}) or pass a matching checkpoint"
        )


#: the kwargs dicts merged over their sources, and the name whose change starts a source's dict afresh
MERGED_KWARGS = {"model_kwargs": "model_name", "backbone_kwargs": "backbone"}


#: the checkpoint key of the settings a resume must not change (:class:`RecordResumeSettings`)
RESUME_SETTINGS_KEY = "aa_lightning_resume_settings"
#: model keys the saved optimizer state and learning-rate schedule were built from
SCHEDULE_KEYS = (
    "optimizer",
    "base_lr",
    "reference_batch_size",
    "momentum",
    "nesterov",
    "betas",
    "weight_decay",
    "warmup_epochs",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "lr_milestone_epochs",
    "lr_milestone_steps",
    "lr_gamma",
    "optimizer_kwargs",
    "lr_decay_epochs",
)
_GLOBAL_BATCH = (
    "the global batch sets the peak learning rate and the steps per epoch, and the saved position inside the epoch "
    "counts the run's batches"
)
_LENGTH = "the learning-rate schedule was built for the run's length and would not stretch to another"
_WHY = {
    "data.batch_size": _GLOBAL_BATCH,
    "world size": _GLOBAL_BATCH,
    "trainer.accumulate_grad_batches": _GLOBAL_BATCH,
    "trainer.max_epochs": _LENGTH,
    "trainer.max_steps": _LENGTH,
    "trainer.limit_train_batches": "the schedule and the saved position count the run's batches per epoch",
    "data.num_workers": "the training loader's saved position is that of a loader with the run's number of worker "
    "processes",
}
_WHY_MODEL = "the saved optimizer state and learning-rate schedule hold the run's own value, which a resume would keep"


def _shown(value: Any) -> str:
    """A setting as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def resume_settings(config: Namespace, trainer: Trainer) -> dict[str, Any]:
    """The settings of this run that a resume must keep (recorded in every checkpoint; :func:`check_resume_settings`):
    the model's optimizer and schedule keys, ``data.batch_size`` / ``data.num_workers``, the trainer's length and
    accumulation, and the world size (devices x nodes)."""
    settings: dict[str, Any] = {}
    model_args = config.model.get("init_args") or Namespace()
    for key in SCHEDULE_KEYS:
        if key in model_args:
            settings[f"model.{key}"] = model_args[key]
    data_args = config.data.get("init_args") or Namespace()
    for key in ("batch_size", "num_workers"):
        if key in data_args:
            settings[f"data.{key}"] = data_args[key]
    for key in ("max_epochs", "max_steps", "accumulate_grad_batches", "limit_train_batches"):
        settings[f"trainer.{key}"] = config.trainer.get(key)
    settings["world size"] = trainer.world_size
    return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}


def check_resume_settings(checkpoint: dict[str, Any], path: Path, current: dict[str, Any]) -> None:
    """A :class:`CheckpointError` naming the first setting of ``current`` (:func:`resume_settings`) that differs from
    the one ``checkpoint`` was trained with, why it cannot change and how to continue. A checkpoint of an older
    version of this project (no recorded settings) is compared on its model hyper-parameters only."""
    saved = checkpoint.get(RESUME_SETTINGS_KEY)
    if not isinstance(saved, dict):
        hparams = checkpoint.get("hyper_parameters") or {}
        saved = {f"model.{key}": hparams[key] for key in SCHEDULE_KEYS if key in hparams}
        loops = checkpoint.get("loops") or {}
        loader_states = ((loops.get("fit_loop") or {}).get("state_dict") or {}).get("combined_loader") or []
        single_process = [isinstance(state, dict) and "_snapshot" not in state for state in loader_states]
        if single_process and all(single_process) and current.get("data.num_workers"):
            saved["data.num_workers"] = 0  # a loader without workers saved this position (torchdata's own state)
    for key, value in current.items():
        if key not in saved:
            continue
        old = list(saved[key]) if isinstance(saved[key], tuple) else saved[key]
        if old == value:
            continue
        if key == "world size":
            how = f"as many processes as before (--trainer.devices x --trainer.num_nodes = {old})"
        else:
            how = f"--{key} {_shown(old)}"
        raise CheckpointError(
            f"--ckpt_path {path}: this run sets {key} {_shown(value)} but the checkpoint's {_shown(old)}: "
            f"{_WHY.get(key, _WHY_MODEL)}. Resume with {how} (the run's config.yaml has its settings), or train with "
            "the new value as a new run (another --run_name)"
        )


#: a temporary file of :func:`aa_lightning.atomic_files.atomic_open` for a checkpoint (``.<name>.ckpt.<8 chars>.tmp``)
_KILLED_SAVE = re.compile(r"^\.(.+\.ckpt)\.[a-z0-9_]{8}\.tmp$")


def remove_killed_saves(folder: Path) -> list[Path]:
    """Remove the temporary files that checkpoint saves killed before their rename left in ``folder`` (only files of
    this project's own pattern, ``.<name>.ckpt.XXXXXXXX.tmp``; no links, nothing else); returns them."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if _KILLED_SAVE.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class RecordResumeSettings(Callback):
    """Writes the run's :func:`resume_settings` into every checkpoint."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RESUME_SETTINGS_KEY] = dict(self.settings)


class _HeldCalls:
    """What a held logger's ``experiment`` is: each call is recorded, to be made on the real one later."""

    def __init__(self, calls: list[tuple[str, tuple, dict]]) -> None:
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self._calls.append((f"experiment.{name}", args, kwargs))

        return record


class ResumeTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger that, with ``hold``, writes nothing (no events file, no hparams.yaml, nothing logged through
    ``experiment``) until :meth:`release`, when a resume has succeeded; a failed resume drops what it held."""

    def __init__(self, *args: Any, hold: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[tuple[str, tuple, dict]] | None = [] if hold else None

    @property
    def experiment(self) -> Any:
        if self._held is not None:
            return _HeldCalls(self._held)
        return super().experiment

    def _hold(self, name: str, *args: Any, **kwargs: Any) -> bool:
        if self._held is None:
            return False
        self._held.append((name, args, kwargs))
        return True

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        if not self._hold("log_hyperparams", *args, **kwargs):
            super().log_hyperparams(*args, **kwargs)

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        if not self._hold("log_metrics", *args, **kwargs):
            super().log_metrics(*args, **kwargs)

    def log_graph(self, *args: Any, **kwargs: Any) -> None:
        if not self._hold("log_graph", *args, **kwargs):
            super().log_graph(*args, **kwargs)

    def save(self) -> None:
        if not self._hold("save"):
            super().save()

    def finalize(self, status: str) -> None:
        if self._held is None:  # a held logger has written nothing: a failed resume leaves no trace
            super().finalize(status)

    def release(self) -> None:
        """Make the held calls, in order, and write directly from now on."""
        held, self._held = self._held, None
        for name, args, kwargs in held or []:
            if name.startswith("experiment."):
                getattr(self.experiment, name.partition(".")[2])(*args, **kwargs)
            else:
                getattr(self, name)(*args, **kwargs)


class ResumeSafeSaveConfig(SaveConfigCallback):
    """LightningCLI's config saver that, on a resumed fit, writes ``config.yaml`` once the resume has succeeded
    (:meth:`release`), not at setup: a resume that fails leaves the run's record as it was."""

    _pending: tuple[LightningModule, str] | None = None
    defer = False  # set by the CLI on a resume

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.defer and not self.already_saved:
            self._pending = (pl_module, stage)
            return
        super().setup(trainer, pl_module, stage)

    def release(self, trainer: Trainer) -> None:
        if self._pending is not None:
            pl_module, stage = self._pending
            self._pending = None
            super().setup(trainer, pl_module, stage)


class ResumeGate(Callback):
    """Releases what a resumed run holds back (the logger's writes, config.yaml) and removes the temporary files of
    killed saves in its checkpoint folder, once the resume has succeeded: at the start of training, after the
    checkpoint and the training loader's position are restored (or at the end of a fit that had nothing left)."""

    def __init__(self, logger: ResumeTensorBoardLogger | None, checkpoint_folder: Path | None) -> None:
        self.logger = logger
        self.checkpoint_folder = checkpoint_folder
        self.released = False

    def release(self, trainer: Trainer) -> None:
        if self.released:
            return
        self.released = True
        if self.logger is not None:
            self.logger.release()
        for callback in trainer.callbacks:
            if isinstance(callback, ResumeSafeSaveConfig):
                callback.release(trainer)
        if self.checkpoint_folder is not None and trainer.is_global_zero:
            for path in remove_killed_saves(self.checkpoint_folder):
                rank_zero_warn(f"removed {path}: the temporary file of a checkpoint save that was killed")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.release(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.release(trainer)


def _kwargs_dict(value: Any) -> dict[str, Any] | None:
    if isinstance(value, Namespace):
        return value.as_dict()
    return dict(value) if isinstance(value, dict) else None


def merge_kwargs_source(source: Namespace | dict[str, Any], previous: Namespace) -> Namespace | dict[str, Any]:
    """The init args of one source (a config file, a command-line value) with each :data:`MERGED_KWARGS` dict merged
    into the ``previous`` one, key by key, the source winning; a source that names another ``model_name`` /
    ``backbone`` than ``previous`` names keeps its own dict (none given: ``{}``). ``source`` itself is not changed."""
    merged = source.clone() if isinstance(source, Namespace) else dict(source)
    for kwargs_key, name_key in MERGED_KWARGS.items():
        before = _kwargs_dict(previous.get(kwargs_key))
        if before is None:
            continue
        name, previous_name = merged.get(name_key), previous.get(name_key)
        if name is not None and previous_name is not None and name != previous_name:  # another model: its own kwargs
            if kwargs_key not in merged:
                merged[kwargs_key] = {}
            continue
        given = _kwargs_dict(merged.get(kwargs_key))
        if given is not None:
            merged[kwargs_key] = {**before, **given}
    return merged


class AAArgumentParser(LightningArgumentParser):
    """The CLI's parser: ``model_kwargs`` / ``backbone_kwargs`` given in several places (recipe, a second
    ``--config``, the command line) are merged key by key by the parse itself (:func:`merge_kwargs_source`), so the
    parsed config, ``--print_config`` and the run's saved ``config.yaml`` hold the dict the model is built with.

    jsonargparse parses a subclass's ``init_args`` with a parser of this class, given the previous ``init_args`` as
    ``namespace``: a config file's or a nested value's through :meth:`parse_object`, a command-line
    ``--model.model_kwargs`` through :meth:`parse_args`; both merge with that previous value here."""

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Namespace:
        """jsonargparse's parse of a ``--config`` file; a file that is not valid YAML is named in the error (the
        loader's own message says ``<unicode string>``)."""
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            self.error(f"--config {path}: not valid YAML: {' '.join(str(err).split())}")
        except (OSError, ValueError):
            pass  # jsonargparse reports it
        return super().parse_path(path, *args, **kwargs)

    def parse_object(
        self,
        obj: Namespace | dict[str, Any],
        namespace: Namespace | None = None,
        env: bool | None = None,
        defaults: bool = True,
        **kwargs: Any,
    ) -> Namespace:
        if namespace is not None and isinstance(obj, (Namespace, dict)):
            obj = merge_kwargs_source(obj, namespace)
        return super().parse_object(obj, namespace, env=env, defaults=defaults, **kwargs)

    def parse_args(
        self,
        args: Sequence[str] | None = None,
        namespace: Namespace | None = None,
        env: bool | None = None,
        defaults: bool = True,
        **kwargs: Any,
    ) -> Namespace:
        previous = namespace.clone() if namespace is not None else None
        cfg = super().parse_args(args, namespace, env=env, defaults=defaults, **kwargs)
        if previous is None or not args:
            return cfg
        given = {}
        for arg in args:
            key = str(arg).partition("=")[0].removeprefix("--").removeprefix("init_args.")
            if key in MERGED_KWARGS or key in MERGED_KWARGS.values():
                given[key] = cfg.get(key)
        if given:
            merged = merge_kwargs_source(given, previous)
            for key in MERGED_KWARGS:
                if key in merged:
                    cfg[key] = merged[key]
        return cfg


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names one key twice (PyYAML would silently keep the last value)."""


_CONFIG_FILE: contextvars.ContextVar[str | None] = contextvars.ContextVar("aa_lightning_config_file", default=None)


def duplicate_yaml_key(text: str) -> tuple[str, int] | None:
    """The first key (by line) that appears twice in one mapping of the YAML ``text``, with its 1-based line;
    ``None`` when there is none or the text does not parse (the loader itself reports that)."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    found: list[tuple[int, str]] = []
    stack: list[Any] = [node for node in documents if node is not None]
    seen_nodes: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in keys:
                        found.append((key_node.start_mark.line + 1, key_node.value))
                    keys.add(key_node.value)
                stack += [key_node, value_node]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    if not found:
        return None
    line, key = min(found)
    return key, line


def strict_yaml_loader(base: Any) -> Any:
    """jsonargparse's YAML loader ``base`` that first refuses a duplicate key (:class:`DuplicateKeyError`, naming the
    key, its line and the ``--config`` file being parsed)."""

    def load(value: Any) -> Any:
        if isinstance(value, str):
            duplicate = duplicate_yaml_key(value)
            if duplicate is not None:
                key, line = duplicate
                source = _CONFIG_FILE.get()
                if source is None:
                    where = "a YAML value"
                else:
                    try:
                        own = Path(source).read_text() == value
                    except OSError:
                        own = False
                    where = source if own else f"a file included by {source}"
                raise DuplicateKeyError(
                    f"{where}: duplicate key '{key}' (line {line}); each key may appear once in a mapping "
                    "(YAML would silently keep the last value)"
                )
        return base(value)

    load.refuses_duplicate_keys = True  # type: ignore[attr-defined]
    return load


if not getattr(get_loader("yaml"), "refuses_duplicate_keys", False):  # recipes are parsed in jsonargparse's yaml mode
    set_loader("yaml", strict_yaml_loader(get_loader("yaml")), exceptions=(yaml.YAMLError,))


class RecipeParser(AAArgumentParser):
    """LightningCLI's parser that names the ``--config`` file it is reading when its YAML has a duplicate key."""

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Namespace:
        token = _CONFIG_FILE.set(str(path))
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            _CONFIG_FILE.reset(token)


def check_runs_dir(runs_dir: str) -> None:
    """A ``ValueError`` naming ``--runs_dir`` and the file in its way when it (or a folder above it) is a file."""
    path = Path(runs_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(
                    f"--runs_dir {path}: {candidate} is a file, not a folder; pass a folder (it is created if missing)"
                )
            return


class AACLI(LightningCLI):
    """LightningCLI for aa-lightning recipes: fit, test, summary (see the module docstring)."""

    def __init__(
        self, args: Any = None, start_time: float | None = None, stop_anywhere: StopAnywhere | None = None
    ) -> None:
        self.start_time = time.perf_counter() if start_time is None else start_time
        self.stop_anywhere = stop_anywhere  # told the trainer once it exists (its stage names where a signal came)
        self.resume_version: int | None = None
        self.resume_checkpoint: dict[str, Any] | None = None  # loaded (mmap) to check it before fitting
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the tasks own their optimizer and schedule
            save_config_callback=ResumeSafeSaveConfig,  # a resumed run rewrites its config.yaml once it has resumed
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": "Train and test an aa-lightning recipe: python train.py --config configs/<recipe>.yaml",
                "allow_abbrev": False,  # a misspelt key fails instead of being completed
            },
            parser_class=RecipeParser,
            args=args,
            run=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume training: 'last' (newest last.ckpt of --run_name) or a checkpoint path.",
        )
        parser.add_argument(
            "--test_ckpt_path",
            type=str | None,
            default="best",
            help="Checkpoint tested after fitting: 'best', 'last', a path, or null to skip the test.",
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Logs go to <runs_dir>/<run_name>/version_N (default: the last --config file's name).",
        )
        parser.add_argument("--runs_dir", type=str, default="runs", help="Root folder of the TensorBoard runs.")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=1000,
            help="Write last.ckpt every N optimizer steps (and at every epoch end); 0: epoch ends only.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": False, "checkpoint.save_top_k": 1, "checkpoint.filename": "best-{epoch}-{step}"}
        )
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
        check_runs_dir(cfg.runs_dir)
        cfg.run_name = self._run_name()
        # the task's own metric for ModelCheckpoint unless the config names one
        if cfg.checkpoint.get("monitor") is None:
            task = _import_class(cfg.model.class_path)
            monitor = getattr(task, "checkpoint_monitor", None)
            if monitor is not None:
                cfg.checkpoint.monitor, cfg.checkpoint.mode = monitor
        if cfg.checkpoint.get("save_last"):
            rank_zero_warn(
                "checkpoint.save_last is ignored: last.ckpt is written by LastCheckpoint at every save "
                "point (--checkpoint_every_n_steps and every epoch end)"
            )
            cfg.checkpoint.save_last = False
        # resuming: find 'last' (the newest intact checkpoint), check the file loads, keep logging into its version
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            path, self.resume_version, self.resume_checkpoint = find_last_checkpoint(cfg.runs_dir, cfg.run_name)
            cfg.ckpt_path = str(path)
        elif ckpt_path:
            path = Path(ckpt_path)
            self.resume_checkpoint = load_checkpoint_file(path)
            match = _VERSION_DIR.match(path.parent.parent.name)
            if (
                path.parent.name == "checkpoints"
                and match
                and path.parent.parent.parent.resolve() == (Path(cfg.runs_dir) / cfg.run_name).resolve()
            ):
                self.resume_version = int(match.group(1))
        # SyncBatchNorm is GPU-only in torch
        trainer_cfg = cfg.trainer
        on_cuda = torch.cuda.is_available() and str(trainer_cfg.get("accelerator")) in ("auto", "gpu", "cuda")
        if trainer_cfg.get("sync_batchnorm") and not on_cuda:
            rank_zero_warn(
                "trainer.sync_batchnorm is ignored on this run: torch.nn.SyncBatchNorm needs CUDA GPUs, and this run "
                f"is on accelerator={trainer_cfg.get('accelerator')!r} without CUDA; each process normalizes over its "
                "own batch."
            )
            trainer_cfg.sync_batchnorm = False

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        logger = self.config.trainer.get("logger")
        resuming = self.resume_checkpoint is not None
        run_logger = None
        if logger is None or logger is True:
            version = self.resume_version
            if version is None and rank_zero_only.rank == 0:  # other DDP ranks take rank 0's folder (broadcast)
                version = claim_version(Path(self.config.runs_dir) / self.config.run_name)
            run_logger = ResumeTensorBoardLogger(
                save_dir=self.config.runs_dir, name=self.config.run_name, version=version, hold=resuming
            )
            kwargs["logger"] = run_logger
        checkpoint_folder = None
        if resuming and self.resume_version is not None:
            checkpoint_folder = Path(self.config.runs_dir) / self.config.run_name / f"version_{self.resume_version}"
            checkpoint_folder = checkpoint_folder / "checkpoints"
        self.run_summary = RunSummary()
        self.resume_settings = RecordResumeSettings()
        self.last_checkpoint = LastCheckpoint(every_n_train_steps=self.config.checkpoint_every_n_steps)
        trainer_config = self.config_init.get("trainer") or {}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        kwargs["callbacks"] = callbacks + [
            self.run_summary,
            ExactResume(),
            ResumeGate(run_logger, checkpoint_folder),  # after ExactResume: the loader's position is restored
            NonFiniteLossGuard(),
            StopOnSignal(),
            self.resume_settings,
            # last: its step saves follow the non-finite-loss check; at an epoch end the best-checkpoint callback
            # (saved at the validation's end) has already updated the state it holds
            self.last_checkpoint,
        ]
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, ResumeSafeSaveConfig):
                callback.defer = resuming
        self.resume_settings.settings = resume_settings(self.config, trainer)
        if self.stop_anywhere is not None:
            self.stop_anywhere.trainer = trainer
        return trainer

    # -- the job ---------------------------------------------------------------------------------------
    def fit_and_test(self) -> dict[str, float] | None:
        """``trainer.fit`` (resuming from ``ckpt_path``), then ``trainer.test`` of ``test_ckpt_path``; prints the
        summary."""
        cfg = self.config
        if self.resume_checkpoint is not None:  # before the logger or the config saver writes to the run folder
            checkpoint, self.resume_checkpoint = self.resume_checkpoint, None
            check_checkpoint_fits(checkpoint, Path(cfg.ckpt_path), self.model)
            check_resume_settings(checkpoint, Path(cfg.ckpt_path), self.resume_settings.settings)
            del checkpoint
        # weights_only: a checkpoint handed in by path loads without unpickling code (this project's checkpoints
        # hold tensors and plain containers only, the random states included)
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        results = None
        tested = cfg.test_ckpt_path
        ckpt = self.trainer.checkpoint_callback
        checkpoints = {"best": ckpt.best_model_path} if ckpt is not None else {}
        checkpoints["last"] = self.last_checkpoint.path
        if tested and not self.trainer.interrupted:
            if tested == "best" and not checkpoints.get("best"):
                rank_zero_warn("no best checkpoint (no monitored metric was logged): testing the last weights instead")
                tested = None
            # 'best' / 'last' as this CLI's files (Lightning's own 'best' would have to pick among two callbacks)
            path = checkpoints.get(tested) or tested if tested in ("best", "last") else tested
            output = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path, weights_only=True)
            results = output[0] if output else {}
        if self.trainer.is_global_zero:
            report = self.run_summary.report(
                self.trainer, results, tested or "final", checkpoints, time.perf_counter() - self.start_time
            )
            print(report, flush=True)
        return results


DEBUG_ENV = "AA_LIGHTNING_DEBUG"
_PACKAGE_DIR = Path(aa_lightning.__file__).resolve().parent


def project_value_error(err: BaseException) -> ValueError | None:
    """The deepest ``ValueError`` raised by this project's code in ``err``'s chain of causes (LightningCLI /
    jsonargparse wrap the error of a class they build in a ValueError of their own, ending in a dump of the whole
    Namespace), or ``None`` when no ValueError of the chain was raised by ``aa_lightning`` (a bug elsewhere keeps
    its traceback)."""
    found = None
    current: BaseException | None = err
    while current is not None:
        tb = current.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if isinstance(current, ValueError) and tb is not None:
            if Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR):
                found = current
        current = current.__cause__
    return found


def main(args: Any = None, start_time: float | None = None) -> dict[str, float] | None:
    """Parse the recipe and overrides (``args`` or ``sys.argv``), fit, test, print the summary.

    ``start_time``: ``time.perf_counter()`` at process start, so the summary's wall time counts imports.
    A bad setting that one of this project's classes refuses while the CLI builds the model or the data is one
    ``train.py: error:`` line (exit 2); ``AA_LIGHTNING_DEBUG=1`` raises it with its whole traceback instead.
    """
    with StopAnywhere() as stop:
        try:
            try:
                cli = AACLI(args=args, start_time=start_time, stop_anywhere=stop)
            except ValueError as err:
                own = project_value_error(err)
                if isinstance(err, CheckpointError) or own is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                    raise
                print(
                    f"train.py: error: {' '.join(str(own).split())} ({DEBUG_ENV}=1 shows the traceback)",
                    file=sys.stderr,
                    flush=True,
                )
                sys.exit(2)
            return cli.fit_and_test()
        except RunInterrupted as err:  # SIGTERM / SIGINT: a scheduler sees the interruption
            print(f"train.py: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)
        except SIGTERMException:  # Lightning's own stop on SIGTERM exits 0: it was a SIGTERM
            print(f"train.py: {stop.interrupted(signal.SIGTERM)}", file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGTERM)
        except (CheckpointError, NonFiniteLossError, ObjectStoreError) as err:
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
