"""Export a trained classifier to ONNX and to a timm-loadable safetensors folder, and check both.

    python -m aa_lightning.export --ckpt runs/quickstart/version_0/checkpoints/best-*.ckpt --out export/

writes into ``--out``:

- ``model.safetensors`` + ``config.json``: timm's own export format (``timm.models.save_for_hf``:
  weights, architecture, ``model_args`` such as ``aa_k``, the class names as ``label_names``, and the
  preprocessing the checkpoint records in ``pretrained_cfg``: ``input_size``, ``interpolation``, ``mean``,
  ``std``, ``crop_pct``, ``crop_mode``; see :mod:`aa_lightning.predict` for ``--data-config`` /
  ``--class-names``, which an older checkpoint needs). Load it with
  ``timm.create_model("local-dir:export/", pretrained=True)`` (after ``import aa_lightning``), or with the
  model name: ``timm.create_model(name, pretrained=True, num_classes=C, **model_kwargs,
  pretrained_cfg_overlay=dict(file="export/model.safetensors", num_classes=C))``;
  ``timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))`` is then predict's
  preprocessing. Every file gets the umask's mode.
- ``model.onnx``: input ``images`` [B, 3, S, S] (dynamic batch, fixed S), output ``logits``
  [B, num_classes], opset 23 by default. The AA layers are exported with ``backend="onnx"``
  (:mod:`aa_lightning.attention.exported`: the relative logits folded into the dot product, built
  by one MatMul, and one ONNX ``Attention`` op per layer, which onnxruntime runs head by head in
  cache; below opset 23 the exporter writes MatMul, Softmax, MatMul), ``"fused"`` (the eager SDPA
  form: two Einsums, Concats, v padded to the augmented width; about 1.4x slower in onnxruntime,
  docs/benchmarks.md) or ``"reference"``, switched for the export only: the CPU training backends
  (``cpu_kernel``, a compiled custom op; ``chunked``, a Python loop over query chunks) have no ONNX
  form. Every backend computes the same function, and the check below compares against the
  PyTorch model as it runs by default.

Both files are checked after writing: the reloaded timm model and the ONNX graph (onnxruntime
when installed, else onnx's reference evaluator after ``onnx.checker``) must reproduce the PyTorch
logits on random inputs; the command fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import aa_lightning  # noqa: F401  (registers the AA models with timm)
from aa_lightning.atomic_files import new_file_mode, write_text_atomic
from aa_lightning.commands import CommandError, prepare_out_folder, run_command
from aa_lightning.layers import attention_backend
from aa_lightning.predict import TrainedClassifier, add_description_arguments, classifier_from_args

ONNX_BACKENDS = ("onnx", "fused", "reference")
ONNX_OPSET = 23  # the first opset with the Attention op (onnxruntime 1.32 runs it on CPU)
ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's 2 GB limit: larger models get a model.onnx.data file
# pretrained_cfg fields that describe timm's released weights of the architecture, not these ones
SOURCE_WEIGHT_FIELDS = ("tag", "origin_url", "paper_ids", "paper_name", "notes", "license", "hf_hub_id", "url")
FORMATS = ("onnx", "safetensors")
MANIFEST = "export.json"  # what was exported from which checkpoint, and the files written
EXPORT_FILES = ("model.onnx", "model.onnx.data", "model.safetensors", "config.json")  # every file an export may write


def export_onnx(
    model: nn.Module, path: str | Path, image_size: int, *, backend: str = "onnx", opset: int = ONNX_OPSET
) -> Path:
    """Write ``model`` (eval mode) as ONNX: ``images`` [B, 3, S, S] -> ``logits``; batch dynamic.

    The AA layers run ``backend`` (one of :data:`ONNX_BACKENDS`) during the export only.
    """
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"ONNX export backend must be one of {ONNX_BACKENDS}; got {backend!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    example = torch.randn(2, 3, image_size, image_size)
    try:
        with attention_backend(model, backend), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
                external_data=sum(p.numel() * p.element_size() for p in model.parameters()) > ONNX_SINGLE_FILE_BYTES,
            )
    finally:
        model.train(was_training)
    return path


def run_onnx(path: str | Path, images: Tensor) -> tuple[np.ndarray, str]:
    """Logits of an ONNX file for ``images``, and which runtime computed them: onnxruntime when
    installed, else ``onnx.reference.ReferenceEvaluator`` (after ``onnx.checker``)."""
    inputs = {"images": images.detach().cpu().float().numpy()}
    try:
        import onnxruntime
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        graph = onnx.load(str(path))
        onnx.checker.check_model(graph, full_check=True)
        return ReferenceEvaluator(graph).run(None, inputs)[0], "onnx.reference"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0], f"onnxruntime {onnxruntime.__version__}"


def export_timm(classifier: TrainedClassifier, folder: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` by timm's ``save_for_hf`` (weights, architecture, model
    arguments, class names as ``label_names``, and the checkpoint's preprocessing in ``pretrained_cfg``:
    ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``); returns the folder."""
    from timm.models import save_for_hf

    folder = Path(folder)
    model_config = {"label_names": list(classifier.class_names)} if classifier.class_names else {}
    save_for_hf(
        classifier.model,
        str(folder),
        model_config=model_config,
        model_args=dict(classifier.model_kwargs),
        safe_serialization=True,
        data_config=dict(classifier.preprocessing),
    )
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    for key in SOURCE_WEIGHT_FIELDS:
        config["pretrained_cfg"].pop(key, None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def reload_timm(folder: str | Path) -> nn.Module:
    """The exported model as a timm user loads it (eval mode)."""
    import timm

    return timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()


def max_difference(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aa_lightning.export",
        description="Export a trained classifier to ONNX and to a timm-loadable safetensors folder, "
        "and check that both reproduce it.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt of an ImageClassifier")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write (default: both)"
    )
    parser.add_argument("--model", default=None, help="expected model name: fail if the checkpoint holds another")
    parser.add_argument(
        "--image-size", type=int, default=None, help="ONNX input size S (default: the checkpoint's evaluation size)"
    )
    add_description_arguments(parser)
    parser.add_argument(
        "--backend",
        choices=ONNX_BACKENDS,
        default="onnx",
        help="attention backend inside the ONNX graph (default: %(default)s)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=ONNX_OPSET,
        help="ONNX opset (default: %(default)s; below 23 the attention is written as MatMul, Softmax, MatMul)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest accepted |logit difference| in the checks (default: %(default)s)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the checks")
    return parser


