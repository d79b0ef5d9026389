"""Lightning callbacks: the training-image grid, attention-map overlays, detection images, the end-of-run
summary, and the fault handling of long runs (last.ckpt, atomic checkpoints, exact resume, signals,
non-finite losses)."""

from .attention_maps import AttentionMapLogger
from .detection_images import DetectionImageLogger
from .faults import (
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    NonFiniteLossError,
    NonFiniteLossGuard,
    RunInterrupted,
    StopAnywhere,
    StopOnSignal,
)
from .image_grid import TrainingImageGrid
from .run_summary import RunSummary

__all__ = [
    "AtomicCheckpointIO",
    "AttentionMapLogger",
    "DetectionImageLogger",
    "LastCheckpoint",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ExactResume",
    "RunInterrupted",
    "RunSummary",
    "StopAnywhere",
    "StopOnSignal",
    "TrainingImageGrid",
]
