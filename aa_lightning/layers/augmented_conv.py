"""AugmentedConv2d: AAConv(X) = Concat[Conv(X), MHA(X)] (Bello et al., ICCV 2019, Section 3.3)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import get_padding, to_2tuple
from torch import Tensor, nn

from aa_lightning.attention import BACKENDS, attention_probabilities, relative_attention_2d

from .position_encoding import add_sine_position_encoding, concat_coord_channels

Position = Literal["relative", "none", "sine", "coord"]
POSITIONS: tuple[str, ...] = ("relative", "none", "sine", "coord")


def resample_relative_table(table: Tensor, size: int) -> Tensor:
    """[2S-1, d] table for size S -> [2*size-1, d] by linear interpolation (align_corners=True).

    Offsets are rescaled with the map: offset 0 stays at 0 and the extreme offsets +-(S-1) map
    to +-(size-1), i.e. the table always spans the whole feature map (as timm/Swin resample
    their relative-position tables). Returns ``table`` itself when the size already matches.
    """
    if table.shape[0] == 2 * size - 1:
        return table
    if size == 1 or table.shape[0] == 1:
        # a 1-pixel map only has offset 0; a 1-row table is constant over offsets.
        center = table[(table.shape[0] - 1) // 2][None]
        return center.expand(2 * size - 1, table.shape[1])
    resized = F.interpolate(table.t()[None], size=2 * size - 1, mode="linear", align_corners=True)
    return resized[0].t()


torch.fx.wrap("relative_attention_2d")
torch.fx.wrap("resample_relative_table")
torch.fx.wrap("add_sine_position_encoding")
torch.fx.wrap("concat_coord_channels")


class AugmentedConv2d(nn.Module):
    """Attention-augmented convolution: [conv (Fout - dv ch), multi-head 2-D attention (dv ch)].

    Shapes: x [B, Fin, H, W] -> [B, Fout, H', W'] with H' = ceil(H / stride), W' likewise.

    - Conv branch: ``kernel_size`` conv, 'same' padding, ``stride``, Fout - dv channels
      (absent when dv == Fout: the fully attentional layer, paper's v = 1.0).
    - Attention branch: the input is average-pooled by ``stride`` (kernel = stride, ceil mode)
      so both branches meet at H' x W' — the paper's appendix has no strided case; this is the
      usual choice. A 1x1 conv maps Fin -> 2*dk + dv channels split as (q, k, v), Nh heads of
      dkh = dk / Nh and dvh = dv / Nh; O_h = softmax((Q_h K_h^T + S_H + S_W) / sqrt(dkh)) V_h;
      heads are concatenated (head-major channels) and projected by a 1x1 conv W_O (dv -> dv).
    - ``position``: ``"relative"`` (learned r^H [2H'-1, dkh], r^W [2W'-1, dkh], shared across
      heads, per layer), ``"none"``, ``"sine"`` (2-D sinusoids added to the attention input) or
      ``"coord"`` (CoordConv (y, x) channels concatenated to the attention input).
    - ``feat_size``: the layer's input (H, W) at construction; the relative tables are built for
      the attention grid ceil(H / stride) x ceil(W / stride). At another runtime size they are
      resampled by :func:`resample_relative_table` (linear, align_corners=True), never indexed out
      of range; ``rel_h`` / ``rel_w`` parameters keep their construction size.
    - ``rel_init_std``: std of the normal init of the tables; default dkh**-0.5. The appendix
      calls ``tf.random_normal_initializer(dkh**-0.5)`` whose first argument in TF1 is the *mean*
      (std 1.0); we follow the text's evident intent (std dkh**-0.5, mean 0).
    - ``dv == 0``: a plain convolution (no attention parameters at all).
    - ``backend``: the attention backend of :func:`relative_attention_2d`.
    - ``qkv_bias``: biases on the qkv and output 1x1 convs, as ``tf.layers.conv2d`` in the appendix.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        dk: int,
        dv: int,
        num_heads: int = 8,
        position: Position = "relative",
        feat_size: int | tuple[int, int] | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        qkv_bias: bool = True,
        rel_init_std: float | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self._validate(in_channels, out_channels, kernel_size, stride, dk, dv, num_heads, position, feat_size, backend)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.dk, self.dv, self.num_heads = (dk, dv, num_heads) if dv > 0 else (0, 0, num_heads)
        self.dkh, self.dvh = self.dk // num_heads, self.dv // num_heads
        self.position = position
        self.backend = backend
        self.feat_size = tuple(int(n) for n in to_2tuple(feat_size)) if feat_size is not None else None

        conv_channels = out_channels - self.dv
        padding = get_padding(kernel_size, stride=1, dilation=dilation)  # 'same' at stride 1, as before at any stride
        self.conv = (
            nn.Conv2d(in_channels, conv_channels, kernel_size, stride, padding, dilation, groups, bias, **dd)
            if conv_channels > 0
            else None
        )
        self.pool = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 and self.dv else None
        )
        if self.dv:
            qkv_in = in_channels + (2 if position == "coord" else 0)
            self.qkv = nn.Conv2d(qkv_in, 2 * self.dk + self.dv, 1, bias=qkv_bias, **dd)
            self.proj = nn.Conv2d(self.dv, self.dv, 1, bias=qkv_bias, **dd)
        else:
            self.qkv = self.proj = None
        if self.dv and position == "relative":
            att_h, att_w = (-(-s // stride) for s in self.feat_size)
            self.rel_h = nn.Parameter(torch.empty(2 * att_h - 1, self.dkh, **dd))
            self.rel_w = nn.Parameter(torch.empty(2 * att_w - 1, self.dkh, **dd))
        else:
            self.register_parameter("rel_h", None)
            self.register_parameter("rel_w", None)
        self.rel_init_std = rel_init_std if rel_init_std is not None else (self.dkh**-0.5 if self.dkh else 1.0)
        self.reset_relative_parameters()
        # Set by aa_lightning.layers.capture_attention; None (the default) costs nothing.
        self.attention_capture = None

    @staticmethod
    def _validate(in_channels, out_channels, kernel_size, stride, dk, dv, num_heads, position, feat_size, backend):
        def fail(name: str, allowed: str, got) -> None:
            raise ValueError(f"AugmentedConv2d: {name} must be {allowed}; got {got!r}")

        if in_channels < 1:
            fail("in_channels", ">= 1", in_channels)
        if out_channels < 1:
            fail("out_channels", ">= 1", out_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            fail("kernel_size", "an odd integer >= 1 ('same' padding)", kernel_size)
        if stride < 1:
            fail("stride", ">= 1", stride)
        if num_heads < 1:
            fail("num_heads", ">= 1", num_heads)
        if not 0 <= dv <= out_channels:
            fail("dv", f"in [0, out_channels={out_channels}]", dv)
        if dv == 0:
            return
        if dv % num_heads:
            fail("dv", f"divisible by num_heads={num_heads}", dv)
        if dk < num_heads:
            fail("dk", f">= num_heads={num_heads} (at least one key dim per head)", dk)
        if dk % num_heads:
            fail("dk", f"divisible by num_heads={num_heads}", dk)
        if position not in POSITIONS:
            fail("position", f"one of {POSITIONS}", position)
        if backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}", backend)
        if position == "relative" and feat_size is None:
            fail("feat_size", "the input (H, W) when position='relative' (the tables are sized by it)", feat_size)

    def reset_relative_parameters(self) -> None:
        """Normal(0, rel_init_std) init of r^H and r^W."""
        if self.rel_h is not None:
            nn.init.normal_(self.rel_h, std=self.rel_init_std)
            nn.init.normal_(self.rel_w, std=self.rel_init_std)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dk={self.dk}, dv={self.dv}, num_heads={self.num_heads}, position={self.position!r}, "
            f"feat_size={self.feat_size}, backend={self.backend!r}"
        )

    def attention_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k: [B, Nh, H', W', dkh] and v: [B, Nh, H', W', dvh] from x [B, Fin, H, W]."""
        if self.pool is not None:
            x = self.pool(x)
        if self.position == "sine":
            x = add_sine_position_encoding(x)
        elif self.position == "coord":
            x = concat_coord_channels(x)
        qkv = self.qkv(x)  # [B, 2*dk + dv, H', W'], split as (q, k, v)
        b, _, h, w = qkv.shape
        nh, dkh, dvh = self.num_heads, self.dkh, self.dvh
        q, k, v = qkv.split([self.dk, self.dk, self.dv], dim=1)
        q = q.reshape(b, nh, dkh, h, w).permute(0, 1, 3, 4, 2)
        k = k.reshape(b, nh, dkh, h, w).permute(0, 1, 3, 4, 2)
        v = v.reshape(b, nh, dvh, h, w).permute(0, 1, 3, 4, 2)
        return q, k, v

    def relative_tables(self, height, width) -> tuple[Tensor | None, Tensor | None]:
        """(r^H, r^W) for an attention grid of height x width (resampled if needed)."""
        if self.rel_h is None:
            return None, None
        return resample_relative_table(self.rel_h, height), resample_relative_table(self.rel_w, width)

    def forward(self, x: Tensor) -> Tensor:
        conv_out = self.conv(x) if self.conv is not None else None
        if self.qkv is None:
            return conv_out
        q, k, v = self.attention_inputs(x)
        b, nh, h, w, _ = q.shape
        rel_h, rel_w = self.relative_tables(h, w)
        attn = relative_attention_2d(q, k, v, rel_h, rel_w, backend=self.backend)  # [B, Nh, H', W', dvh]
        if self.attention_capture is not None:
            with torch.no_grad():
                index = self.attention_capture.query_index(h, w, q.device)
                self.attention_capture.maps = attention_probabilities(q, k, rel_h, rel_w, index)
        attn = self.proj(attn.permute(0, 1, 4, 2, 3).reshape(b, self.dv, h, w))  # Concat[O_1..O_Nh] W_O
        if conv_out is None:
            return attn
        return torch.cat([conv_out, attn], dim=1)


@contextlib.contextmanager
def attention_backend(model: nn.Module, backend: str) -> Iterator[int]:
    """Run every AugmentedConv2d of ``model`` with ``backend`` inside the block (restored after);
    yields the number of layers switched."""
    layers = [m for m in model.modules() if isinstance(m, AugmentedConv2d)]
    saved = [m.backend for m in layers]
    for m in layers:
        m.backend = backend
    try:
        yield len(layers)
    finally:
        for m, b in zip(layers, saved):
            m.backend = b
