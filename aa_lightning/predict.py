"""Inspect a trained classifier on your own images: top-k predictions and attention overlays.

    python -m aa_lightning.predict --ckpt runs/quickstart/version_0/checkpoints/last.ckpt \\
        --images cat.jpg dog.png --out predictions/ [--layer stages.2.3.conv1] [--queries 0.5,0.5 0.2,0.8]

For every image it writes ``<out>/<image stem>.png``: the top-k classes with probabilities, and
for each query pixel the input and every head's attention map of ``--layer`` (default: the
last AA layer) overlaid on it (see :mod:`aa_lightning.viz.overlay`); and
``<out>/predictions.json`` with the numbers.

The checkpoint is a Lightning ``.ckpt`` of :class:`~aa_lightning.tasks.ImageClassifier` (read
with ``torch.load(weights_only=True)``: no code is unpickled) or a folder written by
``python -m aa_lightning.export`` (``config.json`` + ``model.safetensors``). The network is
rebuilt from the checkpoint's ``model_name`` / ``model_kwargs``; images get the evaluation
preprocessing of the checkpoint's data module (resize the short side, center crop, normalize with
its mean / std). Class names come from ``--class-names`` (a text file, one per line), else the
checkpoint, else the data module's files when they are still on disk, else ``class <i>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

import aa_lightning  # noqa: F401  (registers the AA models with timm)
from aa_lightning.atomic_files import atomic_open, write_text_atomic
from aa_lightning.callbacks.attention_maps import default_layer
from aa_lightning.commands import CommandError, prepare_out_folder, run_command
from aa_lightning.data.images import rgb_array
from aa_lightning.layers import augmented_layers, capture_attention
from aa_lightning.models.weights import Checkpoint, load_checkpoint, read_checkpoint
from aa_lightning.viz.overlay import attention_figure, denormalize

CLASSIFIER_CLASS_PATH = "aa_lightning.tasks.ImageClassifier"
CIFAR_IMAGE_SIZE = 32


@dataclass
class TrainedClassifier:
    """A timm classifier rebuilt from a checkpoint, with what is needed to feed it images.

    model: the timm network in eval mode; mean / std: per-channel normalization of [0, 1] pixels;
    image_size / resize_size: evaluation crop and short-side resize (pixels).
    """

    model: nn.Module
    model_name: str
    num_classes: int
    source: Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    image_size: int = 224
    resize_size: int = 256

    def class_name(self, index: int) -> str:
        names = self.class_names or []
        return names[index] if index < len(names) else f"class {index}"


# -- checkpoints ---------------------------------------------------------------------------------------
def read_lightning_checkpoint(path: Path) -> Checkpoint:
    """:func:`~aa_lightning.models.weights.read_checkpoint` of a Lightning checkpoint; errors as CommandError."""
    try:
        checkpoint = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from None
    if "state_dict" not in checkpoint.contents:
        raise CommandError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'); "
            "export folders from `python -m aa_lightning.export` also work"
        )
    return checkpoint


def _checked_model_name(found: str | None, expected: str | None, path: Path) -> str:
    if found is None:
        if expected is None:
            raise CommandError(
                f"{path} does not say which model it holds (no 'model_name'); it is not an ImageClassifier checkpoint"
            )
        return expected
    if expected is not None and found != expected:
        raise CommandError(f"checkpoint {path} holds a {found!r} model, not {expected!r}")
    return found


def _import_datamodule_class(class_path: str | None) -> type | None:
    """The data module class of a checkpoint, only from this package (a checkpoint names no other code to import)."""
    if not class_path or not class_path.startswith("aa_lightning."):
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module_name, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def _is_cifar_format(data_hparams: dict[str, Any], datamodule_class: type | None) -> bool:
    """CIFAR100DataModule or a subclass (by the CLI's class path; else by its files on disk)."""
    from aa_lightning.data.cifar import CIFAR100DataModule
    from aa_lightning.data.cifar_format import BASE_FOLDER

    if datamodule_class is not None:
        return issubclass(datamodule_class, CIFAR100DataModule)
    data_dir = data_hparams.get("data_dir")
    return (
        data_dir is not None and "eval_size" not in data_hparams and (Path(data_dir) / BASE_FOLDER / "meta").is_file()
    )


def _class_names_from_data(data_hparams: dict[str, Any], cifar_format: bool) -> list[str] | None:
    """The class names from the data module's files, when they are still where training read them."""
    from aa_lightning.data.cifar_format import read_cifar_meta

    data_dir = data_hparams.get("data_dir")
    if data_dir is None:
        return None
    if cifar_format:
        try:
            return read_cifar_meta(data_dir)
        except (OSError, ValueError):
            return None
    val_dir = Path(data_dir) / "val"  # ImageFolder layout: classes = sorted folder names
    if val_dir.is_dir():
        return sorted(p.name for p in val_dir.iterdir() if p.is_dir()) or None
    return None


def load_trained_classifier(path: str | Path, model_name: str | None = None) -> TrainedClassifier:
    """Rebuild the classifier of a Lightning ``.ckpt`` or of an export folder (eval mode, CPU).

    ``model_name``: the model the caller expects; a checkpoint of another model raises an
    :class:`CommandError` naming both.
    """
    path = Path(path)
    if path.is_dir():
        return load_exported_classifier(path, model_name)
    from aa_lightning.tasks.classification import build_timm_model

    source = read_lightning_checkpoint(path)
    checkpoint = source.contents
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    task = hparams.get("_class_path")
    if task is not None and task != CLASSIFIER_CLASS_PATH and "model_name" not in hparams:
        raise CommandError(
            f"checkpoint {path} is a {task} checkpoint, not an image classifier ({CLASSIFIER_CLASS_PATH})"
        )
    name = _checked_model_name(hparams.get("model_name"), model_name, path)
    if "num_classes" not in hparams:
        raise CommandError(
            f"checkpoint {path} has no 'num_classes' hyper-parameter; it is not an ImageClassifier checkpoint"
        )
    kwargs = dict(hparams.get("model_kwargs") or {})
    try:
        model = build_timm_model(name, int(hparams["num_classes"]), kwargs)
    except ValueError as err:
        raise CommandError(f"checkpoint {path}: {err}") from None
    try:
        load_checkpoint(model, source)  # the model zoo's checks: same model, same shapes
    except ValueError as err:
        raise CommandError(str(err)) from None

    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    cifar_format = _is_cifar_format(data_hparams, _import_datamodule_class(data_hparams.get("_class_path")))
    classifier = TrainedClassifier(model.eval(), name, int(hparams["num_classes"]), path, kwargs)
    classifier.class_names = (
        checkpoint.get("class_names")
        or hparams.get("class_names")
        or _class_names_from_data(data_hparams, cifar_format)
    )
    if data_hparams.get("mean") is not None and data_hparams.get("std") is not None:
        classifier.mean, classifier.std = tuple(data_hparams["mean"]), tuple(data_hparams["std"])
    if cifar_format:
        classifier.image_size = classifier.resize_size = CIFAR_IMAGE_SIZE
    elif "eval_size" in data_hparams:
        classifier.image_size = int(data_hparams["eval_size"])
        classifier.resize_size = int(data_hparams.get("resize_size", classifier.image_size))
    else:  # the model's own preprocessing (timm pretrained_cfg)
        _preprocessing_from_timm(classifier, data_hparams.get("mean") is None)
    return classifier


def _preprocessing_from_timm(classifier: TrainedClassifier, normalization: bool) -> None:
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=classifier.model)
    classifier.image_size = int(config["input_size"][-1])
    classifier.resize_size = int(round(classifier.image_size / config.get("crop_pct", 1.0)))
    if normalization:
        classifier.mean, classifier.std = tuple(config["mean"]), tuple(config["std"])


