"""Does the test suite catch a broken product? Apply deliberate breakages one at a time to a throw-away
copy of the repository and run the tests there; print a Markdown table of which were caught.

    python tools/mutation_check.py                       # every breakage, the default suite each time
    python tools/mutation_check.py --quick               # each breakage against its own test files only
    python tools/mutation_check.py --tests tests/test_cli.py tests/test_product_training.py
    python tools/mutation_check.py --only loss-times-zero val-split-overlaps --quick
    python tools/mutation_check.py --list

Not run by CI (it runs the suite once per breakage). The copy holds the repository's tracked and
untracked-but-not-ignored files (never ``runs/``, ``data/`` outputs or caches), so the working tree
is never modified; ``PYTHONPATH`` points at the copy, so the subprocesses of the CLI tests run the
broken code too. Before the breakages, the same tests run once on the unbroken copy: a failure there
stops the tool (every breakage would look "caught").

A breakage is a :class:`Breakage` in ``BREAKAGES``: a name, what it breaks, and one or more exact
text edits (file, old text, new text). An old text that is not in the file exactly once stops the
tool with an error naming the file and the entry, so an entry cannot rot silently when the code it
breaks is rewritten: update the entry. ``tests``: the test files that ought to catch it, run by
``--quick``. An entry with ``todo`` set is listed but not applied (code not written yet). An entry
with ``pytest_args`` (``-m slow``: only a test outside the default run can catch it) always runs its
own ``tests`` with them.

Exit status: 0 every applied breakage caught; 1 at least one survived; 2 a broken entry, or the
unbroken copy already fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edit:
    """Replace the one occurrence of ``old`` in ``file`` (relative to the repository root) with ``new``."""

    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Breakage:
    name: str
    description: str
    edits: tuple[Edit, ...] = ()
    tests: tuple[str, ...] = ()
    todo: str | None = None  # why it is not applied yet; the row then reads TODO
    #: run ``tests`` with these pytest arguments in every mode (e.g. ``-m slow``: only a slow test can catch it)
    pytest_args: tuple[str, ...] = ()


def breakage(
    name: str, description: str, file: str, old: str, new: str, tests: Sequence[str] = (), more: Sequence[Edit] = ()
) -> Breakage:
    """A one-edit breakage (``more``: further edits applied together with it)."""
    return Breakage(name, description, (Edit(file, old, new), *more), tuple(tests))


CLASSIFICATION = "aa_lightning/tasks/classification.py"
ATTENTION = "aa_lightning/layers/relative_attention.py"
AACONV = "aa_lightning/layers/augmented_conv.py"
CIFAR = "aa_lightning/data/cifar.py"
FAULTS = "aa_lightning/callbacks/faults.py"
CLI = "aa_lightning/cli.py"

BREAKAGES: list[Breakage] = [
    breakage(
        "loss-times-zero",
        "the classification loss multiplied by 0 (nothing learns)",
        CLASSIFICATION,
        "        return loss\n\n    def _evaluate",
        "        return loss * 0\n\n    def _evaluate",
        ["tests/test_product_training.py", "tests/test_cli.py", "tests/test_classification.py"],
    ),
    breakage(
        "detection-loss-times-zero",
        "the RetinaNet loss multiplied by 0",
        "aa_lightning/tasks/detection.py",
        "        return loss\n\n    def _evaluate",
        "        return loss * 0\n\n    def _evaluate",
        ["tests/test_detection_cli.py", "tests/test_detection_model.py"],
    ),
    breakage(
        "relative-terms-dropped",
        "the relative logits dropped by the CPU default (cpu_kernel) and chunked backends",
        ATTENTION,
        'return _factorized_attention(q, k, v, rel_h, rel_w, kernel=backend == "cpu_kernel")',
        "return _content_attention(q, k, v)",
        ["tests/test_relative_attention.py", "tests/test_augmented_conv.py", "tests/test_cpu_kernel.py"],
    ),
    breakage(
        "rel-h-rel-w-swapped",
        "AugmentedConv2d passes rel_w as the height table and rel_h as the width table",
        AACONV,
        "relative_attention_2d(q, k, v, rel_h, rel_w, backend=self.backend)",
        "relative_attention_2d(q, k, v, rel_w, rel_h, backend=self.backend)",
        ["tests/test_augmented_conv.py", "tests/test_relative_attention.py"],
    ),
    Breakage(
        "h-w-swapped-in-relative-index",
        "the relative-offset index of the width table built over H and vice versa",
        (
            Edit(
                ATTENTION,
                "r_w = rel_w.to(q.dtype)[relative_offsets_index(w, q.device)]",
                "r_w = rel_w.to(q.dtype)[relative_offsets_index(h, q.device)]",
            ),
            Edit(
                ATTENTION,
                "r_h = rel_h.to(q.dtype)[relative_offsets_index(h, q.device)]",
                "r_h = rel_h.to(q.dtype)[relative_offsets_index(w, q.device)]",
            ),
        ),
        ("tests/test_relative_attention.py", "tests/test_augmented_conv.py"),
    ),
    breakage(
        "attention-not-concatenated",
        "AAConv's attention output zeroed (not concatenated)",
        AACONV,
        "return torch.cat([conv_out, attn], dim=1)",
        "return torch.cat([conv_out, attn * 0], dim=1)",
        ["tests/test_augmented_conv.py", "tests/test_models.py"],
    ),
    breakage(
        "optimizer-step-skipped",
        "forward and backward run, the optimizer never steps",
        CLASSIFICATION,
        "    def configure_optimizers(self) -> dict[str, Any]:\n",
        "    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):\n"
        "        optimizer_closure()\n\n    def configure_optimizers(self) -> dict[str, Any]:\n",
        ["tests/test_product_training.py", "tests/test_cli.py", "tests/test_classification.py"],
    ),
    breakage(
        "lr-scaling-ignored",
        "the linear lr scaling (base_lr x global batch / 256) ignored: peak lr = base_lr",
        "aa_lightning/optim.py",
        "    return base_lr * global_batch / reference_batch_size, global_batch",
        "    return base_lr, global_batch",
        ["tests/test_classification.py", "tests/test_cli.py"],
    ),
    breakage(
        "warmup-ignored",
        "the linear warm-up skipped (full lr from step 0)",
        "aa_lightning/optim.py",
        "    if after == 0:\n        return main",
        "    if True:\n        return main",
        ["tests/test_classification.py"],
    ),
    breakage(
        "label-smoothing-ignored",
        "model.label_smoothing accepted but not applied",
        CLASSIFICATION,
        "nn.CrossEntropyLoss(label_smoothing=label_smoothing)",
        "nn.CrossEntropyLoss()",
        ["tests/test_product_classification.py", "tests/test_classification.py"],
    ),
    breakage(
        "weight-decay-on-norms",
        "weight decay applied to BatchNorm weights and biases too",
        "aa_lightning/optim.py",
        "    return param_groups_weight_decay(model, weight_decay)[::-1]",
        '    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]',
        ["tests/test_classification.py"],
    ),
    Breakage(
        "ddp-metric-sync-off",
        "top-1 / top-5 not summed across DDP processes (each reports its own shard)",
        (
            Edit(
                CLASSIFICATION,
                '"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),',
                '"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", sync_on_compute=False),',
            ),
            Edit(
                CLASSIFICATION,
                '"top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),',
                '"top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", '
                "sync_on_compute=False),",
            ),
        ),
        ("tests/test_cli.py",),
    ),
    breakage(
        "ddp-eval-padded",
        "evaluation under DDP with the padding DistributedSampler (some images counted twice)",
        "aa_lightning/data/loaders.py",
        "sampler = UnrepeatedDistributedSampler(dataset,",
        "sampler = torch.utils.data.DistributedSampler(dataset,",
        ["tests/test_cli.py"],
    ),
    breakage(
        "val-split-overlaps-train",
        "half of the held-out validation images also trained on",
        CIFAR,
        "train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])",
        "train_idx, val_idx = np.sort(order[n_val // 2:]), np.sort(order[:n_val])",
        ["tests/test_product_data.py", "tests/test_data_cifar.py"],
    ),
    breakage(
        "val-augmented",
        "the validation images get the training augmentation (pad-crop, flip)",
        CIFAR,
        "self.val_set = ArrayImageDataset(images[val_idx], labels[val_idx], eval_transform)",
        "self.val_set = ArrayImageDataset(images[val_idx], labels[val_idx], train_transform)",
        ["tests/test_product_data.py", "tests/test_data_cifar.py"],
    ),
    breakage(
        "checkpoint-monitor-min",
        "the best checkpoint chosen by the lowest validation top-1",
        CLASSIFICATION,
        'checkpoint_monitor: tuple[str, str] = ("val/top1", "max")',
        'checkpoint_monitor: tuple[str, str] = ("val/top1", "min")',
        ["tests/test_cli.py"],
    ),
    breakage(
        "export-without-checkpoint-weights",
        "export / predict write the built model's initial weights (checkpoint not loaded)",
        "aa_lightning/predict.py",
        "        load_checkpoint(model, source)  # the model zoo's checks: same model, same shapes",
        "        pass  # the checkpoint is not loaded",
        ["tests/test_export.py", "tests/test_predict.py", "tests/test_predict_cli.py"],
    ),
    breakage(
        "validation-uses-test-set",
        "a held-out validation split replaced by the test set",
        CIFAR,
        '        if stage in (None, "test") or (self.hparams.val_split == 0 and stage in ("fit", "validate")):',
        "        if True:",
        ["tests/test_product_data.py", "tests/test_data_cifar.py"],
        more=[
            Edit(
                CIFAR,
                "            if self.hparams.val_split == 0:\n                self.val_set = self.test_set",
                "            if True:\n                self.val_set = self.test_set",
            )
        ],
    ),
    Breakage(
        "compiled-attention-wrong-shape",
        "the CPU kernel's output shape under compile (fake): dkh wide, not dvh",
        (
            Edit(
                "aa_lightning/layers/cpu_kernel.py",
                "    out = q.new_empty(*q.shape[:4], v.shape[4], dtype=torch.float32)",
                "    out = q.new_empty(*q.shape[:4], q.shape[4], dtype=torch.float32)",
            ),
        ),
        ("tests/test_product_compile.py",),
        pytest_args=("-m", "slow"),
    ),
    breakage(
        "tiled-bias-window-shifted",
        "the float32 kernel reads each query's relative-table window one offset off (W - ix, not W - 1 - ix)",
        "aa_lightning/layers/factorized_attention_tiled.c",
        "        const float* wT = tab->wT + (W - 1 - i % W);",
        "        const float* wT = tab->wT + (W - i % W);",
        ["tests/test_cpu_kernel.py"],
    ),
    breakage(
        "low-precision-q-scaled-in-its-dtype",
        "bfloat16 / float16 q scaled in its own dtype before the kernel reads it (one more rounding)",
        "aa_lightning/layers/cpu_kernel.py",
        "        scaled.view(q.shape).copy_(q)\n        scaled.mul_(scale)",
        "        torch.mul(q, scale, out=scaled.view(q.shape))",
        ["tests/test_cpu_kernel.py"],
    ),
    breakage(
        "last-ckpt-not-rewritten",
        "last.ckpt written at the first save point and never rewritten",
        "aa_lightning/callbacks/faults.py",
        "    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        self.save_now(trainer)",
        "    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        if not self.best_model_path:\n            self.save_now(trainer)",
        ["tests/test_resume.py", "tests/test_cli.py"],
    ),
    breakage(
        "generator-overwrites-foreign-folder",
        "a synthetic data generator takes a non-empty folder without its stamp for its own (and replaces it)",
        "aa_lightning/data/generated.py",
        "        if found is None or not is_own_stamp(found):\n            raise ValueError(",
        "        if False:\n            raise ValueError(",
        ["tests/test_data_generators.py"],
        more=[
            Edit(
                "aa_lightning/data/generated.py",
                "        foreign = [name for name in existing if name not in own]",
                "        foreign = []",
            )
        ],
    ),
    breakage(
        "checkpoint-not-atomic",
        "checkpoints written by Lightning's own writer (a kill mid-save can leave a partial last.ckpt)",
        FAULTS,
        "        atomic_torch_save(checkpoint, path)",
        "        super().save_checkpoint(checkpoint, path, storage_options)",
        ["tests/test_faults.py"],
    ),
    breakage(
        "resume-random-state-not-restored",
        "a resumed run does not restore torch / numpy / Python random states (dropout draws differ)",
        FAULTS,
        "        if self._pending is None:\n            return",
        "        if True:\n            return",
        ["tests/test_resume.py"],
    ),
    breakage(
        "resume-loader-position-lost",
        "a resumed run restarts the training loader at the epoch's start (replays its first batches)",
        FAULTS,
        "        fit_loop._load_combined_loader_states()",
        "        pass",
        ["tests/test_resume.py"],
    ),
    breakage(
        "sigterm-exits-zero",
        "SIGTERM stops the run with exit status 0 (a scheduler sees a finished job)",
        FAULTS,
        "        self.exit_code = 128 + int(signum)",
        "        self.exit_code = 0",
        ["tests/test_resume.py"],
    ),
    breakage(
        "version-claim-not-exclusive",
        "a new run takes the next version_N without creating it exclusively (runs started together share one folder)",
        CLI,
        '            os.mkdir(root / f"version_{version}")\n            return version',
        "            return version",
        ["tests/test_concurrent_runs.py"],
    ),
    breakage(
        "resume-settings-not-checked",
        "a resume with another batch size / base_lr / max_epochs / world size / num_workers is not refused",
        CLI,
        "            check_resume_settings(checkpoint, Path(cfg.ckpt_path), self.resume_settings.settings)\n",
        "",
        ["tests/test_resume_changes.py"],
    ),
    breakage(
        "resume-writes-before-it-succeeded",
        "a resumed run's logger and config.yaml write at setup, before the resume has succeeded",
        CLI,
        "                save_dir=self.config.runs_dir, name=self.config.run_name, version=version, hold=resuming",
        "                save_dir=self.config.runs_dir, name=self.config.run_name, version=version, hold=False",
        ["tests/test_resume_changes.py"],
        more=[Edit(CLI, "                callback.defer = resuming", "                callback.defer = False")],
    ),
    breakage(
        "killed-save-leftovers-kept",
        "the temporary files of killed checkpoint saves are never removed",
        CLI,
        "            if _KILLED_SAVE.match(path.name) and path.is_file() and not path.is_symlink():",
        "            if False:",
        ["tests/test_resume_changes.py"],
    ),
    breakage(
        "killed-save-cleanup-too-broad",
        "the cleanup of killed saves removes any *.tmp file beside the checkpoints, the user's too",
        CLI,
        "            if _KILLED_SAVE.match(path.name) and path.is_file() and not path.is_symlink():",
        '            if path.name.endswith(".tmp") and path.is_file():',
        ["tests/test_resume_changes.py"],
    ),
    breakage(
        "checkpoint-checksum-not-checked",
        "a resume and read_checkpoint load a checkpoint whose bytes fail its zip CRC-32 (a flipped bit resumes)",
        "aa_lightning/models/weights.py",
        "            return archive.testzip()",
        "            return None",
        ["tests/test_checkpoint_integrity.py"],
    ),
    breakage(
        "non-finite-checkpoint-accepted",
        "a checkpoint with NaN / inf weights or optimizer state is resumed and read for predict",
        "aa_lightning/models/weights.py",
        "                if bad:\n                    found.append(",
        "                if False:\n                    found.append(",
        ["tests/test_checkpoint_integrity.py"],
    ),
    breakage(
        "signal-outside-training-ignored",
        "SIGTERM / SIGINT outside the training steps (sanity check, start-up, test) are left to Lightning / Python "
        "(exit 0 or 1)",
        FAULTS,
        "                self._previous[signum] = signal.signal(signum, self._handler)\n        return self",
        "                pass\n        return self",
        ["tests/test_signals_anywhere.py"],
    ),
    breakage(
        "project-value-error-traceback",
        "a ValueError of the project's classes while building the model / data prints the 60-line double traceback",
        CLI,
        '                if isinstance(err, CheckpointError) or own is None or os.environ.get(DEBUG_ENV, "") not in',
        '                if True or os.environ.get(DEBUG_ENV, "") not in',
        ["tests/test_cli_errors.py"],
    ),
    breakage(
        "duplicate-yaml-key-accepted",
        "a recipe YAML that names one key twice silently keeps the last value",
        CLI,
        "            if duplicate is not None:\n                key, line = duplicate",
        "            if False:\n                key, line = duplicate",
        ["tests/test_cli_errors.py"],
    ),
]


# -- the copy -------------------------------------------------------------------------------------------
def repository_files(repo: Path) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (relative paths)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name and (repo / name).is_file()})


def copy_repository(repo: Path, dest: Path) -> None:
    for name in repository_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)


def check_entry(repo: Path, entry: Breakage) -> list[str]:
    """What is wrong with ``entry`` against the files of ``repo`` (empty: it applies)."""
    problems = []
    for edit in entry.edits:
        path = repo / edit.file
        if not path.is_file():
            problems.append(f"{entry.name}: {edit.file} does not exist")
            continue
        count = path.read_text().count(edit.old)
        if count != 1:
            problems.append(
                f"{entry.name}: the old text occurs {count} times in {edit.file} (must be exactly once): {edit.old!r}"
            )
    return problems


def apply(root: Path, entry: Breakage) -> dict[Path, str]:
    """Apply ``entry``'s edits in the copy ``root``; returns the edited files' original texts (for :func:`restore`)."""
    originals: dict[Path, str] = {}
    for edit in entry.edits:
        path = root / edit.file
        text = path.read_text()
        originals.setdefault(path, text)
        path.write_text(text.replace(edit.old, edit.new, 1))
    return originals


def restore(originals: dict[Path, str]) -> None:
    """Put back the copy's files as :func:`apply` found them (the repository may change meanwhile)."""
    for path, text in originals.items():
        path.write_text(text)


