"""A streamed run (litdata shards) killed mid-epoch and resumed with ``--ckpt_path last`` ends as the
uninterrupted run does (issue 22, item 4): the same steps, the same samples in every epoch after the resume,
with the same augmentation (the per-sample seed of (seed, epoch, index), as for the folder reader)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers.cli_helpers import REPO, run_cli
from helpers.streaming_helpers import convert, write_tree

pytest.importorskip("litdata")

CLASSES = ["n01", "n02", "n03", "n04"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 2  # 40 training images / batch 4 = 10 steps per epoch
STEPS_PER_EPOCH = 10
KILL_AT = 7  # mid-epoch 0; last.ckpt is from step 6


def recipe(tmp: Path, shards: Path, report: Path, kill_at: int = -1) -> list[str]:
    """The streaming recipe on the tiny shards, a tiny ResNet, 2 epochs, last.ckpt every 3 steps; the only
    callback is the probe that records every step (and kills the run at ``kill_at``)."""
    probe_config = tmp / f"probe_{kill_at}.yaml"
    probe = {"class_path": "helpers.fault_probes.StepProbe", "init_args": {"report": str(report), "kill_at": kill_at}}
    probe_config.write_text(json.dumps({"trainer": {"callbacks": [probe]}}))
    return [
        "--config",
        str(REPO / "configs" / "imagenet_aa_resnet50_streaming.yaml"),
        "--runs_dir",
        str(tmp / "runs"),
        "--run_name",
        "streamed",
        "--checkpoint_every_n_steps",
        "3",
        "--test_ckpt_path",
        "null",
        "--data.init_args.data_dir",
        str(shards),
        "--data.init_args.cache_dir",
        str(tmp / "cache"),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.train_size",
        "16",
        "--data.init_args.eval_size",
        "16",
        "--data.init_args.resize_size",
        "18",
        "--model.init_args.model_name",
        "test_resnet",
        "--model.init_args.num_classes",
        str(len(CLASSES)),
        "--model.init_args.warmup_epochs",
        "0",
        "--trainer.max_epochs",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.precision",
        "32-true",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--config",
        str(probe_config),
    ]


def steps(report: Path) -> dict[int, dict]:
    """The probe's lines by step (a replayed step keeps its last record)."""
    return {line["step"]: line for line in map(json.loads, report.read_text().splitlines())}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("streamed_resume")
    write_tree(base / "imagenet", {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS}, CLASSES)
    convert(base / "imagenet", base / "shards")
    return base / "shards"


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_uninterrupted_runs_end(shards, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference, killed):
        folder.mkdir()
    ref_report, report = reference / "steps.jsonl", killed / "steps.jsonl"
    result = run_cli(*recipe(reference, shards, ref_report), cwd=reference, probes=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "20 optimizer steps" in result.stdout, result.stdout[-2000:]
    dead = run_cli(*recipe(killed, shards, report, kill_at=KILL_AT), cwd=killed, probes=True, fresh_process=True)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-3000:]
    resumed = run_cli(*recipe(killed, shards, report), "--ckpt_path", "last", cwd=killed, probes=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # before the fix: 10 optimizer steps (epoch 1 ran none of its batches)
    assert "20 optimizer steps" in resumed.stdout, resumed.stdout[-2000:]
    ref_steps, got = steps(ref_report), steps(report)
    assert set(got) == set(ref_steps) == set(range(1, 2 * STEPS_PER_EPOCH + 1))
    for step in range(KILL_AT, 2 * STEPS_PER_EPOCH + 1):  # every step after last.ckpt (step 6)
        assert got[step]["epoch"] == ref_steps[step]["epoch"], step
        assert got[step]["targets"] == ref_steps[step]["targets"], step  # the same samples
        assert got[step]["image_sum"] == pytest.approx(ref_steps[step]["image_sum"], rel=1e-6), step  # augmentation


class _Killed(Exception):
    """Stands for the process being killed."""


def _fit(shards: Path, folder: Path, die_at: int = -1, ckpt_path: str | None = None) -> dict[int, tuple]:
    """Lightning with ExactResume (as train.py), epochs cut to 6 of 10 batches by limit_train_batches, a
    checkpoint every 3 steps; returns step -> (epoch, image sum) of every training step."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from aa_lightning.data import StreamingImageNetDataModule
    from aa_lightning.training.faults import ExactResume

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, tuple] = {}

        def training_step(self, batch, batch_idx):
            if self.global_step == die_at:
                raise _Killed
            self.seen[self.global_step + 1] = (self.current_epoch, round(float(batch[0].double().sum()), 4))
            return (self.weight * batch[0].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1, filename="{step}"),
            ExactResume(),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = StreamingImageNetDataModule(
        data_dir=str(shards), batch_size=4, num_workers=0, train_size=16, eval_size=16, resize_size=18
    )
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except _Killed:
        pass
    return model.seen


def test_a_streamed_resume_in_an_epoch_cut_by_limit_train_batches_runs_the_next_epoch_in_full(shards, tmp_path):
    """The restored epoch ends at limit_train_batches, before litdata's loader has yielded all its samples: the
    next epoch still starts afresh (the trainer's epoch has moved on), with the uninterrupted run's batches."""
    reference = _fit(shards, tmp_path / "reference")
    assert sorted(reference) == list(range(1, 13)) and reference[7][0] == 1
    killed = _fit(shards, tmp_path / "killed", die_at=4)  # in epoch 0; checkpoint at step 3
    assert sorted(killed) == [1, 2, 3, 4]
    resumed = _fit(shards, tmp_path / "killed", ckpt_path=str(tmp_path / "killed" / "step=3.ckpt"))
    assert sorted(resumed) == list(range(4, 13))  # before the fix: steps 4-6 only (epoch 1 ran 0 batches)
    assert resumed == {step: reference[step] for step in range(4, 13)}  # the same images, the same augmentation
