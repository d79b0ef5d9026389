"""The Triton backend (``backend="triton"``, CUDA): FlashAttention-2-style kernels with the relative
logits computed per query block.

- :mod:`.kernels`: the ``@triton.jit`` kernels (forward, dq pass, dk/dv pass).
- :mod:`.ops`: their launch, block sizes per kernel and GPU target, and the torch custom ops with fake
  implementations and autograd.
- :mod:`.fallback`: the ops on the chunked backend when the GPU refuses a launch (out of resources),
  with one warning per shape and GPU.
- :mod:`.backend`: the backend function, registered with :mod:`aa_lightning.attention.registry`;
  triton is imported on its first call only.
"""

from aa_lightning.attention.registry import AttentionBackend, register_backend

from .backend import available, triton_relative_attention

register_backend(
    AttentionBackend(
        "triton",
        triton_relative_attention,
        available=available,
        missing="needs the triton package (it comes with torch's Linux CUDA wheels); use 'auto' or 'chunked'",
    )
)

__all__ = ["available", "triton_relative_attention"]
