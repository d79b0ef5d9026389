"""AttentionMapLogger: log what the attention heads of one AA layer look at, to TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from aa_lightning.layers import augmented_layers, capture_attention
from aa_lightning.viz.overlay import (
    UPSAMPLE_MODES,
    Upsample,
    attention_figure,
    colormap_table,
    denormalize,
    pil_to_tensor,
)

DEFAULT_QUERIES: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.75))


def attention_network(pl_module: nn.Module) -> nn.Module:
    """The network whose layer names the user writes: ``pl_module.model`` (the timm model of the
    tasks) when there is one, else the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def default_layer(network: nn.Module) -> str | None:
    """The last AugmentedConv2d with an attention branch (the smallest map in the AA networks)."""
    names = list(augmented_layers(network))
    return names[-1] if names else None


def first_images(datamodule: Any, num_images: int) -> tuple[Tensor, Tensor | None]:
    """The first ``num_images`` (images [n, C, H, W], labels [n] or None) of the validation set,
    read from the dataset itself (no sampler, no worker processes) and collated by its loader."""
    loader = datamodule.val_dataloader()
    dataset = loader.dataset
    count = min(num_images, len(dataset))
    batch = loader.collate_fn([dataset[i] for i in range(count)])
    if isinstance(batch, Tensor):
        return batch, None
    images, labels = batch[0], batch[1] if len(batch) > 1 else None
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError(
            "attention_maps: the validation batch's first element must be an image tensor [B, C, H, W]; "
            f"got {type(images).__name__} (detection batches are drawn by RetinaNetDetector itself)"
        )
    return images, labels if isinstance(labels, Tensor) else None


