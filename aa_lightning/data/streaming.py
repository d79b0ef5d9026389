"""ImageNet from litdata shards (``python -m aa_lightning.data.prepare imagenet``), local or remote.

:class:`StreamingImageNetDataModule` is the folder reader (:class:`~aa_lightning.data.ImageNetDataModule`:
the same arguments, draft-mode JPEG decoding and albumentations pipelines) reading
``data_dir/{train,val}`` through ``litdata.StreamingDataset`` / ``StreamingDataLoader``. ``data_dir`` is
a local folder or a URI (``s3://``, ``gs://``, ``azure://`` ...; chunks are cached in ``cache_dir``).

- DDP: litdata gives every rank a disjoint set of chunks (no sampler). Training drops the few
  samples that would make the ranks' step counts differ; validation keeps them (``drop_last=False``),
  so every validation image is evaluated exactly once over all ranks.
- Resuming: ``StreamingDataLoader`` has ``state_dict`` / ``load_state_dict``, which Lightning stores in
  every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores, so a run resumed from a
  mid-epoch checkpoint continues the epoch without repeating or skipping samples (with the same number
  of devices and workers) and then runs every later epoch in full, as the uninterrupted run does
  (:class:`~aa_lightning.data.streaming_loader.ResumableStreamingDataLoader`). Each training sample's
  augmentation is seeded from (seed, epoch, index in the shards), as the folder reader's is, so the resumed
  run also augments every sample as the uninterrupted one. Workers are not persistent: they restart each
  epoch and pick up litdata's epoch (its shuffle) from the loader.
- Shuffle: litdata permutes the chunks every epoch and (``item_shuffle_window="full"``) all samples inside a
  chunk, but each worker reads one chunk at a time; the converter writes the samples in a seeded random order,
  so a chunk, and a batch, mixes the classes as the folder reader's do.
- A remote ``data_dir`` that cannot be read (no credentials, no access) raises :class:`ObjectStoreError`, one
  line naming the URI (and, for credentials, the settings that provide them).
- A sample that cannot be decoded raises :class:`~aa_lightning.data.imagenet.ImageDecodeError` naming
  its source path (stored by the converter).

litdata is imported when the data are set up, so this module imports without it.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from typing import Any

from .imagenet import ImageDecodeError, ImageNetDataModule, RGBLoader
from .transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform, imagenet_train_transform

_INSTALL_HINT = "the streaming ImageNet reader needs litdata: pip install 'aa-lightning[streaming]' (or litdata)"


def _litdata():
    try:
        import litdata
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return litdata


class ObjectStoreError(OSError):
    """A remote ``data_dir`` that cannot be read (no credentials, no access, no such bucket or file)."""


_CREDENTIAL_WORDS = ("credential", "unauthenticated", "unauthorized", "accessdenied", "access denied", "forbidden")


def object_store_error(uri: str, err: BaseException) -> ObjectStoreError:
    """A one-line :class:`ObjectStoreError` naming ``uri`` for an error of litdata's object-store client
    (missing credentials get the settings that provide them)."""
    text = f"{type(err).__name__}: {err}"
    cause = " ".join(text.split())[:200]
    if any(word in text.lower() for word in _CREDENTIAL_WORDS):
        return ObjectStoreError(
            f"data.data_dir: cannot read {uri}: no valid credentials for the object store ({cause}). Provide them "
            "as for the store's own command-line tool (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY) or in data.storage_options"
        )
    return ObjectStoreError(f"data.data_dir: cannot read {uri} ({cause})")


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage (``scheme://...``) rather than a local folder."""
    return "://" in uri


