"""Layers: the functional 2-D relative attention core and the AugmentedConv2d module."""

from .aa_dims import aa_dims
from .attention_capture import AttentionCapture, augmented_layers, capture_attention
from .augmented_conv import POSITIONS, AugmentedConv2d, attention_backend, resample_relative_table
from .chunked_attention import factorized_bias_attention
from .position_encoding import coord_channels, sine_position_encoding_2d
from .relative_attention import (
    BACKENDS,
    attention_probabilities,
    relative_attention_2d,
    relative_logit_tables,
    resolve_backend,
)
from .relative_attention_reference import rel_to_abs, relative_attention_reference

__all__ = [
    "AttentionCapture",
    "attention_backend",
    "attention_probabilities",
    "augmented_layers",
    "capture_attention",
    "AugmentedConv2d",
    "BACKENDS",
    "POSITIONS",
    "aa_dims",
    "coord_channels",
    "factorized_bias_attention",
    "rel_to_abs",
    "relative_attention_2d",
    "relative_attention_reference",
    "relative_logit_tables",
    "resample_relative_table",
    "resolve_backend",
    "sine_position_encoding_2d",
]
