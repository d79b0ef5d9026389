"""Loading weights into this project's models (no published weights exist yet).

- ``timm.create_model(name, pretrained=True)`` with no weight source raises
  :class:`NoPretrainedWeightsError` (timm would only log a warning and return a random network).
- ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="x.safetensors"))``
  (or a ``.pth`` state dict, or a ``.ckpt`` of this project) loads through timm with
  :func:`checkpoint_filter_fn`, which strips Lightning's ``model.`` prefix and resamples relative
  position tables trained at another ``img_size``.
- :func:`load_checkpoint` loads a Lightning ``.ckpt`` / state dict / safetensors file into a
  built model, checking that the checkpoint is of the same model.

Files are read with ``torch.load(weights_only=True)`` or safetensors: no code is unpickled.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from timm.models import resolve_pretrained_cfg
from torch import Tensor, nn

from ..layers import resample_relative_table

LIGHTNING_PREFIX = "model."
RELATIVE_TABLES = ("rel_h", "rel_w")


class NoPretrainedWeightsError(RuntimeError):
    """``pretrained=True`` for a model that has no published weights and no local file."""


def check_weight_source(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """Raise :class:`NoPretrainedWeightsError` when ``pretrained`` has nothing to load."""
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
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


def strip_lightning_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The timm model's keys of a LightningModule state dict (``model.`` prefix), else as is."""
    if any(k.startswith(LIGHTNING_PREFIX) for k in state_dict):
        return {k[len(LIGHTNING_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LIGHTNING_PREFIX)}
    if state_dict and all(k.startswith("module.") for k in state_dict):  # DDP-wrapped
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


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


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn`` of the AA models and baselines."""
    return resample_relative_tables(strip_lightning_prefix(state_dict), model)


def _read(path: Path) -> tuple[dict[str, Tensor], Optional[str], dict[str, Any]]:
    """(state dict, recorded model name, recorded model kwargs) of a checkpoint file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None, {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) (it pickles objects other than "
            f"tensors and plain containers; re-save its state_dict or use safetensors): {err}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict or a Lightning checkpoint; got {type(checkpoint).__name__}")
    hparams = checkpoint.get("hyper_parameters") or {}
    name = hparams.get("model_name") if isinstance(hparams, dict) else None
    model_kwargs = (hparams.get("model_kwargs") or {}) if isinstance(hparams, dict) else {}
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: holds no state dict (a dict of tensors)")
    return checkpoint, name, dict(model_kwargs)


def model_name_of(model: nn.Module) -> Optional[str]:
    """The timm architecture name a model was created as (``pretrained_cfg['architecture']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a checkpoint of this project into a built timm ``model``; returns ``model``.

    ``path``: a Lightning ``.ckpt`` written by this project's training (weights under
    ``state_dict`` with keys prefixed ``model.``; ``hyper_parameters['model_name']`` names the
    network), a ``.pth`` / ``.pt`` state dict (optionally under ``state_dict`` / ``model``), or a
    ``.safetensors`` file. Read with ``torch.load(weights_only=True)`` / safetensors.

    Relative position tables trained at another ``img_size`` are resampled. A checkpoint of
    another model raises ``ValueError`` naming both models; any other mismatch (the same model
    built with other ``aa_*`` kwargs or ``num_classes``) names the differing keys. The classifier
    is skipped when ``model`` has none (``num_classes=0``). ``strict=False`` loads what fits.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state_dict, saved_name, saved_kwargs = _read(path)
    state_dict = strip_lightning_prefix(state_dict)
    name = model_name_of(model)
    if saved_name and name and saved_name != name:
        raise ValueError(
            f"{path} is a checkpoint of '{saved_name}', not of '{name}': create "
            f"timm.create_model('{saved_name}', **{saved_kwargs or {}}) to load it"
        )
    state_dict = resample_relative_tables(state_dict, model)
    own = model.state_dict()
    if getattr(model, "num_classes", None) == 0:  # headless model: drop the checkpoint's classifier
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        state_dict = {k: v for k, v in state_dict.items() if k in own or not any(k.startswith(c + ".") for c in classifier)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if shapes or (strict and (missing or unexpected)):
        described = f"'{saved_name}'" + (f" with {saved_kwargs}" if saved_kwargs else "") if saved_name else "the checkpoint's model"
        details = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
            if items
        )
        hint = f"; build the model as timm.create_model('{saved_name}', **{saved_kwargs})" if saved_name and saved_kwargs else ""
        raise ValueError(f"{path} ({described}) does not fit the model '{name or type(model).__name__}': {details}{hint}")
    model.load_state_dict(state_dict, strict=strict)
    return model