class DecodeAndTransform:
    """litdata sample ``{"image": JPEG bytes, "label", "path"}`` -> ``(transform(RGB uint8 image), label)``.

    Decodes as the folder reader does (:class:`RGBLoader`: draft mode down to ``min_size``); a sample
    that cannot be decoded raises :class:`ImageDecodeError` naming its source path and the shards.
    """

    def __init__(self, transform: Callable, min_size: int | None, shards: str) -> None:
        self.transform = transform
        self.loader = RGBLoader(min_size)
        self.shards = shards

    def set_random_seed(self, seed: int) -> None:
        """Re-seed the transform (:class:`~aa_lightning.data.streaming_loader.SeededStreamingDataset` does it
        before every training sample); a transform without ``set_random_seed`` is left as it is."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        try:
            image = self.loader(io.BytesIO(sample["image"]))
        except ImageDecodeError as err:
            raise ImageDecodeError(
                f"cannot decode image {sample['path']} "
                f"(source path of a sample in the shards {self.shards}): {err.__cause__}"
            ) from err.__cause__
        return self.transform(image), int(sample["label"])


class StreamingImageNetDataModule(ImageNetDataModule):
    """ImageNet train/val loaders from litdata shards written by ``python -m aa_lightning.data.prepare imagenet``.

    Args:
        data_dir: folder or URI (``s3://bucket/imagenet_litdata``) holding ``train/``, ``val/`` and the
            converter's stamp ``aa_lightning_shards.json``.
        cache_dir: local folder for the chunks of a remote ``data_dir`` (default: litdata's).
        max_cache_size: most disk space the cached chunks of one split may take, e.g. ``"100GB"``.
        storage_options: passed to litdata's object-store client (credentials, endpoint, ...).
        Other arguments: as :class:`~aa_lightning.data.ImageNetDataModule` (``seed`` also seeds the shuffle;
            ``auto_augment``, ``color_jitter`` and ``random_erasing*``: the per-sample augmentation).
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet_litdata",
        batch_size: int = 128,
        num_workers: int = 8,
        train_size: int = 224,
        eval_size: int = 224,
        resize_size: int = 256,
        min_scale: float = 0.08,
        hflip: bool = True,
        draft: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
        pin_memory: bool | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        storage_options: dict[str, Any] | None = None,
        auto_augment: str | None = None,
        color_jitter: float | None = None,
        random_erasing: float = 0.0,
        random_erasing_mode: str = "const",
        random_erasing_count: int = 1,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            train_size=train_size,
            eval_size=eval_size,
            resize_size=resize_size,
            min_scale=min_scale,
            hflip=hflip,
            draft=draft,
            mean=mean,
            std=std,
            seed=seed,
            pin_memory=pin_memory,
            persistent_workers=False,
            auto_augment=auto_augment,
            color_jitter=color_jitter,
            random_erasing=random_erasing,
            random_erasing_mode=random_erasing_mode,
            random_erasing_count=random_erasing_count,
        )
        # a URI stays a URI (Path would fold "s3://" to "s3:/"); file:// is a local folder
        self.data_dir = str(data_dir).removeprefix("file://").rstrip("/")
        self.stamp: dict[str, Any] | None = None

    def _uri(self, split: str) -> str:
        return f"{self.data_dir}/{split}"

    def _read_stamp(self) -> dict[str, Any]:
        """The converter's stamp (classes, sample counts), fetched first when ``data_dir`` is remote."""
        from .prepare import STAMP, read_stamp  # here: `python -m aa_lightning.data.prepare` runs it as __main__

        if is_remote(self.data_dir):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local, remote = os.path.join(tmp, STAMP), f"{self.data_dir}/{STAMP}"
                try:
                    get_downloader(self.data_dir, tmp, [], self.hparams.storage_options or {}).download_file(
                        remote, local
                    )
                except Exception as err:  # each store's client raises its own types (obstore, boto3, gcsfs, ...)
                    raise object_store_error(remote, err) from err
                stamp = read_stamp(tmp)
        else:
            stamp = read_stamp(self.data_dir)
        if stamp is None:
            raise FileNotFoundError(
                f"{self.data_dir} is not a finished conversion: no valid {STAMP} in it. Write the shards with "
                f"`python -m aa_lightning.data.prepare imagenet --src data/imagenet --out {self.data_dir}`"
            )
        return stamp

    def _dataset(self, split: str, transform: Callable, min_size: int | None, train: bool) -> Any:
        hp = self.hparams
        _litdata()
        from .streaming_loader import SeededStreamingDataset

        return SeededStreamingDataset(
            self._uri(split),
            cache_dir=hp.cache_dir,
            max_cache_size=hp.max_cache_size,
            storage_options=hp.storage_options or {},
            shuffle=train,
            drop_last=train,  # val: every image once over all ranks
            seed=hp.seed,
            item_shuffle_window="full",  # a full permutation inside each chunk (litdata's default: blocks of 256)
            transform=DecodeAndTransform(transform, min_size, self._uri(split)),
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        _litdata()
        self.stamp = self._read_stamp()
        self.class_names = list(self.stamp["classes"])
        self.num_classes = len(self.class_names)
        eval_transform = imagenet_eval_transform(hp.eval_size, hp.resize_size, self.mean, self.std)
        self.val_set = self._dataset("val", eval_transform, hp.resize_size if hp.draft else None, train=False)
        self.test_set = self.val_set  # ILSVRC-2012's labelled val images are also the test set
        if stage in (None, "fit"):
            train_transform = imagenet_train_transform(
                hp.train_size, (hp.min_scale, 1.0), hp.hflip, self.mean, self.std, seed=hp.seed, augment=self.augment
            )
            self.train_set = self._dataset("train", train_transform, hp.train_size if hp.draft else None, train=True)

    def _run_epoch(self) -> int | None:
        """The trainer's epoch (None outside a trainer): a restored training loader leaves its epoch when it moves."""
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _loader(self, dataset: Any, train: bool) -> Any:
        import torch

        pin_memory = self.hparams.pin_memory
        _litdata()
        from .streaming_loader import ResumableStreamingDataLoader

        return ResumableStreamingDataLoader(
            dataset,
            run_epoch=self._run_epoch,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        )
