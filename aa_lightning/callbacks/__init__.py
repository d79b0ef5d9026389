"""Lightning callbacks a recipe names (``trainer.callbacks``) or the CLI adds: the training-image grid,
attention-map overlays, detection images, the end-of-run summary, the EMA of the weights. The fault
handling of long runs (last.ckpt, atomic checkpoints, exact resume, signals) is :mod:`aa_lightning.training`."""

from .attention_maps import AttentionMapLogger
from .detection_images import DetectionImageLogger
from .image_grid import TrainingImageGrid
from .model_ema import ModelEMA
from .run_summary import RunSummary

__all__ = ["AttentionMapLogger", "DetectionImageLogger", "ModelEMA", "RunSummary", "TrainingImageGrid"]
