"""Lightning callbacks: the training-image grid and the end-of-run summary."""
from .image_grid import TrainingImageGrid
from .run_summary import RunSummary

__all__ = ["RunSummary", "TrainingImageGrid"]
