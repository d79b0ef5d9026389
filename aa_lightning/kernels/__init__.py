"""Compiled attention backends, each registering itself with :mod:`aa_lightning.attention.registry` when
imported (the package imports both): :mod:`.cpu` (C kernels, ``cpu_kernel``) and :mod:`.triton` (CUDA,
``triton``; triton itself is imported on first use)."""

from . import cpu, triton

__all__ = ["cpu", "triton"]
