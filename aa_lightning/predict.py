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
rebuilt from the checkpoint's ``model_name`` / ``model_kwargs``. Images get the evaluation
preprocessing the checkpoint records (``checkpoint["data_config"]``, timm's data-config keys, written at
training from the data module: resize the short side, center crop, normalize with its mean / std),
through ``timm.data.create_transform``; class names are the checkpoint's ``class_names``. Nothing is read
from data folders, so a checkpoint predicts the same on every machine. ``--data-config`` / ``--class-names``
replace them (a checkpoint written before they were recorded needs ``--data-config``: the error says so).
"""

from __future__ import annotations

import argparse
import json
import math
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
#: timm's data-config keys of an evaluation transform; those a --data-config must give when the checkpoint has none
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
REQUIRED_DATA_CONFIG_KEYS = ("input_size", "crop_pct", "mean", "std")
DATA_CONFIG_DEFAULTS = {"interpolation": "bilinear", "crop_mode": "center"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
_EXAMPLES = (
    '{"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]} '
    "for CIFAR-format data, "
    '{"input_size": [3, 224, 224], "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]} '
    "for ImageNet (crop_pct = eval_size / resize_size)"
)


@dataclass
class TrainedClassifier:
    """A timm classifier rebuilt from a checkpoint, with what is needed to feed it images.

    model: the timm network in eval mode; data_config: its evaluation preprocessing in timm's keys
    (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``; None when the checkpoint
    records none: :attr:`preprocessing` then raises a :class:`CommandError` saying what to pass).
    """

    model: nn.Module
    model_name: str
    num_classes: int
    source: Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    data_config: dict[str, Any] | None = None

    def class_name(self, index: int) -> str:
        names = self.class_names or []
        return names[index] if index < len(names) else f"class {index}"

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The data config, or a :class:`CommandError` naming the checkpoint and what to pass."""
        if self.data_config is None:
            raise CommandError(
                f"checkpoint {self.source} records no preprocessing (written before checkpoints carried it): "
                f"pass --data-config with a JSON file or object of timm's data-config keys, e.g. {_EXAMPLES}"
            )
        return self.data_config

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.preprocessing["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.preprocessing["std"])

    @property
    def image_size(self) -> int:
        """The evaluation crop (pixels, square)."""
        return int(self.preprocessing["input_size"][-1])

    @property
    def resize_size(self) -> int:
        """The short side before the crop: ``floor(image_size / crop_pct)``, as timm's evaluation transform."""
        return math.floor(self.image_size / self.preprocessing["crop_pct"])

    def set_image_size(self, size: int) -> None:
        """Evaluate at ``size`` x ``size`` (``--image-size``), resizing by the same ``crop_pct``."""
        if size < 1:
            raise CommandError(f"--image-size must be >= 1, got {size}")
        self.data_config = {**self.preprocessing, "input_size": (3, size, size)}


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


def checked_data_config(config: Any, source: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` (timm data-config keys) over ``base`` (the checkpoint's, if any), checked: a
    :class:`CommandError` naming ``source`` and the key otherwise. Missing ``interpolation`` / ``crop_mode``
    default to bilinear / center."""
    if not isinstance(config, dict):
        raise CommandError(f"{source} must be a JSON object of {DATA_CONFIG_KEYS}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise CommandError(f"{source}: unknown key {unknown[0]!r}; the keys are {DATA_CONFIG_KEYS}")
    merged = {**DATA_CONFIG_DEFAULTS, **(base or {}), **config}
    missing = [key for key in REQUIRED_DATA_CONFIG_KEYS if key not in merged]
    if missing:
        raise CommandError(f"{source} needs {missing[0]!r} (required: {REQUIRED_DATA_CONFIG_KEYS}), e.g. {_EXAMPLES}")

    def numbers(value: Any, length: int) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )

    size, crop_pct = merged["input_size"], merged["crop_pct"]
    if not numbers(size, 3) or size[0] != 3 or min(size) < 1 or any(int(v) != v for v in size):
        raise CommandError(f"{source}: 'input_size' must be [3, H, W] (positive integers), got {size!r}")
    if not numbers([crop_pct], 1) or not 0 < crop_pct <= 1:
        raise CommandError(
            f"{source}: 'crop_pct' must be a number in (0, 1] (eval size / resize size), got {crop_pct!r}"
        )
    if not numbers(merged["mean"], 3):
        raise CommandError(
            f"{source}: 'mean' must be 3 numbers (per RGB channel, of [0, 1] pixels), got {merged['mean']!r}"
        )
    if not numbers(merged["std"], 3) or min(merged["std"]) <= 0:
        raise CommandError(f"{source}: 'std' must be 3 numbers > 0 (per RGB channel), got {merged['std']!r}")
    for key, allowed in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if merged[key] not in allowed:
            raise CommandError(f"{source}: {key!r} must be one of {allowed}, got {merged[key]!r}")
    return {
        "input_size": tuple(int(v) for v in size),
        "interpolation": merged["interpolation"],
        "mean": tuple(float(v) for v in merged["mean"]),
        "std": tuple(float(v) for v in merged["std"]),
        "crop_pct": float(crop_pct),
        "crop_mode": merged["crop_mode"],
    }


def load_trained_classifier(
    path: str | Path, model_name: str | None = None, data_config: dict[str, Any] | None = None
) -> TrainedClassifier:
    """Rebuild the classifier of a Lightning ``.ckpt`` or of an export folder (eval mode, CPU), with the
    preprocessing and class names the checkpoint records (never read from data folders).

    ``model_name``: the model the caller expects; a checkpoint of another model raises an
    :class:`CommandError` naming both. ``data_config``: timm data-config keys that replace the checkpoint's
    (needed for a checkpoint written before checkpoints recorded their preprocessing).
    """
    path = Path(path)
    if path.is_dir():
        classifier = load_exported_classifier(path, model_name)
    else:
        classifier = _load_lightning_classifier(path, model_name)
    if data_config is not None:
        classifier.data_config = checked_data_config(data_config, "--data-config", classifier.data_config)
    return classifier


def _load_lightning_classifier(path: Path, model_name: str | None) -> TrainedClassifier:
    from aa_lightning.tasks.classification import CLASS_NAMES_KEY, DATA_CONFIG_KEY, build_timm_model

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
    classifier = TrainedClassifier(model.eval(), name, int(hparams["num_classes"]), path, kwargs)
    recorded = checkpoint.get(DATA_CONFIG_KEY)
    if recorded is not None:
        classifier.data_config = checked_data_config(recorded, f"checkpoint {path} ({DATA_CONFIG_KEY!r})")
    names = checkpoint.get(CLASS_NAMES_KEY)
    classifier.class_names = [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None
    return classifier


def load_exported_classifier(folder: Path, model_name: str | None = None) -> TrainedClassifier:
    """A folder of ``config.json`` + ``model.safetensors`` as written by :mod:`aa_lightning.export`; the
    preprocessing is ``timm.data.resolve_data_config(model=...)`` of the loaded model (its ``pretrained_cfg``),
    as a timm user gets it."""
    import timm
    from timm.data import resolve_data_config

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
    labels = model.pretrained_cfg.get("label_names")
    classifier = TrainedClassifier(
        model.eval(), name, int(config["num_classes"]), folder, dict(config.get("model_args") or {})
    )
    classifier.class_names = [str(n) for n in labels] if isinstance(labels, (list, tuple)) and labels else None
    resolved = resolve_data_config({}, model=model)
    classifier.data_config = checked_data_config(
        {k: v for k, v in resolved.items() if k in DATA_CONFIG_KEYS}, f"{config_file} ('pretrained_cfg')"
    )
    return classifier


def parse_data_config(value: str) -> dict[str, Any]:
    """``--data-config``: a JSON object, inline or in a file."""
    text = value
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value)
        if not path.is_file():
            raise CommandError(f"--data-config: file not found: {value}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CommandError(f"--data-config: cannot read {value} ({err})") from None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise CommandError(f"--data-config {value}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise CommandError(f"--data-config {value} must be a JSON object of {DATA_CONFIG_KEYS}")
    return config


def read_class_names(value: str) -> list[str]:
    """``--class-names``: a text file, one class name per line."""
    names_file = Path(value)
    if not names_file.is_file():
        raise CommandError(f"--class-names: file not found: {names_file}")
    return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]


def add_description_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-config`` and ``--class-names``: what a checkpoint written before they were recorded lacks."""
    parser.add_argument(
        "--data-config",
        default=None,
        help="preprocessing as a JSON file or object of timm data-config keys (input_size, crop_pct, mean, std, "
        "interpolation, crop_mode); overrides the checkpoint's (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--class-names", default=None, help="text file with one class name per line (overrides the checkpoint's)"
    )


def classifier_from_args(args: argparse.Namespace, need_preprocessing: bool = True) -> TrainedClassifier:
    """The classifier of ``--ckpt`` with ``--model``, ``--data-config``, ``--class-names`` and ``--image-size``
    applied. ``need_preprocessing``: a checkpoint without a data config (and no ``--data-config``) raises the
    :class:`CommandError` that says what to pass, and one without class names gets a note on stderr."""
    data_config = parse_data_config(args.data_config) if args.data_config is not None else None
    classifier = load_trained_classifier(args.ckpt, args.model, data_config)
    if args.class_names:
        classifier.class_names = read_class_names(args.class_names)
    if classifier.class_names is not None and len(classifier.class_names) != classifier.num_classes:
        raise CommandError(f"{len(classifier.class_names)} class names for a {classifier.num_classes}-class model")
    if args.image_size is not None:
        classifier.set_image_size(args.image_size)
    if need_preprocessing:
        classifier.preprocessing  # noqa: B018  (raises for a checkpoint that records none)
        if classifier.class_names is None:
            print(
                f"note: checkpoint {args.ckpt} records no class names; pass --class-names FILE (one per line) "
                "to name them (using 'class <i>')",
                file=sys.stderr,
            )
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
    """[H, W, 3] uint8 -> [3, S, S] normalized: ``timm.data.create_transform(**data_config)`` of the checkpoint's
    recorded preprocessing (short side to ``floor(S / crop_pct)``, center crop S, normalize), exactly what timm
    gives for the exported model."""
    from timm.data import create_transform

    return create_transform(**classifier.preprocessing, is_training=False)(Image.fromarray(image))


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
    add_description_arguments(parser)
    parser.add_argument(
        "--image-size", type=int, default=None, help="evaluation crop size (default: the checkpoint's data config)"
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
    classifier = classifier_from_args(args, need_preprocessing=not args.list_layers)
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
