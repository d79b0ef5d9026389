"""The compiled CPU backend (``backend="cpu_kernel"``): C kernels built on first use and run on torch's
OpenMP threads.

- :mod:`.build`: the C compiler, the per-user cache, the ctypes bindings.
- :mod:`.ops`: the kernels as torch custom ops (``aa_lightning::relative_attention``,
  ``aa_lightning::factorized_attention``) with fake implementations and autograd.
- :mod:`.backend`: the backend function, registered with :mod:`aa_lightning.attention.registry`.
"""

from aa_lightning.attention.registry import AttentionBackend, register_backend

from . import build, ops
from .backend import cpu_relative_attention
from .build import available

register_backend(
    AttentionBackend(
        "cpu_kernel",
        cpu_relative_attention,
        devices=("cpu",),
        available=available,
        missing="cannot be built here (no C compiler: set $CC, or AA_LIGHTNING_CPU_KERNEL=0 is set); "
        "use 'auto' or 'chunked'",
    )
)

__all__ = ["available", "build", "cpu_relative_attention", "ops"]
