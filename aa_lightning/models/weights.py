"""Loading weights into this project's models (no published weights exist yet).

- ``timm.create_model(name, pretrained=True)`` with no weight source raises
  :class:`NoPretrainedWeightsError` (timm would only log a warning and return a random network).
- ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="x.safetensors"))``
  (or a ``.pth`` state dict, or a ``.ckpt`` of this project) loads through timm with
  :func:`checkpoint_filter_fn`, which strips Lightning's ``model.`` prefix and resamples relative
  position tables trained at another ``img_size``.
- :func:`read_checkpoint` reads a Lightning ``.ckpt`` / state dict / safetensors file (the one
  reader of the project: the detection backbone and the predict tool use it too);
  :func:`load_checkpoint` loads it into a built model, checking that it is of the same model.

Files are read with ``torch.load(weights_only=True)`` or safetensors: no code is unpickled. A torch file (a zip)
whose bytes fail its records' CRC-32 (:func:`zip_checksum_failure`: a bit flipped after the write) and weights that
are not finite (:func:`non_finite_tensors`) are refused, naming the file and the record or tensor.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from timm.models import resolve_pretrained_cfg
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ..layers import resample_relative_table

LIGHTNING_PREFIX = "model."
RELATIVE_TABLES = ("rel_h", "rel_w")
#: where a checkpoint keeps the weights (first found wins): timm's EMA (timm's train.py saves the raw weights beside it
#: under ``state_dict``), Lightning (whose ``state_dict`` *is* the EMA when the run had an EMA callback: the raw weights
#: are then under ``current_model_state``), timm / torchvision scripts
STATE_DICT_KEYS = ("state_dict_ema", "state_dict", "model")
#: hyper-parameter keys under which a checkpoint may name its timm model
MODEL_NAME_KEYS = ("model_name", "backbone", "arch", "architecture", "model")


class NoPretrainedWeightsError(RuntimeError):
    """``pretrained=True`` for a model that has no published weights and no local file."""


def check_weight_source(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """Raise :class:`NoPretrainedWeightsError` when ``pretrained`` has nothing to load."""
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id or cfg.source == "local-dir":
        return
    raise NoPretrainedWeightsError(
        f"no pretrained weights are published for '{variant}'. Train them with this project "
        f"(python train.py --config configs/<recipe>.yaml), then load the file: "
        f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors')) "
        f"(.safetensors or .pth state dict), or build the model and call "
        f"aa_lightning.models.load_checkpoint(model, 'last.ckpt') for a Lightning checkpoint."
    )


def resample_relative_tables(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Relative tables (``*.rel_h`` [2H-1, dkh], ``*.rel_w`` [2W-1, dkh]) resampled to ``model``'s
    table lengths when the checkpoint was built for another ``img_size`` (same dkh)."""
    own = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] not in RELATIVE_TABLES or key not in own:
            continue
        target = own[key]
        if value.shape != target.shape and value.dim() == 2 and value.shape[1] == target.shape[1]:
            out[key] = resample_relative_table(value, (target.shape[0] + 1) // 2).to(value.dtype).contiguous()
    return out


def strip_lightning_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The timm model's keys of a LightningModule state dict (``model.`` prefix; other keys dropped), without
    DDP's ``module.`` prefix (``consume_prefix_in_state_dict_if_present``)."""
    state_dict = dict(state_dict)
    if any(k.startswith(LIGHTNING_PREFIX) for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(LIGHTNING_PREFIX)}
        consume_prefix_in_state_dict_if_present(state_dict, LIGHTNING_PREFIX)
    consume_prefix_in_state_dict_if_present(state_dict, "module.")
    return state_dict


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn`` of the AA models and baselines."""
    return resample_relative_tables(strip_lightning_prefix(state_dict), model)


def zip_checksum_failure(path: str | Path) -> str | None:
    """The first record of the zip-format torch file ``path`` whose bytes do not match their stored CRC-32 (the file
    changed after it was written: a flipped bit, a partial copy), or ``None`` when every record matches or the file
    is not a zip (an old-format torch file has no checksums)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"the archive itself ({type(err).__name__}: {err})"


class TorchFileError(ValueError):
    """A torch checkpoint file that cannot be used: ``kind`` is ``"empty"``, ``"unpickling"`` (it holds objects
    ``weights_only`` refuses, or is not a torch file), ``"unreadable"`` (truncated, not a checkpoint) or
    ``"checksum"``; ``detail`` says what was found. Callers word the message for their command."""

    def __init__(self, path: Path, kind: str, detail: str) -> None:
        super().__init__(f"{path}: {kind}: {detail}")
        self.path, self.kind, self.detail = path, kind, detail


def load_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (no code unpickled; memory-mapped when ``mmap``
    and the file is a zip), then the zip records' CRC-32 verified (:func:`zip_checksum_failure`): the one reader of
    torch checkpoint files (resume, predict, export, the detection backbone). Raises ``FileNotFoundError`` or a
    :class:`TorchFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise TorchFileError(path, "empty", "0 bytes")
    try:
        try:
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            contents = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except pickle.UnpicklingError as err:
        detail = " ".join(str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        raise TorchFileError(path, "unpickling", detail) from None
    except Exception as err:  # EOFError, zip errors ... of a truncated or foreign file
        raise TorchFileError(path, "unreadable", " ".join(f"{type(err).__name__}: {err}".split())[:200]) from None
    corrupt = zip_checksum_failure(path)
    if corrupt is not None:
        raise TorchFileError(path, "checksum", corrupt)
    return contents


def non_finite_tensors(tree: Any, name: str) -> list[str]:
    """``"name[...] (k of n values are NaN / inf)"`` for every floating tensor in the nested dicts / lists ``tree``
    (``name``: how to call its root) that holds a NaN or an infinity."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [(name, tree)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Tensor):
            if (value.is_floating_point() or value.is_complex()) and value.numel():
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    found.append(f"{where} ({bad} of {value.numel()} values are NaN / inf)")
        elif isinstance(value, dict):
            stack += [(f"{where}[{key!r}]", item) for key, item in reversed(list(value.items()))]
        elif isinstance(value, (list, tuple)):
            stack += [(f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value)))]
    return found


class Checkpoint(NamedTuple):
    """A checkpoint file as :func:`read_checkpoint` reads it.

    state_dict: the timm model's weights (prefixes stripped); model_name / model_kwargs: the model
    the file records (``hyper_parameters``), if any; contents: the whole file (``{}`` for safetensors).
    """

    path: Path
    state_dict: dict[str, Tensor]
    model_name: str | None
    model_kwargs: dict[str, Any]
    contents: dict[str, Any]


def _find_model_name(hparams: Any) -> str | None:
    """The timm model a checkpoint's hyper-parameters name (top level first, then nested ``init_args``)."""
    if isinstance(hparams, dict):
        for key in MODEL_NAME_KEYS:
            if isinstance(hparams.get(key), str):
                return hparams[key]
        for value in hparams.values():
            found = _find_model_name(value)
            if found:
                return found
    return None


def _read_failure(err: TorchFileError) -> str:
    """The one-line message of :func:`read_checkpoint` for a file :func:`load_torch_file` refused."""
    path = err.path
    if err.kind == "unpickling":
        return (
            f"cannot read checkpoint {path}: not a PyTorch checkpoint, or one holding Python objects that "
            f"torch.load(weights_only=True) refuses to unpickle (re-save its state_dict or use safetensors): "
            f"{err.detail}"
        )
    if err.kind == "checksum":
        return (
            f"cannot read checkpoint {path}: it fails its checksum (the CRC-32 of record {err.detail!r} does not "
            "match its bytes): the file was damaged after it was written; use another copy or checkpoint"
        )
    return f"cannot read checkpoint {path}: {err.detail}"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a Lightning ``.ckpt`` (weights under ``state_dict``, keys prefixed ``model.``), a timm /
    torch ``.pth`` (a state dict, or one under ``state_dict_ema`` / ``state_dict`` / ``model``: the EMA weights
    when the file has them) or a
    ``.safetensors`` file, with ``torch.load(weights_only=True)`` / safetensors: no code is unpickled.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    contents: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:  # truncated, not a safetensors file, unreadable
            raise ValueError(f"cannot read checkpoint {path}: not a readable safetensors file ({err})") from None
    else:
        try:
            contents = load_torch_file(path)
        except TorchFileError as err:
            raise ValueError(_read_failure(err)) from None
        if not isinstance(contents, dict):
            raise ValueError(f"{path}: expected a state dict or a Lightning checkpoint; got {type(contents).__name__}")
        state = next((contents[k] for k in STATE_DICT_KEYS if isinstance(contents.get(k), dict)), contents)
    state = strip_lightning_prefix(state)
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict (a dict of tensors)")
    non_finite = non_finite_tensors(dict(state), "weights")
    if non_finite:
        raise ValueError(
            f"cannot use checkpoint {path}: weight tensor {non_finite[0]}"
            + (f" and {len(non_finite) - 1} more" if len(non_finite) > 1 else "")
            + ": a diverged or damaged checkpoint; use an earlier one"
        )
    hparams = contents.get("hyper_parameters")
    model_kwargs = (hparams.get("model_kwargs") or {}) if isinstance(hparams, dict) else {}
    arch = contents.get("arch")  # timm's train.py records the model here, Lightning in hyper_parameters
    name = _find_model_name(hparams) or (arch if isinstance(arch, str) else None)
    return Checkpoint(path, state, name, dict(model_kwargs), contents)


def check_model_name(checkpoint: Checkpoint, name: str | None, hint: str) -> None:
    """Raise ``ValueError`` naming both models when ``checkpoint`` records another model than ``name``."""
    if checkpoint.model_name and name and checkpoint.model_name != name:
        raise ValueError(f"{checkpoint.path} is a checkpoint of '{checkpoint.model_name}', not of '{name}': {hint}")


def model_name_of(model: nn.Module) -> str | None:
    """The timm architecture name a model was created as (``pretrained_cfg['architecture']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def state_dict_differences(own: dict[str, Tensor], theirs: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of ``theirs`` against ``own``: keys of ``own`` not in ``theirs``,
    keys of ``theirs`` not in ``own``, and ``"key (their shape) vs (own shape)"`` for the keys both hold."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def describe_differences(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """The three lists of :func:`state_dict_differences` as one line, at most three names each."""
    return "; ".join(
        f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing keys", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
        if items
    )


def fitted_state_dict(
    model: nn.Module, checkpoint: Checkpoint, strict: bool = True, what: str = "model"
) -> dict[str, Tensor]:
    """``checkpoint``'s weights made to fit the built ``model``: relative tables resampled to its
    ``img_size``, the classifier dropped when ``model`` has none (``num_classes=0``).

    Shape mismatches (and, with ``strict``, missing or unexpected keys) raise ``ValueError``
    naming the file, both models and the differing keys (``what``: the model's role in the message).
    """
    saved_name, saved_kwargs = checkpoint.model_name, checkpoint.model_kwargs
    state_dict = resample_relative_tables(checkpoint.state_dict, model)
    own = model.state_dict()
    if getattr(model, "num_classes", None) == 0:  # headless model: drop the checkpoint's classifier
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        state_dict = {
            k: v for k, v in state_dict.items() if k in own or not any(k.startswith(c + ".") for c in classifier)
        }
    missing, unexpected, shapes = state_dict_differences(own, state_dict)
    if shapes or (strict and (missing or unexpected)):
        described = (
            f"'{saved_name}'" + (f" with {saved_kwargs}" if saved_kwargs else "")
            if saved_name
            else "the checkpoint's model"
        )
        details = describe_differences(missing, unexpected, shapes)
        hint = (
            f"; build the model as timm.create_model('{saved_name}', **{saved_kwargs})"
            if saved_name and saved_kwargs
            else ""
        )
        name = model_name_of(model) or type(model).__name__
        raise ValueError(f"{checkpoint.path} ({described}) does not fit the {what} '{name}': {details}{hint}")
    return state_dict


def load_checkpoint(model: nn.Module, path: str | Path | Checkpoint, strict: bool = True) -> nn.Module:
    """Load a checkpoint of this project into a built timm ``model``; returns ``model``.

    ``path``: a file :func:`read_checkpoint` reads (a Lightning ``.ckpt`` written by this project's
    training, whose ``hyper_parameters['model_name']`` names the network; a ``.pth`` / ``.pt``
    state dict; a ``.safetensors`` file), or its :class:`Checkpoint`.

    Relative position tables trained at another ``img_size`` are resampled. A checkpoint of
    another model raises ``ValueError`` naming both models; any other mismatch (the same model
    built with other ``aa_*`` kwargs or ``num_classes``) names the differing keys. The classifier
    is skipped when ``model`` has none (``num_classes=0``). ``strict=False`` loads what fits.
    """
    checkpoint = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    saved = checkpoint.model_name
    check_model_name(
        checkpoint,
        model_name_of(model),
        f"create timm.create_model('{saved}', **{checkpoint.model_kwargs or {}}) to load it",
    )
    model.load_state_dict(fitted_state_dict(model, checkpoint, strict), strict=strict)
    return model