def load_exported_classifier(folder: Path, model_name: str | None = None) -> TrainedClassifier:
    """A folder of ``config.json`` + ``model.safetensors`` as written by :mod:`aa_lightning.export`."""
    import timm

    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / "model.safetensors").is_file():
        raise CommandError(
            f"{folder} is not an export folder: it needs config.json and model.safetensors "
            "(python -m aa_lightning.export)"
        )
    config = json.loads(config_file.read_text())
    name = _checked_model_name(config.get("architecture"), model_name, folder)
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as err:
        raise CommandError(f"cannot build {name!r} from {folder}: {type(err).__name__}: {err}") from None
    pretrained = config.get("pretrained_cfg", {})
    labels = config.get("label_names")
    classifier = TrainedClassifier(
        model.eval(), name, int(config["num_classes"]), folder, dict(config.get("model_args") or {})
    )
    classifier.class_names = list(labels) if isinstance(labels, list) else None
    classifier.mean, classifier.std = (
        tuple(pretrained.get("mean", classifier.mean)),
        tuple(pretrained.get("std", classifier.std)),
    )
    classifier.image_size = int(pretrained.get("input_size", (3, classifier.image_size, classifier.image_size))[-1])
    classifier.resize_size = int(round(classifier.image_size / pretrained.get("crop_pct", 1.0)))
    return classifier


