"""The functional core: 2-D multi-head attention with relative position logits, and its backends.

- :func:`relative_attention_2d` (:mod:`.functional`): the one entry point; ``backend`` picks the
  implementation by name from :mod:`.registry` (``auto`` per device).
- Pure-torch backends: :mod:`.reference` (the paper's appendix algorithm, explicit (HW)^2 logits),
  :mod:`.chunked` (factorized tables, query chunks, recomputing backward), :mod:`.fused` (one
  ``scaled_dot_product_attention`` call), :mod:`.exported` (``onnx``: the form the ONNX export
  writes). The compiled ones live in :mod:`aa_lightning.kernels` and register themselves.
- :mod:`.tables`: the factorized relative-logit tables s_w [HW, W], s_h [HW, H].
"""

from .chunked import factorized_bias_attention
from .functional import attention_probabilities, relative_attention_2d
from .reference import rel_to_abs, relative_attention_reference
from .registry import BACKENDS, AttentionBackend, backend_available, register_backend, resolve_backend
from .tables import relative_logit_tables, relative_offsets_index

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "attention_probabilities",
    "backend_available",
    "factorized_bias_attention",
    "register_backend",
    "rel_to_abs",
    "relative_attention_2d",
    "relative_attention_reference",
    "relative_logit_tables",
    "relative_offsets_index",
    "resolve_backend",
]
