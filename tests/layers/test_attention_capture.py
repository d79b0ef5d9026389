"""Captured attention maps are the layer's real attention probabilities for the chosen queries."""

import pytest
import torch
from torch import nn

from aa_lightning.attention import relative_attention_reference
from aa_lightning.layers import AugmentedConv2d, capture_attention


def explicit_probabilities(q, k, rel_h, rel_w):
    """[B, Nh, HW, HW] softmax of the reference backend's logits (recomputed explicitly)."""
    b, nh, h, w, dkh = q.shape
    eye = torch.eye(h * w, dtype=q.dtype).reshape(1, 1, h, w, h * w).expand(b, nh, h, w, h * w)
    # attention applied to one-hot values returns the probability rows themselves
    return relative_attention_reference(q, k, eye, rel_h, rel_w).reshape(b, nh, h * w, h * w)


@pytest.mark.parametrize("position", ["relative", "none"])
@pytest.mark.parametrize("backend", ["chunked", "fused"])
def test_captured_maps_match_reference_attention(position, backend):
    torch.manual_seed(0)
    layer = AugmentedConv2d(6, 12, 3, 2, dk=4, dv=4, num_heads=2, position=position, feat_size=(9, 12), backend=backend)
    model = nn.Sequential(layer).double()
    x = torch.randn(2, 6, 9, 12, dtype=torch.float64)
    plain = model(x)
    queries = [(0.0, 0.0), (0.5, 0.5), (0.99, 0.3)]
    with capture_attention(model, queries) as captures:
        out = model(x)
    torch.testing.assert_close(out, plain)  # capture does not change the training path
    cap = captures["0"]
    maps, pixels = cap.maps, cap.query_pixels
    assert maps.shape == (2, 2, 3, 5, 6)
    torch.testing.assert_close(maps.sum(dim=(-1, -2)), torch.ones(2, 2, 3, dtype=maps.dtype))
    assert pixels.tolist() == [[0, 0], [2, 3], [4, 1]]
    q, k, _ = layer.attention_inputs(x)
    probs = explicit_probabilities(q, k, *layer.relative_tables(5, 6))
    index = pixels[:, 0] * 6 + pixels[:, 1]
    torch.testing.assert_close(maps, probs[:, :, index].reshape(2, 2, 3, 5, 6).float(), rtol=1e-5, atol=1e-6)
    assert layer.attention_capture is None  # switched off on exit


def test_capture_errors_name_the_layers():
    model = nn.Sequential(AugmentedConv2d(4, 8, 3, dk=4, dv=4, num_heads=2, feat_size=4))
    with pytest.raises(ValueError, match=r"available: \['0'\]"):
        with capture_attention(model, [(0.5, 0.5)], layers=["layer9"]):
            pass
    with capture_attention(model, [(1.5, 0.5)]):
        with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
            model(torch.randn(1, 4, 4, 4))
