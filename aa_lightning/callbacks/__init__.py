"""Lightning callbacks: the training-image grid, attention-map overlays and the end-of-run summary."""
from .attention_maps import AttentionMapLogger
from .image_grid import TrainingImageGrid
from .run_summary import RunSummary

__all__ = ["AttentionMapLogger", "RunSummary", "TrainingImageGrid"]
