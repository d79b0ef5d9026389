"""Fixtures shared by several test modules. The test folders mirror the package (tests/layers/, tests/models/, ...);
shared helpers live in the ``helpers`` package (tests/helpers/: cli_helpers, attention_loop_reference, ...), imported
as ``helpers.<module>``: pytest puts this folder on sys.path (rootdir conftest, no __init__.py)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_classifier import fit_and_save
from PIL import Image
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model
from timm.models.resnet import BasicBlock, ResNet

from aa_lightning.data import SyntheticCIFARDataModule
from aa_lightning.layers import AugmentedConv2d


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the default run: one worker per core), each worker gets its share of the cores, for torch
    and for the processes the tests start: 2 workers x 2 OpenMP threads on 2 cores crawl (spinning threads). A test
    that is about threads sets its own count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(scope="module")
def one_thread():
    """Small models gain little from threads, and spinning OpenMP threads crawl on a shared 2-core
    CPU. Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a tiny timm-registered AA network (in-process only: the subprocess tests use the model zoo) --
default_cfgs = generate_default_cfgs(
    {
        "predict_tiny_aa.untrained": {
            "input_size": (3, 32, 32),
            "num_classes": 4,
            "classifier": "fc",
            "first_conv": "conv1.0",
        }
    }
)


@register_model
def predict_tiny_aa(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet of 8-16 channels; the first conv of the blocks of stages 1 and 2 augmented (2 heads, 8x8 and 4x4
    grids)."""
    model = build_model_with_cfg(
        ResNet,
        "predict_tiny_aa",
        False,
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        channels=(8, 16, 16, 16),
        stem_width=4,
        stem_type="deep",
        **kwargs,
    )
    model.layer1[0].conv1 = AugmentedConv2d(8, 8, 3, 1, dk=4, dv=4, num_heads=2, feat_size=8)
    model.layer2[0].conv1 = AugmentedConv2d(8, 16, 3, 2, dk=8, dv=8, num_heads=2, feat_size=8)
    if pretrained:  # after the swap, so that the AA weights load
        load_pretrained(model, num_classes=model.num_classes)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Lightning checkpoint of ImageClassifier(predict_tiny_aa) after 2 steps on the built-in data set."""
    root = tmp_path_factory.mktemp("inspect")
    data = SyntheticCIFARDataModule(
        data_dir=str(root / "data"), num_classes=4, train_size=16, test_size=8, val_split=4, batch_size=4, num_workers=0
    )
    return fit_and_save(data, 4, root / "tiny.ckpt", max_steps=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    jpg, png = folder / "wide.jpg", folder / "gray.png"
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(jpg)  # resized + center-cropped to 32
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(png)  # grayscale -> RGB
    return [jpg, png]
