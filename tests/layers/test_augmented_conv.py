"""AugmentedConv2d: the layer computes Concat[Conv(X), MHA(X)] exactly, at any size and stride."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.attention_loop_reference import loop_relative_attention

from aa_lightning.layers import AugmentedConv2d, aa_dims, resample_relative_table, sine_position_encoding_2d


@torch.no_grad()
def manual_aaconv(layer: AugmentedConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's equation written out with its weights and the float64 loop attention."""
    conv = F.conv2d(x, layer.conv.weight, None, layer.stride, layer.kernel_size // 2)
    a = F.avg_pool2d(x, layer.stride, layer.stride, ceil_mode=True, count_include_pad=False) if layer.stride > 1 else x
    qkv = F.conv2d(a, layer.qkv.weight, layer.qkv.bias)
    b, _, h, w = qkv.shape
    nh, dk, dv = layer.num_heads, layer.dk, layer.dv
    heads = lambda t, d: t.reshape(b, nh, d // nh, h, w).permute(0, 1, 3, 4, 2)  # noqa: E731
    q, k, v = heads(qkv[:, :dk], dk), heads(qkv[:, dk : 2 * dk], dk), heads(qkv[:, 2 * dk :], dv)
    o = loop_relative_attention(q, k, v, layer.rel_h, layer.rel_w)  # [B, Nh, H, W, dvh]
    o = torch.cat([o[:, n].permute(0, 3, 1, 2) for n in range(nh)], dim=1)  # Concat[O_1..O_Nh]
    return torch.cat([conv, F.conv2d(o, layer.proj.weight, layer.proj.bias)], dim=1)


@pytest.mark.parametrize("stride,size", [(1, (4, 5)), (2, (5, 6)), (2, (4, 4))])
def test_layer_equals_its_equation(stride, size):
    torch.manual_seed(0)
    layer = AugmentedConv2d(6, 10, 3, stride, dk=4, dv=4, num_heads=2, feat_size=size).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 10, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    torch.testing.assert_close(out, manual_aaconv(layer, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("position", ["relative", "none", "sine", "coord"])
@pytest.mark.parametrize("stride", [1, 2])
def test_shapes_and_gradients(position, stride):
    layer = AugmentedConv2d(8, 16, 3, stride, dk=8, dv=8, num_heads=2, position=position, feat_size=(9, 7))
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 16, math.ceil(9 / stride), math.ceil(7 / stride))
    out.square().mean().backward()
    assert x.grad is not None
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (layer.rel_h is not None) == (position == "relative")


def test_fully_attentional_and_plain_conv_extremes():
    full = AugmentedConv2d(8, 16, 3, dk=8, dv=16, num_heads=4, feat_size=6)
    assert full.conv is None and full(torch.randn(1, 8, 6, 6)).shape == (1, 16, 6, 6)
    plain = AugmentedConv2d(8, 16, 3, dk=8, dv=0, num_heads=4, feat_size=6)
    assert plain.qkv is None and plain.rel_h is None
    assert sum(p.numel() for p in plain.parameters()) == 16 * 8 * 9
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.conv.weight, padding=1))


def test_parameter_count_matches_the_paper_formula():
    fin, fout, dk, dv, nh, h, w = 32, 64, 16, 8, 4, 7, 9
    layer = AugmentedConv2d(fin, fout, 3, dk=dk, dv=dv, num_heads=nh, feat_size=(h, w))
    conv = fin * (fout - dv) * 9
    qkv = fin * (2 * dk + dv) + (2 * dk + dv)
    proj = dv * dv + dv
    rel = (2 * (h + w) - 2) * (dk // nh)
    assert sum(p.numel() for p in layer.parameters()) == conv + qkv + proj + rel


def test_other_input_sizes_resample_the_tables():
    layer = AugmentedConv2d(4, 8, 3, dk=4, dv=4, num_heads=2, feat_size=(5, 5))
    assert layer.rel_h.shape == (9, 2)
    out = layer(torch.randn(1, 4, 11, 3))
    assert out.shape == (1, 8, 11, 3)
    rel_h, rel_w = layer.relative_tables(11, 3)
    assert rel_h.shape == (21, 2) and rel_w.shape == (5, 2)
    # endpoints and the zero offset are kept; in between is linear interpolation
    torch.testing.assert_close(rel_h[0], layer.rel_h[0])
    torch.testing.assert_close(rel_h[10], layer.rel_h[4])
    torch.testing.assert_close(rel_h[-1], layer.rel_h[-1])
    torch.testing.assert_close(rel_h[1], layer.rel_h[0] + (layer.rel_h[1] - layer.rel_h[0]) * 0.4)
    torch.testing.assert_close(rel_w, layer.rel_w[::2])  # 9 -> 5 rows picks every other offset
    same = layer.relative_tables(5, 5)
    assert same[0] is layer.rel_h


def test_resample_to_and_from_one_pixel():
    table = torch.arange(10.0).reshape(5, 2)
    torch.testing.assert_close(resample_relative_table(table, 1), table[2:3])
    assert resample_relative_table(table[2:3], 4).shape == (7, 2)


def test_relative_init_std_default_and_configurable():
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 64, 3, dk=64, dv=32, num_heads=1, feat_size=200)
    dkh = 64
    assert abs(layer.rel_h.std().item() - dkh**-0.5) < 0.01
    assert abs(layer.rel_h.mean().item()) < 0.01
    custom = AugmentedConv2d(8, 64, 3, dk=64, dv=32, num_heads=1, feat_size=200, rel_init_std=1.0)
    assert abs(custom.rel_w.std().item() - 1.0) < 0.05


def test_sine_encoding_definition():
    enc = sine_position_encoding_2d(3, 4, 8, torch.float64, torch.device("cpu"))
    assert enc.shape == (8, 3, 4)
    # first half encodes y (constant along x), second half x (constant along y)
    assert torch.all(enc[:4, :, 0:1] == enc[:4]) and torch.all(enc[4:, 0:1, :] == enc[4:])
    torch.testing.assert_close(enc[0, 2, 0].item(), math.sin(2.0))
    torch.testing.assert_close(enc[1, 2, 0].item(), math.cos(2.0))
    torch.testing.assert_close(enc[6, 0, 3].item(), math.sin(3.0 / 10000 ** (2 / 4)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dk=6, dv=8, num_heads=4), "dk must be divisible by num_heads=4"),
        (dict(dk=8, dv=6, num_heads=4), "dv must be divisible by num_heads=4"),
        (dict(dk=8, dv=40, num_heads=4), r"dv must be in \[0, out_channels=32\]"),
        (dict(dk=2, dv=8, num_heads=4), "dk must be >= num_heads=4"),
        (dict(dk=8, dv=8, num_heads=4, position="learned"), "position must be one of"),
        (dict(dk=8, dv=8, num_heads=4, backend="cuda"), "backend must be one of"),
        (dict(dk=8, dv=8, num_heads=4, feat_size=None), "feat_size must be the input"),
    ],
)
def test_invalid_settings_name_the_argument(kwargs, match):
    kwargs.setdefault("feat_size", 8)
    with pytest.raises(ValueError, match=match):
        AugmentedConv2d(16, 32, 3, **kwargs)