# -- images --------------------------------------------------------------------------------------------
def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file; a missing or undecodable file raises an CommandError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"image not found: {path}")
    try:
        with Image.open(path) as picture:
            return rgb_array(picture)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CommandError(f"cannot read image {path}: {err}") from None


def preprocess(image: np.ndarray, classifier: TrainedClassifier) -> Tensor:
    """[H, W, 3] uint8 -> [3, S, S] normalized: the data module's evaluation transform (short side
    to ``resize_size``, center crop ``image_size``, normalize)."""
    from aa_lightning.data.transforms import imagenet_eval_transform

    transform = imagenet_eval_transform(classifier.image_size, classifier.resize_size, classifier.mean, classifier.std)
    return transform(image)


# -- output files --------------------------------------------------------------------------------------
def check_not_overwriting(out: Path, names: Sequence[str]) -> None:
    """An :class:`CommandError` if a file about to be written in ``out`` exists and was not written by an
    earlier predict run (its ``predictions.json`` lists the figures it wrote), e.g. one of the input images."""
    listed: set[str] = set()
    try:
        records = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
        if isinstance(records, list) and all(isinstance(r, dict) and "figure" in r for r in records):
            listed = {"predictions.json", *(Path(str(r["figure"])).name for r in records)}
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    foreign = [name for name in names if (out / name).exists() and name not in listed]
    if foreign:
        raise CommandError(
            f"--out {out}: would overwrite {', '.join(foreign)}, not written by an earlier predict run "
            "(not in its predictions.json); choose another --out folder"
        )


