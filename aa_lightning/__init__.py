"""aa-lightning: Attention Augmented Convolutional Networks (Bello et al., ICCV 2019).

Importing the package registers the AA models (and their baselines) with timm, so that
``timm.create_model("aa_resnet50")`` works after ``import aa_lightning``;
``aa_lightning.augment(model, stages=..., k=..., v=..., heads=...)`` augments a built timm network
(e.g. ``resnext50_32x4d``, ``resnet50d``, ``seresnet50``) the way those models are built.
"""

import os

# Set once, here: every module of the package is imported after this file, and both must be set before
# the library that reads them is first imported.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never phone home from albumentations
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's use of jsonargparse, not the user's

from . import (
    attention,  # noqa: E402,F401
    kernels,  # noqa: E402,F401  (registers the compiled attention backends)
    layers,  # noqa: E402,F401
    models,  # noqa: E402,F401  (registers the timm models)
)
from .models import augment  # noqa: E402

__all__ = ["augment", "layers", "models"]

__version__ = "0.1.0"
