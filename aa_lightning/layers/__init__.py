"""The nn.Modules of the paper: AugmentedConv2d (AAConv), its position encodings, ``aa_dims`` (the paper's
k, v ratios as valid dk, dv) and the capture of attention maps. The attention itself is
:mod:`aa_lightning.attention`."""

from .aa_dims import aa_dims
from .attention_capture import AttentionCapture, augmented_layers, capture_attention
from .augmented_conv import POSITIONS, AugmentedConv2d, attention_backend, resample_relative_table
from .position_encoding import coord_channels, sine_position_encoding_2d

__all__ = [
    "AttentionCapture",
    "AugmentedConv2d",
    "POSITIONS",
    "aa_dims",
    "attention_backend",
    "augmented_layers",
    "capture_attention",
    "coord_channels",
    "resample_relative_table",
    "sine_position_encoding_2d",
]
