"""Per-sample "modern" augmentation (RandAugment, AutoAugment, TrivialAugment, colour jitter, random erasing)
as steps of the albumentations training pipelines, seeded from (seed, epoch, index) like the rest of it.

The settings (:class:`AugmentSettings`) are init arguments of every classification data module, the same
names everywhere, all off by default (off = the pipeline is exactly the one without them):

- ``auto_augment``: ``"rand-m9-mstd0.5-inc1"`` and any other timm RandAugment string
  (``timm.data.auto_augment.rand_augment_transform``; sections ``m<int>``, ``n<int>``, ``p<float>``,
  ``mstd<float>``, ``mmax<int>``, ``inc0|1``, ``tweights|3a|3aw``); ``"autoaugment"``: the ImageNet policy of
  Cubuk et al. (timm's ``"original"``, not its TPU-EfficientNet variant ``"v0"``); ``"autoaugment-cifar"``:
  the CIFAR-10 policy (torchvision v2 ``AutoAugment(AutoAugmentPolicy.CIFAR10)``, torchvision's nearest
  interpolation and black fill); ``"trivialaugment"``: torchvision v2 ``TrivialAugmentWide`` (same defaults).
- ``color_jitter``: strength ``c`` of brightness, contrast and saturation (factors uniform in
  ``[max(0, 1 - c), 1 + c]``, no hue; timm's scalar ``color_jitter``), torchvision v2 ``ColorJitter``. timm
  drops colour jitter when ``auto_augment`` is set (unless forced); here both run when both are set.
- ``random_erasing`` (probability, 0 = off), ``random_erasing_mode`` (``const``: zeros after normalization,
  i.e. the mean colour; ``rand``: one normal colour per box; ``pixel``: normal noise per pixel),
  ``random_erasing_count`` (at most this many boxes, 1..count per image, their area shared): timm's
  ``RandomErasing`` on the normalized image, as timm's ``create_transform`` applies it.

Order inside the pipeline (timm's): crop / flip -> ``auto_augment`` -> ``color_jitter`` -> normalize ->
random erasing -> tensor. Evaluation pipelines never get these steps.

Seeding: timm's operations draw from Python's ``random`` and numpy's global generator, torchvision's from
torch's global (CPU) generator. Each step is an albumentations transform (:class:`SeededLibraryStep`) that
draws one 32-bit number from its own albumentations generator, which the pipeline seeds from
(seed, epoch, index) before every training sample (:mod:`.loaders`), and runs the library inside
:func:`seeded_global_generators` of that number: the global generators the library draws from are seeded for
the call and put back as they were afterwards. A sample's pixels therefore depend on (seed, epoch, index) only,
never on the worker, on what was loaded before or on a resume, and nothing else in the process (dropout, the
shuffle, a user's ``random``) sees a different stream.

Images stay uint8 ``[H, W, 3]`` between the steps: PIL only around timm's operations (which need it), a
uint8 ``[3, H, W]`` tensor view around torchvision's; both conversions are exact.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image

AUTO_AUGMENT_NAMES = ("autoaugment", "autoaugment-cifar", "trivialaugment")
AUTO_AUGMENT_FORMS = (
    "a timm RandAugment string 'rand-m<int>[-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc0|1][-tweights|3a|3aw]' "
    "(e.g. 'rand-m9-mstd0.5-inc1'), 'autoaugment' (ImageNet policy), 'autoaugment-cifar' (CIFAR-10 policy), "
    "'trivialaugment', or null (off)"
)
ERASING_MODES = ("const", "rand", "pixel")
#: the ImageNet AutoAugment policy behind ``auto_augment: autoaugment`` (timm's name for Cubuk et al.'s policy)
TIMM_AUTOAUGMENT_POLICY = "original"

_NUMBER = r"(\d+(\.\d*)?|\.\d+)"
_RAND_SECTION = re.compile(rf"m\d+|n\d+|p{_NUMBER}|mstd{_NUMBER}|mmax\d+|inc[01]|t(weights|3a|3aw)")
#: the streams of the steps: two steps of one pipeline never run the libraries from the same seed
_AUTO_AUGMENT_STREAM, _COLOR_JITTER_STREAM, _ERASING_STREAM = 0, 1, 2


@contextmanager
def seeded_global_generators(seed: int, stream: int = 0, numpy: bool = True) -> Iterator[None]:
    """Inside the block, Python's ``random``, torch's CPU default generator and (``numpy``) numpy's global generator
    are seeded from (``seed``, ``stream``) (independent seeds of numpy's ``SeedSequence``); after it, they are as
    they were before (also when the block raises). CUDA generators are not touched. ``numpy=False`` leaves
    numpy's generator alone, for a library that does not draw from it (saving and restoring it is most of the
    cost, ~0.12 ms)."""
    py_seed, np_seed, torch_seed = np.random.SeedSequence([int(seed), int(stream)]).generate_state(3)
    saved_random, saved_torch = random.getstate(), torch.default_generator.get_state()
    saved_numpy = np.random.get_state() if numpy else None
    random.seed(int(py_seed))
    if numpy:
        np.random.seed(int(np_seed))
    torch.default_generator.manual_seed(int(torch_seed))
    try:
        yield
    finally:
        random.setstate(saved_random)
        if saved_numpy is not None:
            np.random.set_state(saved_numpy)
        torch.default_generator.set_state(saved_torch)


class SeededLibraryStep(A.ImageOnlyTransform):
    """An albumentations step ``image -> function(image)`` whose library draws from the global generators, run
    inside :func:`seeded_global_generators` of a number drawn from the step's own (pipeline-seeded) generator.

    ``function``: one of :class:`OnPILImage`, :class:`OnTensorImage`, :class:`EraseNormalized`; ``stream``
    tells the steps of one pipeline apart (albumentations seeds every step of a pipeline alike); ``numpy``:
    whether the library draws from numpy's global generator (timm's auto-augment does; its random erasing and
    torchvision's transforms draw from Python's and torch's only).
    """

    def __init__(self, function: Callable[[np.ndarray], np.ndarray], stream: int = 0, numpy: bool = True) -> None:
        super().__init__(p=1.0)
        self.function, self.stream, self.numpy = function, int(stream), bool(numpy)

    def get_params(self) -> dict[str, Any]:
        return {"global_seed": int(self.random_generator.integers(2**32))}

    def apply(self, img: np.ndarray, global_seed: int = 0, **params: Any) -> np.ndarray:
        with seeded_global_generators(global_seed, self.stream, self.numpy):
            return self.function(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("function", "stream", "numpy")


class OnPILImage:
    """uint8 ``[H, W, 3]`` -> PIL -> ``operation`` (a timm auto-augment transform) -> uint8 ``[H, W, 3]``."""

    def __init__(self, operation: Callable[[Image.Image], Image.Image]) -> None:
        self.operation = operation

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.array(self.operation(Image.fromarray(image)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.operation!r})"


class OnTensorImage:
    """uint8 ``[H, W, 3]`` -> uint8 tensor view ``[3, H, W]`` -> ``operation`` (a torchvision v2 transform) ->
    uint8 ``[H, W, 3]``."""

    def __init__(self, operation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.operation = operation

    def __call__(self, image: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
        return np.ascontiguousarray(self.operation(tensor).permute(1, 2, 0).numpy())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.operation!r})"


class EraseNormalized:
    """timm's ``RandomErasing`` (``eraser``, which writes in place into a ``[3, H, W]`` tensor) on a normalized
    float32 ``[H, W, 3]`` image, through a tensor view of it."""

    def __init__(self, eraser: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.eraser = eraser

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = np.require(image, requirements=["W"])
        self.eraser(torch.from_numpy(image).permute(2, 0, 1))
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.eraser!r})"


def check_auto_augment(value: str | None) -> None:
    """A ``ValueError`` naming ``data.init_args.auto_augment`` and the allowed forms for anything else."""
    if value is None or value in AUTO_AUGMENT_NAMES:
        return
    sections = value.split("-") if isinstance(value, str) else []
    if sections[:1] == ["rand"] and all(_RAND_SECTION.fullmatch(section) for section in sections[1:]):
        return
    raise ValueError(f"data.init_args.auto_augment must be {AUTO_AUGMENT_FORMS}; got {value!r}")


@dataclass(frozen=True)
class AugmentSettings:
    """The data modules' per-sample augmentation arguments (see the module docstring); checked on creation,
    every bad value a ``ValueError`` naming its ``data.init_args`` key and what is allowed."""

    auto_augment: str | None = None
    random_erasing: float = 0.0
    random_erasing_mode: str = "const"
    random_erasing_count: int = 1
    color_jitter: float | None = None

    def __post_init__(self) -> None:
        check_auto_augment(self.auto_augment)
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(
                f"data.init_args.random_erasing must be a probability in [0, 1] (0: off), got {self.random_erasing}"
            )
        if self.random_erasing_mode not in ERASING_MODES:
            raise ValueError(
                f"data.init_args.random_erasing_mode must be one of {', '.join(ERASING_MODES)}; "
                f"got {self.random_erasing_mode!r}"
            )
        if isinstance(self.random_erasing_count, bool) or self.random_erasing_count < 1:
            raise ValueError(
                f"data.init_args.random_erasing_count must be an integer >= 1, got {self.random_erasing_count}"
            )
        if self.color_jitter is not None and not self.color_jitter >= 0.0:
            raise ValueError(
                f"data.init_args.color_jitter must be >= 0 (brightness / contrast / saturation strength) or null, "
                f"got {self.color_jitter}"
            )

    def image_steps(self, image_size: int, mean: Sequence[float]) -> list[A.BasicTransform]:
        """The uint8 steps between crop / flip and normalization: ``auto_augment``, then ``color_jitter``.

        ``image_size`` and ``mean`` (of [0, 1] pixels) set timm's translation (45% of the image) and fill colour,
        as ``timm.data.create_transform`` does; timm's operations interpolate bilinearly (the crop's)."""
        steps: list[A.BasicTransform] = []
        if self.auto_augment is not None:
            function = _auto_augment(self.auto_augment, image_size, mean)
            timm_operation = isinstance(function, OnPILImage)
            steps.append(SeededLibraryStep(function, _AUTO_AUGMENT_STREAM, numpy=timm_operation))
        if self.color_jitter:
            from torchvision.transforms import v2

            strength = float(self.color_jitter)
            jitter = v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength)
            steps.append(SeededLibraryStep(OnTensorImage(jitter), _COLOR_JITTER_STREAM, numpy=False))
        return steps

    def normalized_steps(self) -> list[A.BasicTransform]:
        """The steps between normalization and the tensor conversion: random erasing."""
        if self.random_erasing <= 0.0:
            return []
        from timm.data.random_erasing import RandomErasing

        eraser = RandomErasing(
            self.random_erasing, mode=self.random_erasing_mode, max_count=self.random_erasing_count, device="cpu"
        )
        return [SeededLibraryStep(EraseNormalized(eraser), _ERASING_STREAM, numpy=False)]


def _auto_augment(name: str, image_size: int, mean: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    if name in ("autoaugment-cifar", "trivialaugment"):
        from torchvision.transforms import v2

        if name == "trivialaugment":
            return OnTensorImage(v2.TrivialAugmentWide())
        return OnTensorImage(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    from timm.data.auto_augment import auto_augment_transform, rand_augment_transform

    hparams = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "interpolation": Image.Resampling.BILINEAR,
    }
    if name == "autoaugment":
        policy = auto_augment_transform(TIMM_AUTOAUGMENT_POLICY, hparams)
    else:
        policy = rand_augment_transform(name, hparams)
    return OnPILImage(posterize_zero_bits_to_black(policy))


def posterize_zero_bits_to_black(policy: Any) -> Any:
    """``policy`` (a timm ``RandAugment`` or ``AutoAugment``) with its posterize operations keeping 0 bits giving a
    black image, as with Pillow < 13 (in place; returned). Pillow 13's ``ImageOps.posterize`` refuses 0 bits, which
    timm 1.0.31 asks for at RandAugment's top magnitude with ``inc1`` (``rand-m9-mstd0.5-inc1`` draws it for about
    1 image in 500) and at low magnitudes without it: a ``ValueError`` that stops the training run (timm's own
    loader too)."""
    from timm.data.auto_augment import posterize

    sub_policies = getattr(policy, "policy", None) or [getattr(policy, "ops", [])]
    for op in (op for sub_policy in sub_policies for op in sub_policy):
        if op.aug_fn is posterize:
            op.aug_fn = PosterizeKeepingZeroBits()
    return policy


class PosterizeKeepingZeroBits:
    """``timm.data.auto_augment.posterize`` with 0 bits kept giving a black image (Pillow < 13's result)."""

    def __call__(self, image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
        from timm.data.auto_augment import posterize

        if bits_to_keep <= 0:
            return Image.new(image.mode, image.size)
        return posterize(image, bits_to_keep, **kwargs)