# -- the command ---------------------------------------------------------------------------------------
def parse_queries(values: Sequence[str]) -> list[tuple[float, float]]:
    queries = []
    for value in values:
        try:
            y, x = (float(v) for v in value.split(","))
        except ValueError:
            raise CommandError(f"--queries: {value!r} is not 'y,x' (two fractions in [0, 1], e.g. 0.5,0.25)") from None
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise CommandError(f"--queries: {value!r} must be fractions of the image in [0, 1]")
        queries.append((y, x))
    return queries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aa_lightning.predict",
        description="Top-k predictions and attention overlays of a trained classifier on your own images (PNG files).",
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="Lightning .ckpt of an ImageClassifier, or a folder from python -m aa_lightning.export",
    )
    parser.add_argument("--images", nargs="+", required=True, help="image files (any format Pillow reads)")
    parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--layer", default=None, help="AugmentedConv2d to show (default: the last AA layer); --list-layers prints them"
    )
    parser.add_argument(
        "--queries",
        nargs="+",
        default=["0.5,0.5", "0.25,0.25", "0.75,0.75"],
        help="query pixels as y,x fractions of the image (default: %(default)s)",
    )
    parser.add_argument("--top-k", type=int, default=5, help="predictions listed (default: %(default)s)")
    parser.add_argument("--model", default=None, help="expected model name: fail if the checkpoint holds another")
    parser.add_argument(
        "--class-names", default=None, help="text file with one class name per line (overrides the checkpoint's)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="evaluation crop size (default: the checkpoint's data module)"
    )
    parser.add_argument("--tile-size", type=int, default=128, help="pixels per overlay tile (default: %(default)s)")
    parser.add_argument(
        "--upsample",
        choices=("nearest", "bilinear"),
        default="nearest",
        help="attention map upsampling (default: %(default)s)",
    )
    parser.add_argument("--list-layers", action="store_true", help="print the AA layers of the model and exit")
    return parser


def predict_images(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the command; returns one record per image (also written to predictions.json)."""
    queries = parse_queries(args.queries)
    if args.top_k < 1:
        raise CommandError(f"--top-k must be >= 1, got {args.top_k}")
    pictures = [read_image(p) for p in args.images]  # every file checked before the model is built
    classifier = load_trained_classifier(args.ckpt, args.model)
    if args.class_names:
        names_file = Path(args.class_names)
        if not names_file.is_file():
            raise CommandError(f"--class-names: file not found: {names_file}")
        classifier.class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if classifier.class_names is not None and len(classifier.class_names) != classifier.num_classes:
        raise CommandError(f"{len(classifier.class_names)} class names for a {classifier.num_classes}-class model")
    if args.image_size is not None:
        classifier.resize_size = round(classifier.resize_size * args.image_size / classifier.image_size)
        classifier.image_size = args.image_size
    layers = list(augmented_layers(classifier.model))
    if args.list_layers:
        print("\n".join(layers) if layers else f"{classifier.model_name} has no AA layers")
        return []
    layer = args.layer or default_layer(classifier.model)
    if args.layer is not None and args.layer not in layers:
        raise CommandError(
            f"--layer: {classifier.model_name} has no AugmentedConv2d named {args.layer!r}; AA layers: {layers}"
        )
    out = prepare_out_folder(Path(args.out))
    stems = [Path(p).stem for p in args.images]
    figure_names = [f"{stem}.png" if stems.count(stem) == 1 else f"{b:03d}_{stem}.png" for b, stem in enumerate(stems)]
    check_not_overwriting(out, [*figure_names, "predictions.json"])

    batch = torch.stack([preprocess(p, classifier) for p in pictures])
    with torch.no_grad():
        if layer is None:
            logits, maps, pixels = classifier.model(batch), None, None
        else:
            with capture_attention(classifier.model, queries, layers=[layer]) as captures:
                logits = classifier.model(batch)
            maps, pixels = captures[layer].maps, captures[layer].query_pixels
    probs = logits.float().softmax(dim=-1)
    top_p, top_i = probs.topk(min(args.top_k, classifier.num_classes), dim=-1)
    shown = denormalize(batch, classifier.mean, classifier.std)

    records = []
    for b, image_path in enumerate(args.images):
        predictions = [
            {"class": int(i), "name": classifier.class_name(int(i)), "probability": float(p)}
            for p, i in zip(top_p[b], top_i[b])
        ]
        header = [f"{Path(image_path).name}  ({classifier.model_name}, {classifier.source.name})"]
        header += [f"{k + 1}. {p['name']}  {p['probability']:.3f}" for k, p in enumerate(predictions)]
        if layer is None:
            header.append(f"{classifier.model_name} has no attention layers")
        else:
            header.append(f"attention of {layer}: {maps.shape[1]} heads on a {maps.shape[-2]}x{maps.shape[-1]} grid")
        figure = attention_figure(
            shown[b],
            None if maps is None else maps[b],
            pixels,
            header=header,
            tile_size=args.tile_size,
            upsample=args.upsample,
        )
        figure_path = out / figure_names[b]
        try:
            with atomic_open(figure_path, "wb") as handle:
                figure.save(handle, format="PNG")
        except OSError as err:
            raise CommandError(f"--out {out}: cannot write {figure_path.name} ({err.strerror or err})") from None
        records.append({"image": str(image_path), "figure": str(figure_path), "layer": layer, "top_k": predictions})
        print(
            f"{image_path}: "
            + ", ".join(f"{p['name']} {p['probability']:.3f}" for p in predictions[:3])
            + f"  -> {figure_path}"
        )
    try:
        write_text_atomic(out / "predictions.json", json.dumps(records, indent=1) + "\n")
    except OSError as err:
        raise CommandError(f"--out {out}: cannot write predictions.json ({err.strerror or err})") from None
    return records


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), predict_images, argv)


if __name__ == "__main__":
    sys.exit(main())
