"""Pictures for people: attention overlays, colour maps, de-normalization (used by the TensorBoard
callbacks and by ``python -m aa_lightning.predict``). Pure rendering: numpy, PIL and torch only."""

from .overlay import UPSAMPLE_MODES, attention_figure, colormap_table, denormalize, pil_to_tensor

__all__ = ["UPSAMPLE_MODES", "attention_figure", "colormap_table", "denormalize", "pil_to_tensor"]