def _files_of_previous_export(out: Path) -> set[str]:
    """The files an earlier export wrote into ``out`` (listed in its export.json).

    Raises an :class:`CommandError` when ``out`` holds files of the export's names that no export
    of this tool wrote (no export.json): they would be overwritten, or left beside the new files as
    if they belonged to the new checkpoint."""
    manifest = out / MANIFEST
    present = sorted(name for name in EXPORT_FILES if (out / name).exists())
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        previous = None
    if not isinstance(previous, dict) or "checkpoint" not in previous:
        if present or manifest.exists():
            found = ", ".join(present + ([MANIFEST] if manifest.exists() else []))
            raise CommandError(
                f"--out {out} already holds {found}, not written by python -m aa_lightning.export "
                "(no export.json of it); choose an empty or new folder, or remove them yourself"
            )
        return set()
    listed = previous.get("files")
    # an export.json without "files" (older versions) covers the export files present beside it
    return {name for name in (listed if isinstance(listed, list) else present) if name in EXPORT_FILES}


def export_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    """Run the command; returns the max |logit difference| of each check.

    The files are written and checked in a temporary folder inside ``--out``, then moved into
    place; the files of an earlier export into the same folder (listed in its export.json) that this
    export does not write again are removed, so the folder never mixes two checkpoints. Files that
    no export wrote are never overwritten (an error instead)."""
    classifier = classifier_from_args(args)
    out = prepare_out_folder(Path(args.out))
    previous = _files_of_previous_export(out)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        differences = _export_into(classifier, args, staging)
        written = sorted(p.name for p in staging.iterdir())
        for name in written:  # the umask's mode, like any output (safetensors writes its file 0600)
            os.chmod(staging / name, new_file_mode())
        for name in sorted(previous - set(written)):  # the earlier export's, not rewritten: it would not match
            (out / name).unlink(missing_ok=True)
        for name in written:
            os.replace(staging / name, out / name)
        write_text_atomic(
            out / MANIFEST,
            json.dumps(
                {
                    "checkpoint": str(args.ckpt),
                    "model_name": classifier.model_name,
                    "max_abs_difference": differences,
                    "files": written,
                },
                indent=1,
            )
            + "\n",
        )
    except OSError as err:
        raise CommandError(f"--out {out}: cannot write the export ({err.strerror or err}: {err.filename})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in written:
        print(f"wrote {out / name}")
    return differences


def _export_into(classifier: TrainedClassifier, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Write the requested formats into ``folder`` and check them; the differences by format."""
    model = classifier.model.eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, classifier.image_size, classifier.image_size, generator=generator)
    with torch.no_grad():
        expected = model(images)
    differences: dict[str, float] = {}
    if "safetensors" in args.formats:
        export_timm(classifier, folder)
        print(
            f"exported model.safetensors and config.json (timm.create_model('local-dir:{args.out}', pretrained=True))"
        )
        if not args.no_check:
            with torch.no_grad():
                differences["safetensors"] = max_difference(reload_timm(folder)(images), expected)
            print(f"  check: timm reload reproduces the logits, max |difference| {differences['safetensors']:.2e}")
    if "onnx" in args.formats:
        path = export_onnx(model, folder / "model.onnx", classifier.image_size, backend=args.backend, opset=args.opset)
        print(
            f"exported {path.name} (images [B, 3, {classifier.image_size}, {classifier.image_size}] -> logits "
            f"[B, {classifier.num_classes}], AA backend {args.backend!r})"
        )
        if not args.no_check:
            logits, runtime = run_onnx(path, images)
            differences["onnx"] = max_difference(logits, expected)
            print(f"  check: {runtime} reproduces the logits, max |difference| {differences['onnx']:.2e}")
    failed = {k: v for k, v in differences.items() if not v <= args.atol}
    if failed:
        raise CommandError(
            f"exported model differs from the checkpoint's by more than --atol {args.atol}: {failed}; "
            f"nothing was written to {args.out}"
        )
    return differences


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), export_checkpoint, argv)


if __name__ == "__main__":
    sys.exit(main())