class AttentionMapLogger(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, log attention overlays of a few fixed validation images.

    For each of the first ``num_images`` validation images (chosen once, from
    ``trainer.datamodule.val_dataloader()``'s data set) one TensorBoard image
    ``val/attention_<i>``: rows = query pixels, columns = the input (denormalized with the data
    module's ``mean`` / ``std``) and each head's attention map of ``layer`` for that query,
    upsampled and overlaid, the query's cell boxed in cyan; the header gives the layer, the
    prediction and the label. Maps come from :func:`aa_lightning.layers.capture_attention`
    (the layer's real softmax probabilities, recomputed for the queries only).

    Cheap and safe: global rank 0 only, only with a TensorBoardLogger, one forward of
    ``num_images`` images in eval mode without gradients (the training mode is restored); not
    during the sanity check. A model without AA layers (a baseline) gets a warning and no logging.

    Args:
        every_n_epochs: log at the 1st validation epoch and every N-th one after it.
        num_images: validation images shown (each its own TensorBoard image).
        layer: AugmentedConv2d name inside the task's ``model`` (e.g. ``stages.2.3.conv1``);
            default: the last AA layer. A wrong name fails at setup, listing the AA layers.
        queries: query positions (y, x) as fractions of the map in [0, 1].
        tile_size: pixels of one tile (the image and the maps are upsampled to it).
        alpha: heat-map opacity over the image.
        colormap: a matplotlib colormap name.
        upsample: ``nearest`` (shows the real attention grid cells) or ``bilinear``.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 4,
        layer: str | None = None,
        queries: Sequence[tuple[float, float]] = DEFAULT_QUERIES,
        tile_size: int = 96,
        alpha: float = 0.6,
        colormap: str = "inferno",
        upsample: Upsample = "nearest",
    ) -> None:
        for key, value, ok, allowed in [
            ("every_n_epochs", every_n_epochs, every_n_epochs >= 1, ">= 1"),
            ("num_images", num_images, num_images >= 1, ">= 1"),
            ("tile_size", tile_size, tile_size >= 16, ">= 16"),
            ("alpha", alpha, 0.0 <= alpha <= 1.0, "in [0, 1]"),
            ("upsample", upsample, upsample in UPSAMPLE_MODES, f"one of {UPSAMPLE_MODES}"),
            (
                "queries",
                queries,
                len(queries) > 0 and all(len(q) == 2 and all(0.0 <= c <= 1.0 for c in q) for q in queries),
                "a non-empty list of (y, x) fractions in [0, 1]",
            ),
        ]:
            if not ok:
                raise ValueError(f"attention_maps.{key} must be {allowed}; got {value!r}")
        try:
            colormap_table(colormap)
        except ValueError as err:
            raise ValueError(f"attention_maps.colormap: {err}") from None
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.layer = layer
        self.queries = [(float(y), float(x)) for y, x in queries]
        self.tile_size, self.alpha, self.colormap, self.upsample = tile_size, alpha, colormap, upsample
        self.validations = 0  # validation epochs seen (not sanity checks); saved in checkpoints
        self._layer: str | None = None
        self._images: Tensor | None = None
        self._labels: Tensor | None = None

    # -- set-up: fail fast on a wrong layer name -------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = attention_network(pl_module)
        available = list(augmented_layers(network))
        if self.layer is None:
            self._layer = default_layer(network)
            if self._layer is None:
                rank_zero_warn(
                    f"attention_maps: {type(network).__name__} has no AugmentedConv2d layer with attention "
                    "(a baseline model?); no attention maps will be logged"
                )
        elif self.layer not in available:
            raise ValueError(
                f"attention_maps.layer: no AugmentedConv2d named {self.layer!r} in the model; AA layers: {available}"
            )
        else:
            self._layer = self.layer

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # -- logging ------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self._layer is None or (self.validations - 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return
        for i, figure in enumerate(self.figures(trainer, pl_module)):
            logger.experiment.add_image(f"val/attention_{i}", figure, global_step=trainer.global_step)

    def _fixed_images(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor | None]:
        if self._images is None:
            source = trainer.datamodule
            if source is None:
                raise RuntimeError(
                    "attention_maps needs a LightningDataModule (trainer.datamodule) to pick validation images"
                )
            self._images, self._labels = first_images(source, self.num_images)
        return self._images, self._labels

    @torch.no_grad()
    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Tensor]:
        """[3, H, W] overlay figures of the fixed images, from one eval-mode forward of ``pl_module``."""
        images, labels = self._fixed_images(trainer)
        parameter = next(pl_module.parameters())
        was_training = pl_module.training
        pl_module.eval()
        try:
            with capture_attention(attention_network(pl_module), self.queries, layers=[self._layer]) as captures:
                outputs = pl_module(images.to(device=parameter.device, dtype=parameter.dtype))
        finally:
            pl_module.train(was_training)
        capture = captures[self._layer]
        maps, pixels = capture.maps.cpu(), capture.query_pixels.cpu()
        datamodule = trainer.datamodule
        names = list(getattr(datamodule, "class_names", None) or [])
        shown = denormalize(images, getattr(datamodule, "mean", None), getattr(datamodule, "std", None))
        nh, _, gh, gw = maps.shape[1:]
        figures = []
        for b in range(len(images)):
            header = [f"{self._layer}: {nh} heads on a {gh}x{gw} grid, epoch {trainer.current_epoch}"]
            header += describe_prediction(outputs, labels, b, names)
            figure = attention_figure(
                shown[b],
                maps[b],
                pixels,
                header=header,
                tile_size=self.tile_size,
                colormap=self.colormap,
                alpha=self.alpha,
                upsample=self.upsample,
            )
            figures.append(pil_to_tensor(figure))
        return figures


def class_name(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else f"class {index}"


def describe_prediction(outputs: Any, labels: Tensor | None, b: int, names: Sequence[str]) -> list[str]:
    """'pred <name> (p) | label <name>' for classification logits [B, C]; nothing otherwise."""
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        return []
    probs = outputs[b].float().softmax(dim=-1)
    p, index = probs.max(dim=-1)
    text = f"pred {class_name(names, int(index))} ({float(p):.2f})"
    if labels is not None:
        text += f" | label {class_name(names, int(labels[b]))}"
    return [text]
