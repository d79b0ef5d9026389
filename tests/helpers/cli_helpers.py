"""Running the project's commands (in this process, or in a fresh one where a test needs it) and reading what they
logged (shared by the CLI tests)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train.py"


def python_env(probes: bool = False) -> dict[str, str]:
    """The environment of the subprocesses: one thread, quiet; ``probes``: tests/ on the PYTHONPATH, so that a
    recipe can load the callbacks of ``tests/helpers/fault_probes.py``."""
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    if probes:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    return env


def run_python(*args: str, cwd: Path, timeout: int = 300, probes: bool = False) -> subprocess.CompletedProcess:
    """``python *args`` on one thread, quiet about albumentations updates and deprecations."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=python_env(probes), capture_output=True, text=True, timeout=timeout
    )


def run_cli(
    *args: str, cwd: Path, timeout: int = 300, probes: bool = False, fresh_process: bool = False
) -> subprocess.CompletedProcess:
    """``python train.py *args``: in this process (:func:`run_cli_in_process`, no interpreter start-up and imports)
    unless ``fresh_process`` or the run is distributed (:func:`launches_processes`), then in a subprocess.

    A fresh process is for what only a process can show: its exit by a signal (SIGKILL, a SIGTERM it sends
    itself), DDP (Lightning relaunches ``sys.argv``, which in a test is pytest), or ``timeout`` (ignored in
    this process). ``probes``: ``tests/helpers/fault_probes.py`` importable by the recipe (it is, in this process)."""
    if fresh_process or launches_processes(args):
        return run_python(str(TRAIN), *args, cwd=cwd, timeout=timeout, probes=probes)
    return run_cli_in_process(*args, cwd=cwd)


_MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def launches_processes(args: tuple[str, ...] | list[str]) -> bool:
    """Whether ``train.py *args`` would start worker processes of its own (a ``ddp`` / ``fsdp`` / ``deepspeed``
    strategy, or more than one device or node), judged from the ``--config`` files' ``trainer:`` sections and the
    ``--trainer.*`` overrides, later ones winning. In this process Lightning would relaunch pytest's command line."""
    settings: dict[str, object] = {}
    args = [str(arg) for arg in args]
    if "--print_config" in args or any(arg.startswith("--print_config=") for arg in args):
        return False
    for i, arg in enumerate(args):
        key, has_value, value = arg.partition("=")
        if not has_value:
            value = args[i + 1] if i + 1 < len(args) else ""
        if key == "--config" and Path(value).is_file():
            try:
                trainer = (yaml.safe_load(Path(value).read_text()) or {}).get("trainer") or {}
            except (yaml.YAMLError, AttributeError):
                continue  # the CLI reports it
            if isinstance(trainer, dict):
                settings.update({k: trainer[k] for k in ("strategy", "devices", "num_nodes") if k in trainer})
        elif key in ("--trainer.strategy", "--trainer.devices", "--trainer.num_nodes"):
            try:
                settings[key.rpartition(".")[2]] = yaml.safe_load(value)
            except yaml.YAMLError:
                settings[key.rpartition(".")[2]] = value
    strategy = settings.get("strategy")
    if isinstance(strategy, dict):
        strategy = strategy.get("class_path", "")
    if any(name in str(strategy or "").lower() for name in _MULTI_PROCESS_STRATEGIES):
        return True

    def more_than_one(value: object) -> bool:
        if isinstance(value, (list, tuple)):
            return len(value) > 1
        if isinstance(value, str) and "," in value:
            return len([v for v in value.split(",") if v.strip()]) > 1
        try:
            return int(value) > 1  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    return more_than_one(settings.get("devices")) or more_than_one(settings.get("num_nodes"))


# the process-wide state that a run of the CLI changes and a fresh process would not carry over
_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP") if hasattr(signal, name)
)
_LOGGERS = {"lightning.pytorch": logging.INFO, "lightning.fabric": logging.INFO, "aa_lightning": logging.WARNING}


