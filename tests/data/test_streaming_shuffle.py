"""Streamed training batches mix the classes as the folder reader's do (issue 22, item 5): the converter writes
each split in a seeded random order (every chunk holds a mix of the classes), and litdata's shuffle (chunk
order, full permutation inside a chunk) does the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.streaming_helpers import write_tree

pytest.importorskip("litdata")

from aa_lightning.data import ImageNetDataModule, StreamingImageNetDataModule  # noqa: E402
from aa_lightning.data.prepare import STAMP, convert_imagenet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = [f"n{i:02d}" for i in range(10)]
PER_CLASS = 16  # 160 training images, 10 batches of 16
SMALL = dict(batch_size=16, num_workers=0, train_size=8, eval_size=8, resize_size=8)


def distinct_classes_per_batch(dm) -> float:
    dm.setup("fit")
    counts = [len(set(labels.tolist())) for _, labels in dm.train_dataloader()]
    assert len(counts) == len(CLASSES) * PER_CLASS // SMALL["batch_size"]
    return float(np.mean(counts))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shuffle")
    write_tree(base / "imagenet", {"train": PER_CLASS, "val": 1}, CLASSES)
    # ~30 images a chunk: 6 chunks, each as large as 3 classes' images
    convert_imagenet(base / "imagenet", base / "shards", num_workers=1, chunk_bytes="40KB", verbose=False)
    return base / "imagenet", base / "shards"


def test_the_converter_writes_the_samples_in_a_seeded_random_order(converted):
    import litdata

    _, shards = converted
    assert json.loads((shards / STAMP).read_text())["seed"] == 0
    chunks = json.loads((shards / "train" / "index.json").read_text())["chunks"]
    assert len(chunks) >= 4
    dataset = litdata.StreamingDataset(str(shards / "train"))
    labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    assert sorted(labels) == [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]  # every image once
    start = 0
    for chunk in chunks:  # class by class, a chunk of 30 images would hold 2-3 classes
        in_chunk = labels[start : start + chunk["chunk_size"]]
        start += chunk["chunk_size"]
        assert len(set(in_chunk)) >= min(6, len(in_chunk) // 2), in_chunk


def test_streamed_batches_mix_the_classes_like_the_folder_readers(converted):
    src, shards = converted
    folder = distinct_classes_per_batch(ImageNetDataModule(data_dir=str(src), persistent_workers=False, **SMALL))
    streamed = distinct_classes_per_batch(StreamingImageNetDataModule(data_dir=str(shards), **SMALL))
    assert folder > 7.0  # 16 draws from 10 classes: 8.2 distinct on average
    assert streamed >= folder - 1.0, (streamed, folder)  # class by class: 2.6 distinct per batch