def test_aa_dims_rounding():
    assert aa_dims(256, 0.2, 0.1, 8) == (48, 24)  # 51.2 -> 48, 25.6 -> 24
    assert aa_dims(128, 0.2, 0.1, 8) == (24, 16)  # 25.6 -> 24, 12.8 -> 16
    assert aa_dims(160, 0.2, 0.1, 8, min_dkh=20) == (160, 16)  # >= 20 key dims per head
    assert aa_dims(64, 1.0, 1.0, 8) == (64, 64)
    assert aa_dims(64, 0.2, 0.0, 8) == (0, 0)
    assert aa_dims(64, 0.01, 0.01, 8) == (8, 8)  # at least one dim per head
    with pytest.raises(ValueError, match="v = 1.0 needs dv = Fout = 60 divisible by num_heads = 8"):
        aa_dims(60, 1.0, 1.0, 8)
    with pytest.raises(ValueError, match=r"v \(attention channel ratio dv/Fout\) must be in \[0, 1\]"):
        aa_dims(64, 0.2, 1.5, 8)


def test_channels_last_and_backends_agree():
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 16, 3, 2, dk=8, dv=8, num_heads=2, feat_size=(10, 12))
    x = torch.randn(2, 8, 10, 12)
    ref = layer(x)
    cl = layer.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
    for backend in ("reference", "fused"):
        layer.backend = backend
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_fx_symbolic_trace_and_export():
    layer = AugmentedConv2d(4, 8, 3, 2, dk=4, dv=4, num_heads=2, feat_size=(6, 6)).eval()
    gm = torch.fx.symbolic_trace(layer)
    for size in [(6, 6), (9, 5)]:
        x = torch.randn(1, 4, *size)
        torch.testing.assert_close(gm(x), layer(x))
    x = torch.randn(1, 4, 6, 6)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_torch_compile_has_no_graph_breaks():
    layer = AugmentedConv2d(4, 8, 3, 1, dk=4, dv=4, num_heads=2, feat_size=(5, 5))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    assert layer.rel_h.grad is not None


def test_torch_compile_with_dynamic_shapes_picks_the_kernel_per_grid_size():
    """dkh 13: the tiled CPU kernel on a 6x6 grid, the generic one on 15x15 (cpu_kernel.tiled_fits);
    with dynamic shapes that choice is a guard, not a graph break."""
    layer = AugmentedConv2d(4, 32, 3, 1, dk=26, dv=4, num_heads=2, feat_size=(6, 6))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for size in (6, 15):
        x = torch.randn(2, 4, size, size, requires_grad=True)
        out = compiled(x)
        torch.testing.assert_close(out, layer(x))
        out.sum().backward()


@pytest.mark.parametrize("position,backend", [("none", "auto"), ("relative", "fused")])
def test_sdpa_paths_use_a_fused_kernel_not_the_math_fallback(position, backend):
    """torch silently falls back to the (HW)^2 math kernel for unequal or strided head dims."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layer = AugmentedConv2d(8, 16, 3, dk=8, dv=4, num_heads=2, position=position, feat_size=6, backend=backend)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if only the math kernel would do
        layer(x).sum().backward()
