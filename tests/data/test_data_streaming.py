"""litdata shards of ImageNet-style class folders: the converter and StreamingImageNetDataModule.

Every generated image has a flat red channel whose value is unique (10 + 6 * its index), so a
sample is recognised after any crop, flip and normalisation by its mean red value; green and blue
are gradients, so that different crops and resizes give different pixels.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli_helpers import REPO, run_python
from PIL import Image

pytest.importorskip("litdata")

from aa_lightning.atomic_files import PARTIAL_MARKER  # noqa: E402
from aa_lightning.data import ImageNetDataModule, StreamingImageNetDataModule  # noqa: E402
from aa_lightning.data.imagenet import ImageDecodeError  # noqa: E402
from aa_lightning.data.prepare import STAMP, convert_imagenet, main  # noqa: E402
from aa_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = {"train": 8, "val": 5}  # 24 train, 15 val images (odd: the two DDP ranks get unequal shares)
SMALL = dict(batch_size=3, num_workers=0, train_size=16, eval_size=16, resize_size=20)


def _write_tree(root: Path) -> dict[int, tuple[str, int]]:
    """Class folders of flat-colour JPEGs; returns red value -> (path relative to root, label)."""
    rng = np.random.default_rng(0)
    colours, index = {}, 0
    for split, count in PER_CLASS.items():
        for label, wnid in enumerate(CLASSES):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                red = 10 + 6 * index
                h, w = int(rng.integers(24, 40)), int(rng.integers(24, 40))
                rel = f"{split}/{wnid}/{wnid}_{i}.JPEG"
                pixels = np.empty((h, w, 3), np.uint8)  # red flat (the id), green / blue gradients (for the crops)
                pixels[..., 0] = red
                pixels[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
                pixels[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
                Image.fromarray(pixels).save(root / rel, quality=95, subsampling=0)
                colours[red] = (rel, label)
                index += 1
    return colours


def _reds(images: torch.Tensor) -> list[int]:
    """The red value (0-255) of each flat image of a normalised batch, rounded to the generator's grid."""
    red = images[:, 0].mean((1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [10 + 6 * round((float(r) * 255 - 10) / 6) for r in red]


def _tree_listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(source tree, shards, red -> (path, label), source listing before the conversion), converted once by the CLI."""
    base = tmp_path_factory.mktemp("streaming")
    src, out = base / "imagenet", base / "imagenet_litdata"
    colours = _write_tree(src)
    listing = _tree_listing(src)
    result = run_python(
        "-m",
        "aa_lightning.data.prepare",
        "imagenet",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        "2",
        "--chunk-bytes",
        "2KB",
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return src, out, colours, listing


def test_converter_stores_the_jpeg_bytes_labels_and_source_paths(shards):
    import litdata

    src, out, colours, listing = shards
    assert _tree_listing(src) == listing  # --src untouched
    stamp = json.loads((out / STAMP).read_text())
    assert stamp["classes"] == CLASSES and stamp["num_samples"] == {"train": 24, "val": 15}
    assert not list(out.parent.glob(f".{out.name}.partial-*"))  # the temporary sibling was renamed
    for split in ("train", "val"):
        dataset = litdata.StreamingDataset(str(out / split))
        samples = [dataset[i] for i in range(len(dataset))]
        assert len(samples) == PER_CLASS[split] * len(CLASSES)
        assert sorted(s["path"] for s in samples) == sorted(p for p, _ in colours.values() if p.startswith(split))
        for s in samples:
            assert bytes(s["image"]) == (src / s["path"]).read_bytes()
            assert s["label"] == CLASSES.index(Path(s["path"]).parent.name)
        assert len(list((out / split).glob("*.bin"))) > 3  # several shards


def test_streamed_batches_match_the_folder_reader(shards):
    src, out, colours, _ = shards
    dm = StreamingImageNetDataModule(data_dir=str(out), **SMALL)
    dm.setup("fit")
    assert dm.class_names == CLASSES and dm.num_classes == 3
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    seen = []
    for images, labels in dm.val_dataloader():
        assert images.shape[1:] == (3, 16, 16)
        for red, label in zip(_reds(images), labels.tolist()):
            assert colours[red][1] == label
            seen.append(red)
    assert sorted(seen) == sorted(r for r, (p, _) in colours.items() if p.startswith("val/"))
    # the same evaluation pipeline as the folder reader, image for image
    folder = ImageNetDataModule(data_dir=str(src), **SMALL)
    folder.setup("validate")
    by_path = {os.path.relpath(path, src): i for i, (path, _) in enumerate(folder.val_set.samples)}
    for i in (0, 7, 14):
        sample = dm.val_set[i]
        expected, expected_label = folder.val_set[by_path[_raw_path(dm, i)]]
        assert torch.equal(sample[0], expected) and sample[1] == expected_label


def _raw_path(dm: StreamingImageNetDataModule, index: int) -> str:
    """The stored source path of sample ``index`` of the validation shards (read without the transform)."""
    import litdata

    return litdata.StreamingDataset(dm._uri("val"))[index]["path"]


def test_loader_state_resumes_mid_epoch_without_repeats_or_gaps(shards):
    """state_dict after 3 of 8 batches (2 workers) -> a new DataModule and loader -> the remaining 5 batches."""
    _, out, colours, _ = shards
    train_reds = sorted(r for r, (p, _) in colours.items() if p.startswith("train/"))
    args = dict(SMALL, num_workers=2)
    dm = StreamingImageNetDataModule(data_dir=str(out), **args)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = []
    for step, (images, _) in enumerate(loader):
        first += _reds(images)
        if step == 2:
            state = loader.state_dict()
            break
    assert len(first) == 9
    resumed = StreamingImageNetDataModule(data_dir=str(out), **args)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)
    rest = [red for images, _ in loader for red in _reds(images)]
    assert len(rest) == 15
    assert sorted(first + rest) == train_reds  # each image once: no repeat, no gap


def _ddp_worker(rank: int, world_size: int, port: int, out: str, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dm = StreamingImageNetDataModule(data_dir=out, **SMALL)
        dm.setup("fit")
        seen = {"train": [], "val": []}
        loader = dm.train_dataloader()  # one loader for all epochs, as Lightning does
        for _epoch in range(2):
            seen["train"].append([red for images, _ in loader for red in _reds(images)])
        seen["val"] = [red for images, _ in dm.val_dataloader() for red in _reds(images)]
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_read_disjoint_samples_that_cover_the_set_once(shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    _, out, colours, _ = shards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (spawn would re-import torch & co. in each)
    mp.start_processes(_ddp_worker, args=(2, port, str(out), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = sorted(r for r, (p, _) in colours.items() if p.startswith("train/"))
    val = sorted(r for r, (p, _) in colours.items() if p.startswith("val/"))
    for epoch in range(2):
        a, b = ranks[0]["train"][epoch], ranks[1]["train"][epoch]
        assert len(a) == len(b) == 12 and not set(a) & set(b)
        assert sorted(a + b) == train
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # reshuffled each epoch
    a, b = ranks[0]["val"], ranks[1]["val"]
    assert not set(a) & set(b) and sorted(a + b) == val  # 15 images: each evaluated exactly once


def test_a_corrupt_jpeg_in_a_shard_is_named_by_its_source_path(tmp_path):
    src = tmp_path / "imagenet"
    for split in ("train", "val"):
        (src / split / "n0").mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 0, 0)).save(src / split / "n0" / "good.JPEG")
    good = (src / "val" / "n0" / "good.JPEG").read_bytes()
    (src / "val" / "n0" / "broken.JPEG").write_bytes(good[: len(good) // 3])
    killed, other = tmp_path / ".shards.partial-killed", tmp_path / ".shards.partial-not-ours"
    for folder in (killed, other):
        (folder / "train").mkdir(parents=True)
    (killed / PARTIAL_MARKER).write_text("killed")
    convert_imagenet(src, tmp_path / "shards", num_workers=1, verbose=False)
    assert not killed.exists() and other.exists()  # only our own leftovers are removed
    dm = StreamingImageNetDataModule(data_dir=str(tmp_path / "shards"), **SMALL)
    dm.setup("validate")
    with pytest.raises(ImageDecodeError, match=r"val/n0/broken\.JPEG"):
        for _ in dm.val_dataloader():
            pass


def test_converter_refuses_a_foreign_folder_and_reruns_safely(shards, tmp_path, capsys):
    src, out, _, _ = shards
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["imagenet", "--src", str(src), "--out", str(foreign)]) == 2
    assert f"--out {foreign} is not empty" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    # a finished conversion is left alone; a killed one's temporary sibling is not a conversion and is cleaned up
    before = _tree_listing(out)
    assert convert_imagenet(src, out, verbose=False) is None
    assert _tree_listing(out) == before
    partial = out.parent / f".{out.name}.partial-killed"
    (partial / "train").mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("killed")
    with pytest.raises(FileNotFoundError, match="not a finished conversion"):
        StreamingImageNetDataModule(data_dir=str(partial)).setup("fit")
    with pytest.raises(Exception, match="must be outside --src"):
        convert_imagenet(src, src / "shards", verbose=False)


class _Killed(Exception):
    """Stands for the process being killed mid-epoch."""


class _Recorder:
    """A LightningModule (built lazily: lightning imports are slow) that records the red value of every
    training image and dies at step ``die_at`` as a killed run would."""

    @staticmethod
    def make(die_at: int = -1):
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[int] = []

            def training_step(self, batch, batch_idx):
                if self.global_step == die_at:
                    raise _Killed  # no checkpoint on the way out: the run resumes from the last periodic one
                self.seen += _reds(batch[0])
                return (self.weight * batch[0].mean()).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


def test_a_killed_run_resumes_mid_epoch_from_its_checkpoint(shards, tmp_path):
    """Lightning stores the StreamingDataLoader state in the checkpoint: kill after step 5 of 8 (checkpoint at
    step 3) -> resume from that checkpoint -> the epoch's other 5 batches, no image twice, none missing."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, out, colours, _ = shards
    train_reds = sorted(r for r, (p, _) in colours.items() if p.startswith("train/"))

    def fit(model, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=1,
            callbacks=[checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=StreamingImageNetDataModule(data_dir=str(out), **SMALL), ckpt_path=ckpt_path)

    killed = _Recorder.make(die_at=5)
    with pytest.raises(_Killed):
        fit(killed)
    assert len(killed.seen) == 15 and (tmp_path / "step=3.ckpt").is_file()
    checkpoint = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loader's position is saved
    resumed = _Recorder.make()
    fit(resumed, ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert len(resumed.seen) == 15
    assert sorted(killed.seen[:9] + resumed.seen) == train_reds


def test_the_streaming_recipe_is_the_folder_recipe_with_another_reader(capsys, monkeypatch):
    import yaml

    from aa_lightning.training.cli import AACLI

    monkeypatch.setattr("sys.argv", ["train.py"])

    def resolved(name: str) -> dict:
        with pytest.raises(SystemExit):
            AACLI(args=["--config", str(REPO / "configs" / name), "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    folder, streaming = resolved("imagenet_aa_resnet50.yaml"), resolved("imagenet_aa_resnet50_streaming.yaml")
    assert streaming["model"] == folder["model"] and streaming["trainer"] == folder["trainer"]
    assert streaming["data"]["class_path"] == "aa_lightning.data.StreamingImageNetDataModule"
    shared = {k: v for k, v in folder["data"]["init_args"].items() if k not in ("data_dir", "persistent_workers")}
    assert {k: streaming["data"]["init_args"][k] for k in shared} == shared  # same batch, sizes, augmentation


def test_a_remote_data_dir_stays_a_uri_and_its_stamp_is_fetched_through_litdata(shards, monkeypatch):
    import shutil

    _, out, _, _ = shards
    fetched = []

    class Downloader:  # stands for litdata's S3 client
        def download_file(self, remote: str, local: str) -> None:
            fetched.append(remote)
            shutil.copy(out / STAMP, local)

    monkeypatch.setattr("litdata.streaming.downloader.get_downloader", lambda *args, **kwargs: Downloader())
    dm = StreamingImageNetDataModule(data_dir="s3://bucket/imagenet_litdata/")
    assert dm._uri("train") == "s3://bucket/imagenet_litdata/train"
    assert dm._read_stamp()["classes"] == CLASSES and fetched == [f"s3://bucket/imagenet_litdata/{STAMP}"]


@pytest.mark.slow
def test_the_streaming_recipe_trains_under_ddp_and_tests_every_image_once(shards, tmp_path):
    """train.py with the streaming recipe (tiny overrides), 2 gloo processes: 24 images / (2 x 4) = 3 steps,
    and the test summary counts the 15 validation images once."""
    import re

    from helpers.cli_helpers import run_cli

    _, out, _, _ = shards
    result = run_cli(
        "--config",
        str(REPO / "configs" / "imagenet_aa_resnet50_streaming.yaml"),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--data.init_args.data_dir",
        str(out),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.train_size",
        "32",
        "--data.init_args.eval_size",
        "32",
        "--data.init_args.resize_size",
        "36",
        "--model.init_args.model_name",
        "test_resnet",
        "--model.init_args.num_classes",
        "3",
        "--model.init_args.warmup_epochs",
        "0",
        "--trainer.max_epochs",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.precision",
        "32-true",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"(\d+) optimizer steps", result.stdout).group(1) == "3"
    assert re.search(r"test \(last checkpoint, (\d+) images\)", result.stdout).group(1) == "15"


def test_without_litdata_the_module_imports_and_setup_says_what_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "litdata", None)  # `import litdata` now raises ImportError
    for name in ("aa_lightning.data.streaming", "aa_lightning.data.prepare"):
        monkeypatch.delitem(sys.modules, name)
    streaming = importlib.import_module("aa_lightning.data.streaming")
    dm = streaming.StreamingImageNetDataModule(data_dir="data/imagenet_litdata")
    with pytest.raises(ImportError, match=r"pip install 'aa-lightning\[streaming\]'"):
        dm.setup("fit")


def test_a_failed_conversion_leaves_nothing_and_overwrite_keeps_foreign_files(tmp_path, monkeypatch):
    import litdata

    src = tmp_path / "imagenet"
    for split in ("train", "val"):
        (src / split / "n0").mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 0, 0)).save(src / split / "n0" / "a.JPEG")
    real_optimize = litdata.optimize

    def dies_after_train(**kwargs):
        if kwargs["output_dir"].endswith("val"):
            raise RuntimeError("killed")
        real_optimize(**kwargs)

    monkeypatch.setattr(litdata, "optimize", dies_after_train)
    with pytest.raises(RuntimeError, match="killed"):
        convert_imagenet(src, tmp_path / "shards", num_workers=1, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet"]  # no --out, no temporary sibling
    monkeypatch.setattr(litdata, "optimize", real_optimize)
    first = convert_imagenet(src, tmp_path / "shards", num_workers=1, verbose=False)
    assert convert_imagenet(src, tmp_path / "shards", num_workers=1, overwrite=True, verbose=False) == {
        **first,
        "seconds": json.loads((tmp_path / "shards" / STAMP).read_text())["seconds"],
    }
    (tmp_path / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"did not write: \['notes.txt'\]"):
        convert_imagenet(src, tmp_path / "shards", num_workers=1, overwrite=True, verbose=False)
    assert (tmp_path / "shards" / "notes.txt").read_text() == "mine"
