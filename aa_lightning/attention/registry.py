"""The attention backends by name: every implementation of :func:`~.functional.relative_attention_2d`.

A backend is a function ``run(q, k, v, rel_h, rel_w) -> out`` (shapes of ``relative_attention_2d``, q
unscaled, both tables given), the device types it runs on and a check of whether it can run here
(a C compiler found, triton importable). The pure-torch backends (``reference``, ``chunked``,
``fused``, ``onnx``) are registered below; the compiled ones register themselves from
:mod:`aa_lightning.kernels` (imported with the package), so this module imports no kernel code.

``"auto"`` picks, per device type, the first available of :data:`AUTO_ORDER` (``cpu_kernel`` then
``chunked`` on CPU, ``triton`` then ``chunked`` on CUDA), else ``fused`` (MPS, XPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .chunked import chunked_relative_attention
from .exported import exported_relative_attention
from .fused import fused_relative_attention
from .reference import relative_attention_reference

Backend = Literal["auto", "reference", "chunked", "cpu_kernel", "triton", "fused", "onnx"]
#: every backend name a setting may take (the compiled ones are registered by aa_lightning.kernels)
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "cpu_kernel", "triton", "fused", "onnx")
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu_kernel", "chunked"), "cuda": ("triton", "chunked")}
AUTO_OTHER = "fused"


@dataclass(frozen=True)
class AttentionBackend:
    """One implementation: ``run(q, k, v, rel_h, rel_w)``; ``devices``: device types it runs on (None:
    any); ``available()``: whether it can run here; ``missing``: what to tell a user when it cannot."""

    name: str
    run: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    devices: tuple[str, ...] | None = None
    available: Callable[[], bool] = lambda: True
    missing: str = ""


_REGISTRY: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    """Make ``backend`` selectable by its name (one of :data:`BACKENDS`)."""
    if backend.name not in BACKENDS or backend.name == "auto":
        raise ValueError(f"backend name must be one of {BACKENDS[1:]}; got {backend.name!r}")
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> AttentionBackend:
    """The registered backend ``name`` (a concrete name, not ``"auto"``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"backend {name!r} is not registered (its module did not import: see aa_lightning.kernels)"
        ) from None


@torch.compiler.assume_constant_result  # compile/export: decided once at trace time, no graph break
def backend_available(name: str) -> bool:
    """Whether backend ``name`` is registered and can run here (a compiled one may build on this call)."""
    backend = _REGISTRY.get(name)
    return backend is not None and backend.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``"auto"`` stands for on ``device``; others are checked and pass through
    (a ``ValueError`` naming the backend when it cannot run on ``device`` here)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if backend_available(name):
                return name
        return AUTO_OTHER
    chosen = get_backend(backend)
    if chosen.devices is not None and device.type not in chosen.devices:
        devices = "/".join(d.upper() for d in chosen.devices)
        raise ValueError(
            f"backend {backend!r} runs on {devices} tensors only; got {device.type} (use 'auto' or 'fused')"
        )
    if chosen.missing and not backend_available(backend):
        raise ValueError(f"backend {backend!r} {chosen.missing}")
    return backend


register_backend(AttentionBackend("reference", relative_attention_reference))
register_backend(AttentionBackend("chunked", chunked_relative_attention))
register_backend(AttentionBackend("fused", fused_relative_attention))
register_backend(AttentionBackend("onnx", exported_relative_attention))