@contextlib.contextmanager
def _as_a_fresh_process(cwd: Path, stderr: io.StringIO, program: str) -> Iterator[None]:
    """Within: ``cwd`` the working directory, ``sys.argv`` ``[program]``, the subprocesses' environment, one
    torch thread, Python's default warning filters (plus ``PYTHONWARNINGS=ignore::DeprecationWarning``) with
    warnings and the Lightning / aa_lightning loggers written to ``stderr``. After: all of it, the global random
    states, torch's global flags and the signal handlers as they were."""
    saved_cwd, saved_argv, saved_path, saved_env = os.getcwd(), sys.argv, list(sys.path), dict(os.environ)
    saved_threads = torch.get_num_threads()
    saved_rng = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    saved_flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
    )
    saved_signals = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    saved_loggers = {name: logging.getLogger(name) for name in _LOGGERS}
    saved_logger_state = {name: (lg.handlers[:], lg.propagate, lg.level) for name, lg in saved_loggers.items()}
    try:
        os.chdir(cwd)
        sys.argv = [program]  # LightningCLI warns when pytest's arguments sit beside the args it is given
        if str(REPO / "tests") not in sys.path:
            sys.path.append(str(REPO / "tests"))  # tests/helpers/fault_probes.py, as probes=True gives a subprocess
        os.environ.update({k: v for k, v in python_env().items() if k not in ("PYTHONPATH",)})
        torch.set_num_threads(1)
        for name, level in _LOGGERS.items():
            lg = saved_loggers[name]
            lg.handlers = [_level_handler(stderr, level)]  # what a fresh process shows, on this run's stderr
            lg.propagate, lg.level = False, level
        with warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh interpreter's filters, not pytest's "always" / "error" ones
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            # the CLI's own filter (added at its import, which may have been inside another test's catch_warnings)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

            def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
                stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

            warnings.showwarning = show
            yield
    finally:
        for signum, previous in saved_signals.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        for name, (handlers, propagate, level) in saved_logger_state.items():
            lg = saved_loggers[name]
            lg.handlers, lg.propagate, lg.level = handlers, propagate, level
        torch.use_deterministic_algorithms(saved_flags[0], warn_only=saved_flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_flags[2], saved_flags[3]
        torch.set_float32_matmul_precision(saved_flags[4])
        torch.set_default_dtype(saved_flags[5])
        torch.set_grad_enabled(saved_flags[6])
        torch.random.set_rng_state(saved_rng[0])
        np.random.set_state(saved_rng[1])
        random.setstate(saved_rng[2])
        torch.set_num_threads(saved_threads)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)


def _level_handler(stream: io.StringIO, level: int) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setLevel(level)
    return handler


def run_cli_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py *args`` as :func:`aa_lightning.training.cli.main` in this process, as if in a fresh one
    (see :func:`run_main_in_process`)."""
    from aa_lightning.training.cli import main

    return run_main_in_process(main, *args, cwd=cwd, program=[str(TRAIN)])


def run_main_in_process(
    main: Callable[[list[str]], object], *args: str, cwd: Path, program: list[str]
) -> subprocess.CompletedProcess:
    """``python *program *args`` as ``main(list(args))`` in this process, as if in a fresh one (see
    :func:`_as_a_fresh_process`): its stdout and stderr captured; the return code is what ``main`` returns if an
    int (else 0), a ``SystemExit``'s code, or 1 with the traceback on stderr for an uncaught exception."""
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    with (
        _as_a_fresh_process(Path(cwd), stderr, program[0]),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            returned = main(list(args))
            returncode = returned if isinstance(returned, int) else 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                returncode = exit_.code or 0
            else:  # sys.exit("message"): printed, status 1
                print(exit_.code, file=sys.stderr)
                returncode = 1
        except Exception:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
            traceback.print_exc()
            returncode = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return subprocess.CompletedProcess(
        [sys.executable, *program, *args], returncode, stdout.getvalue(), stderr.getvalue()
    )


def events(log_dir: Path):
    """Every image and scalar of the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def aa_recipe(tmp_path: Path, name: str = "tiny_aa", callbacks: list | None = None, **data_overrides) -> Path:
    """A quickstart-like recipe: a narrow AA-WRN with dropout, 2 epochs x 5 steps on 56 generated images."""
    recipe = {
        "seed_everything": 0,
        "runs_dir": str(tmp_path / "runs"),
        "test_ckpt_path": None,
        "checkpoint_every_n_steps": 2,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "callbacks": callbacks or [],
        },
        "model": {
            "class_path": "aa_lightning.tasks.ImageClassifier",
            "init_args": {
                "model_name": "aa_wrn28_10",
                "num_classes": 4,
                "base_lr": 0.2,
                "warmup_epochs": 0.5,
                "model_kwargs": {
                    "depth": 10,
                    "widen_factor": 1,
                    "aa_stages": [3],
                    "aa_heads": 2,
                    "aa_min_dkh": 4,
                    "block_drop_rate": 0.3,
                },
            },
        },
        "data": {
            "class_path": "aa_lightning.data.SyntheticCIFARDataModule",
            "init_args": {
                "data_dir": str(tmp_path.parent / "shared_data"),
                "num_classes": 4,
                "train_size": 56,
                "test_size": 8,
                "val_split": 16,
                "batch_size": 8,
                "num_workers": 0,
                "hflip": True,
                **data_overrides,
            },
        },
        "image_grid": {"num_images": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