# -- running the tests ----------------------------------------------------------------------------------
_FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_tests(root: Path, tests: Sequence[str], timeout: float, pytest_args: Sequence[str]) -> tuple[str, str, float]:
    """(``passed`` | ``failed`` | ``timeout``, the first failing test or a note, seconds)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args, *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "passed", "", seconds
    match = _FAILURE.search(output)
    if match:
        return "failed", match.group(2), seconds
    return "failed", f"pytest exit status {result.returncode}: {output.strip().splitlines()[-1:] or ''}", seconds


def markdown_table(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["| breakage | what it breaks | file(s) | result | first failing test |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tests",
        nargs="+",
        default=None,
        help="test files / node ids to run for every breakage (default: the default suite, tests/)",
    )
    parser.add_argument("--quick", action="store_true", help="run each breakage's own test files only")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="apply only these breakages")
    parser.add_argument("--list", action="store_true", help="list the breakages and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per test run (default 1800)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the tests on the unbroken copy first")
    parser.add_argument("--repo", type=Path, default=REPO, help="repository to copy (default: this one)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string (e.g. '-k \"not ddp\"')")
    args = parser.parse_args(argv)
    if args.tests and args.quick:
        parser.error("--tests and --quick choose the tests differently; give one of them")

    entries = BREAKAGES
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in BREAKAGES})
        if unknown:
            parser.error(f"--only: unknown breakage(s) {unknown}; known: {[e.name for e in BREAKAGES]}")
        entries = [e for e in BREAKAGES if e.name in args.only]
    if args.list:
        for e in entries:
            status = f"TODO: {e.todo}" if e.todo else ", ".join(sorted({edit.file for edit in e.edits}))
            print(f"{e.name:36s} {e.description}  [{status}]")
        return 0

    repo = args.repo.resolve()
    problems = [p for e in entries if not e.todo for p in check_entry(repo, e)]
    if problems:
        print("mutation_check: these breakages no longer apply (update them to the current code):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    import shlex

    pytest_args = shlex.split(args.pytest_args)

    def tests_of(entry: Breakage | None) -> list[str]:
        if args.tests:
            return list(args.tests)
        if entry is not None and entry.pytest_args:
            return list(entry.tests)
        if args.quick:
            if entry is None:  # the baseline: the union of what the entries run
                return sorted({t for e in entries if not e.todo and not e.pytest_args for t in e.tests})
            return list(entry.tests)
        return ["tests"]

    rows = []
    survived = 0
    with tempfile.TemporaryDirectory(prefix="aa_mutation_") as tmp:
        root = Path(tmp) / "repo"
        copy_repository(repo, root)
        if not args.skip_baseline:
            status, detail, seconds = run_tests(root, tests_of(None), args.timeout, pytest_args)
            print(f"baseline (unbroken copy): {status} in {seconds:.0f} s {detail}", file=sys.stderr, flush=True)
            if status != "passed":
                print("mutation_check: the tests fail without any breakage; fix that first", file=sys.stderr)
                return 2
        for entry in entries:
            files = ", ".join(sorted({f"`{edit.file}`" for edit in entry.edits})) or "-"
            if entry.todo:
                rows.append((f"`{entry.name}`", entry.description, files, "TODO", entry.todo))
                continue
            originals = apply(root, entry)
            try:
                extra = [*pytest_args, *(entry.pytest_args if not args.tests else ())]
                status, detail, seconds = run_tests(root, tests_of(entry), args.timeout, extra)
            finally:
                restore(originals)
            caught = status == "failed"
            survived += not caught
            result = "caught" if caught else ("SURVIVED" if status == "passed" else f"SURVIVED ({status})")
            first = f"`{detail}`" if caught else detail
            rows.append((f"`{entry.name}`", entry.description, files, result, first))
            print(f"{entry.name}: {result} in {seconds:.0f} s {detail}", file=sys.stderr, flush=True)
    print(markdown_table(rows))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
