"""The built-in offline data set, written in CIFAR-100's on-disk format and read by the CIFAR loader.

``SyntheticCIFARDataModule`` renders :mod:`.synthetic_relations` images (classes = the direction
from a square to a plus sign far apart in the image) into ``data_dir/cifar-100-python/`` the
first time it is needed (a few seconds), records how it made them in
``data_dir/synthetic.json``, and from then on behaves exactly like :class:`CIFAR100DataModule`
reading real CIFAR-100. Changing a generation argument regenerates the files. It writes only
into a missing or empty ``data_dir`` or one it generated (the stamp): pointed at any other
folder, e.g. real CIFAR-100, it stops with a ``ValueError`` instead of overwriting it.

The classes are not mirror-symmetric (a horizontal flip turns "up-left" into "up-right"), so
horizontal flips are off by default here; the pad-and-crop shift keeps the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cifar import CIFAR100DataModule
from ..cifar_format import BASE_FOLDER, write_cifar100
from .generated import write_generated_set
from .relations import relation_class_names, render_relation_images

FORMAT_VERSION = 1
STAMP = "synthetic.json"


def write_synthetic_cifar(
    data_dir: str, num_classes: int = 10, train_size: int = 10000, test_size: int = 2000, data_seed: int = 0
) -> bool:
    """Render and write the data set unless ``data_dir`` already holds it; returns True if written.

    ``data_dir`` must be missing, empty or a folder this function generated (``synthetic.json``
    stamp): any other folder is a ``ValueError``, so real data (e.g. CIFAR-100's own
    ``cifar-100-python/``) is never overwritten. The set is written into a temporary sibling and
    renamed into place (:func:`.generated.write_generated_set`).
    """
    spec = {
        "generator": "relations",
        "version": FORMAT_VERSION,
        "num_classes": num_classes,
        "train_size": train_size,
        "test_size": test_size,
        "data_seed": data_seed,
    }

    def write(folder: Path) -> None:
        splits = {
            "train": render_relation_images(train_size, num_classes, seed=2 * data_seed),
            "test": render_relation_images(test_size, num_classes, seed=2 * data_seed + 1),
        }
        names = relation_class_names(num_classes)
        # coarse labels: does the plus lie in the upper (0) or lower (1) half-plane of the square?
        coarse = [0 if 0 <= c * 360 / num_classes < 180 else 1 for c in range(num_classes)]
        write_cifar100(
            folder, splits, names, coarse, ("plus_above_square", "plus_below_square"), filename_prefix="relations"
        )

    return write_generated_set(
        data_dir,
        STAMP,
        spec,
        lambda found: [f"{BASE_FOLDER}/{name}" for name in ("train", "test", "meta")],
        write,
        is_own_stamp=lambda found: found.get("generator") == "relations",
        what="the built-in synthetic data set (SyntheticCIFARDataModule)",
    )


class SyntheticCIFARDataModule(CIFAR100DataModule):
    """CIFAR-format built-in data: ``num_classes`` spatial-relation classes, 32x32 RGB.

    Args:
        data_dir: where ``cifar-100-python/`` and ``synthetic.json`` are written.
        num_classes: angular sectors = classes (chance accuracy is 1 / num_classes).
        train_size, test_size: images in the train and test pickles (balanced classes).
        data_seed: seed of the images (the train and test sets use different streams).
        hflip: off by default: flips change the class of this data.
        **kwargs: the :class:`CIFAR100DataModule` arguments (batch_size, num_workers, val_split, ...).
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic_relations",
        num_classes: int = 10,
        train_size: int = 10000,
        test_size: int = 2000,
        data_seed: int = 0,
        hflip: bool = False,
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"data.num_classes must be >= 2, got {num_classes}")
        if train_size < num_classes or test_size < num_classes:
            raise ValueError(
                f"data.train_size and data.test_size must be >= num_classes ({num_classes}), "
                f"got {train_size}, {test_size}"
            )
        kwargs.pop("download", None)
        super().__init__(data_dir=data_dir, hflip=hflip, download=False, **kwargs)
        self.generation = dict(num_classes=num_classes, train_size=train_size, test_size=test_size, data_seed=data_seed)

    def prepare_data(self) -> None:
        """Generate the files if they are missing or were made with other arguments (local rank 0)."""
        write_synthetic_cifar(str(self.data_dir), **self.generation)
