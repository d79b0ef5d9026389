"""Decoded + augmented training images per second: the folder reader, the litdata reader and timm's loader.

On a generated ImageNet-like set (``--images`` JPEGs of 500x375 in ``--classes`` class folders, also
converted to litdata shards), each reader produces the recipe's training batches (RandomResizedCrop
224, scale 0.08-1, ratio 3/4-4/3, bilinear, flip, normalize; float32 [B, 3, 224, 224]):

- ``folder``: :class:`aa_lightning.data.ImageNetDataModule` (PIL draft decode + albumentations);
- ``litdata``: :class:`aa_lightning.data.StreamingImageNetDataModule` on the shards (same decode + pipeline);
- ``litdata-sequential``: the same with litdata's shuffle off (chunks and samples in storage order): what the
  training shuffle (a new chunk order and a full permutation inside each chunk every epoch) costs;
- ``timm``: ``timm.data.create_dataset`` + ``create_loader`` on the same folders (PIL decode, torchvision-style
  PIL transforms; ``color_jitter=0`` and no prefetcher, so that it does the same work in its workers);
- ``<reader>+modern``: the same reader with the modern per-sample augmentation of the "ResNet strikes back"
  recipes, RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (ours: ``auto_augment`` /
  ``random_erasing`` of the data modules; timm: ``auto_augment`` / ``re_prob`` of ``create_loader``). Batch
  mixing (mixup / cutmix) is not in the workers: the task mixes each batch on the device; its CPU cost is the
  ``timm Mixup`` row of the per-sample table.

For every worker count, each reader gets ``--rounds`` rounds; the readers take turns round by round
(so that load from other jobs hits them alike) and the median round is reported. A round builds a
fresh loader, waits for its first ``workers`` batches (start-up) and times the next ``--batches``.
OpenCV and torch run one thread per process, so that 1 worker = 1 core. Then, in this process, the
parts of one sample: decoders (PIL full / draft, OpenCV full / IMREAD_REDUCED_COLOR_2,
torchvision.io.decode_jpeg) and the augmentation alone.

Usage:
  python benchmarks/data_benchmark.py --workers 1 2 --rounds 3 --out-dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from report import command_line, write_report  # noqa: E402

cv2.setNumThreads(1)
torch.set_num_threads(1)
TRAIN_SIZE = 224
#: the modern per-sample augmentation of the "+modern" readers ("ResNet strikes back" A2-like: RandAugment m9)
RAND_AUGMENT, RANDOM_ERASING = "rand-m9-mstd0.5-inc1", 0.25
MODERN = {"auto_augment": RAND_AUGMENT, "random_erasing": RANDOM_ERASING}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/aa_data_benchmark", help="generated images and shards (re-used)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-samples", type=int, default=200, help="images for the per-part timings")
    p.add_argument(
        "--readers",
        nargs="+",
        default=["folder", "folder+modern", "litdata", "litdata-sequential", "timm", "timm+modern"],
        help="folder, litdata, litdata-sequential, timm; '+modern' adds RandAugment m9 + random erasing 0.25",
    )
    p.add_argument("--out-dir", default=None, help="write data.json / data.md here")
    return p.parse_args(argv)


def generate(root: Path, images: int, classes: int) -> None:
    """``root/train/cNN/*.JPEG`` (500x375, photo-like: smooth colour fields + grain, quality 90) and a small val/."""
    if (root / "train").is_dir():
        return
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 10, (375, 500, 3)).astype(np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.JPEG", quality=90)
    for c in range(classes):  # the converter wants val/ with the same classes
        (root / "val" / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        first = next((root / "train" / f"c{c:02d}").iterdir())
        (root / "val" / f"c{c:02d}" / first.name).write_bytes(first.read_bytes())


def make_loader(reader: str, root: Path, shards: Path, workers: int, batch: int):
    reader, plus, modern = reader.partition("+")
    if plus and modern != "modern":
        raise ValueError(f"--readers: unknown suffix +{modern} (only +modern)")
    augment = MODERN if plus else {}
    if reader == "folder":
        from aa_lightning.data import ImageNetDataModule

        dm = ImageNetDataModule(
            data_dir=str(root),
            batch_size=batch,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=False,
            **augment,
        )
        dm.setup("fit")
        return dm.train_dataloader()
    if reader in ("litdata", "litdata-sequential"):
        from aa_lightning.data import StreamingImageNetDataModule

        dm = StreamingImageNetDataModule(
            data_dir=str(shards), batch_size=batch, num_workers=workers, pin_memory=False, **augment
        )
        dm.setup("fit")
        if reader == "litdata-sequential":
            dm.train_set.set_shuffle(False)
        return dm.train_dataloader()
    if reader == "timm":
        from timm.data import create_dataset, create_loader

        dataset = create_dataset("", root=str(root), split="train", is_training=True)
        loader = create_loader(
            dataset,
            input_size=(3, TRAIN_SIZE, TRAIN_SIZE),
            batch_size=batch,
            is_training=True,
            num_workers=workers,
            use_prefetcher=False,
            color_jitter=0.0,
            interpolation="bilinear",
            persistent_workers=False,
            pin_memory=False,
            device=torch.device("cpu"),
            auto_augment=RAND_AUGMENT if plus else None,
            re_prob=RANDOM_ERASING if plus else 0.0,
        )
        _posterize_zero_bits_to_black(loader.dataset.transform)
        return loader
    raise ValueError(f"--readers: unknown reader {reader!r} (folder, litdata, litdata-sequential, timm; +modern)")


def _posterize_zero_bits_to_black(transform) -> None:
    """timm's RandAugment inside ``transform`` (a torchvision ``Compose``) made to survive Pillow 13, as ours is
    (:func:`aa_lightning.data.augment.posterize_zero_bits_to_black`): timm 1.0.31's own loader stops with
    "bits must be between or equal to 1 and 8" within a few hundred images of rand-m9-mstd0.5-inc1."""
    from timm.data.auto_augment import RandAugment

    from aa_lightning.data.augment import posterize_zero_bits_to_black

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            posterize_zero_bits_to_black(step)


def time_round(reader: str, root: Path, shards: Path, workers: int, batch: int, batches: int) -> float:
    """Images/s of one fresh loader over ``batches`` batches after its first ``max(1, workers)`` batches."""
    iterator = iter(make_loader(reader, root, shards, workers, batch))
    for _ in range(max(1, workers)):
        images, _ = next(iterator)
    assert images.shape[1:] == (3, TRAIN_SIZE, TRAIN_SIZE), images.shape
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = next(iterator)
        count += len(images)
    rate = count / (time.perf_counter() - start)
    del iterator
    return rate


def per_sample_parts(files: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each decoder and of the augmentation alone, in this process."""
    import torchvision.io as tio
    from timm.data import create_transform

    from aa_lightning.data.imagenet import RGBLoader
    from aa_lightning.data.transforms import imagenet_train_transform

    blobs = [f.read_bytes() for f in files]
    arrays = [np.frombuffer(b, np.uint8) for b in blobs]
    import io

    decoders = {
        "PIL decode (full size)": lambda b, a: RGBLoader()(io.BytesIO(b)),
        f"PIL decode, draft mode for {TRAIN_SIZE} (ours)": lambda b, a: RGBLoader(TRAIN_SIZE)(io.BytesIO(b)),
        "PIL decode, draft to 1/2 (below 224 here)": lambda b, a: _pil_draft_half(b),
        "OpenCV imdecode (full size)": lambda b, a: cv2.cvtColor(cv2.imdecode(a, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB),
        "OpenCV IMREAD_REDUCED_COLOR_2": lambda b, a: cv2.imdecode(a, cv2.IMREAD_REDUCED_COLOR_2),
        "torchvision.io.decode_jpeg (CPU)": lambda b, a: tio.decode_jpeg(torch.from_numpy(a.copy())),
    }
    results = {}
    for name, decode in decoders.items():
        start = time.perf_counter()
        for b, a in zip(blobs, arrays):
            decode(b, a)
        results[name] = 1000 * (time.perf_counter() - start) / len(blobs)
    decoded = [RGBLoader(TRAIN_SIZE)(io.BytesIO(b)) for b in blobs]
    ours = imagenet_train_transform(TRAIN_SIZE)
    start = time.perf_counter()
    for index, image in enumerate(decoded):
        ours.set_random_seed(index)  # as the training loaders do per sample
        ours(image)
    ms = 1000 * (time.perf_counter() - start) / len(decoded)
    results["augmentation only: ours (albumentations RRC+flip+normalize, re-seeded per sample)"] = ms
    start = time.perf_counter()
    for index in range(len(decoded)):
        ours.set_random_seed(index)
    ms = 1000 * (time.perf_counter() - start) / len(decoded)
    results["  of which re-seeding the albumentations pipeline from (seed, epoch, index)"] = ms
    from aa_lightning.data.augment import AugmentSettings

    modern = imagenet_train_transform(TRAIN_SIZE, augment=AugmentSettings(**MODERN))
    start = time.perf_counter()
    for index, image in enumerate(decoded):
        modern.set_random_seed(index)  # as the training loaders do per sample
        modern(image)
    ms = 1000 * (time.perf_counter() - start) / len(decoded)
    results[f"augmentation only: ours + RandAugment {RAND_AUGMENT} + random erasing {RANDOM_ERASING}"] = ms
    theirs = create_transform(TRAIN_SIZE, is_training=True, color_jitter=0.0, interpolation="bilinear")
    pil_images = [Image.fromarray(image) for image in decoded]
    start = time.perf_counter()
    for image in pil_images:
        theirs(image)
    ms = 1000 * (time.perf_counter() - start) / len(decoded)
    results["augmentation only: timm (PIL RRC+flip, ToTensor, normalize)"] = ms
    theirs = create_transform(
        TRAIN_SIZE,
        is_training=True,
        color_jitter=0.0,
        interpolation="bilinear",
        auto_augment=RAND_AUGMENT,
        re_prob=RANDOM_ERASING,
    )
    _posterize_zero_bits_to_black(theirs)
    start = time.perf_counter()
    for image in pil_images:
        theirs(image)
    ms = 1000 * (time.perf_counter() - start) / len(decoded)
    results[f"augmentation only: timm + RandAugment {RAND_AUGMENT} + random erasing {RANDOM_ERASING}"] = ms
    results.update(modern_parts(decoded))
    results.update(mixup_cost())
    return results


def modern_parts(decoded: list[np.ndarray]) -> dict[str, float]:
    """ms per image of the parts of our RandAugment step: timm's operations alone (on PIL images of the 224 crops,
    the global generators seeded per image) and the per-sample seeding + restoring of the global generators."""
    import random

    import albumentations as A

    from aa_lightning.data.augment import AugmentSettings, seeded_global_generators

    crop = A.RandomResizedCrop(size=(TRAIN_SIZE, TRAIN_SIZE), scale=(0.08, 1.0), p=1.0)
    crops = [crop(image=image)["image"] for image in decoded]
    pil_crops = [Image.fromarray(image) for image in crops]
    rand_augment = AugmentSettings(auto_augment=RAND_AUGMENT).image_steps(TRAIN_SIZE, (0.5, 0.5, 0.5))[0]
    operations = rand_augment.function.operation
    start = time.perf_counter()
    for index, image in enumerate(pil_crops):
        random.seed(index)
        np.random.seed(index)
        operations(image)
    operations_ms = 1000 * (time.perf_counter() - start) / len(crops)
    start = time.perf_counter()
    for index in range(len(crops)):
        with seeded_global_generators(index):
            pass
    seeding_ms = 1000 * (time.perf_counter() - start) / len(crops)
    start = time.perf_counter()
    for index, image in enumerate(crops):
        rand_augment.apply(image, global_seed=index)
    step_ms = 1000 * (time.perf_counter() - start) / len(crops)
    return {
        f"RandAugment {RAND_AUGMENT}: timm's operations alone (PIL, 224 crop)": operations_ms,
        "  our step around them: seeding + restoring Python's / numpy's / torch's global generators": seeding_ms,
        "  our whole step (seeding, uint8 <-> PIL, the operations)": step_ms,
    }


def mixup_cost(batch: int = 32, repeats: int = 20) -> dict[str, float]:
    """ms per image of timm's ``Mixup`` (mixup 0.8 / cutmix 1.0, switch 0.5, label smoothing 0.1, 1000 classes)
    on a CPU batch [batch, 3, 224, 224]: in training it runs on the device, in the task, not in the workers."""
    from timm.data import Mixup

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=1000)
    images = torch.randn(batch, 3, TRAIN_SIZE, TRAIN_SIZE)
    targets = torch.randint(0, 1000, (batch,))
    start = time.perf_counter()
    for _ in range(repeats):
        mixup(images, targets)  # in place, as in training
    ms = 1000 * (time.perf_counter() - start) / (repeats * batch)
    return {f"timm Mixup / CutMix of a CPU batch of {batch} (per image; on the device in training)": ms}


def _pil_draft_half(blob: bytes) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(blob)) as image:
        image.draft("RGB", (image.width // 2, image.height // 2))
        return np.asarray(image.convert("RGB"))


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.work_dir) / "imagenet"
    shards = Path(args.work_dir) / "imagenet_litdata"
    t0 = time.perf_counter()
    generate(root, args.images, args.classes)
    if not shards.exists():
        from aa_lightning.data.prepare import convert_imagenet

        convert_imagenet(root, shards, num_workers=2, verbose=False)
    files = sorted((root / "train").rglob("*.JPEG"))
    mean_kb = statistics.mean(f.stat().st_size for f in files) / 1024
    print(f"{len(files)} JPEGs (500x375, mean {mean_kb:.0f} KiB) ready in {time.perf_counter() - t0:.0f} s", flush=True)

    rates = {(r, w): [] for r in args.readers for w in args.workers}
    for round_ in range(args.rounds):
        for workers in args.workers:
            order = args.readers[round_ % len(args.readers) :] + args.readers[: round_ % len(args.readers)]
            for reader in order:
                rate = time_round(reader, root, shards, workers, args.batch, args.batches)
                rates[reader, workers].append(rate)
                print(f"round {round_}  {reader:8s} {workers} worker(s): {rate:7.1f} images/s", flush=True)
    rows = []
    for (reader, workers), values in rates.items():
        rows.append(
            {
                "reader": reader,
                "workers": workers,
                "images_per_s": statistics.median(values),
                "per_worker": statistics.median(values) / workers,
                "rounds": values,
            }
        )
    parts = per_sample_parts(files[: args.decode_samples])

    header = (
        f"{date.today()}, {platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, {len(files)} JPEGs 500x375 (mean {mean_kb:.0f} KiB), batch {args.batch}, "
        f"{TRAIN_SIZE} px train pipeline, median of {args.rounds} alternating rounds of {args.batches} batches"
    )
    lines = [
        "| reader | workers | images/s | images/s per worker | cores per GPU at 2,500 img/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['reader']} | {row['workers']} | {row['images_per_s']:.0f} | {row['per_worker']:.0f} | "
            f"{2500 / row['per_worker']:.1f} |"
        )
    lines += [
        "",
        f"`+modern`: RandAugment `{RAND_AUGMENT}` + random erasing {RANDOM_ERASING} in the workers; mixup / cutmix "
        "run on the device in the task (their CPU cost: the `timm Mixup` row below).",
    ]
    lines += ["", "| one sample, one thread | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in parts.items()]
    table = "\n".join(lines)
    print(header + "\n\n" + table)
    if args.out_dir:
        write_report(args.out_dir, "data", header, rows, table, command_line("data_benchmark.py", argv), parts_ms=parts)


if __name__ == "__main__":
    main()
