"""torch.compile of a whole AA network: no graph breaks, forward and backward equal to eager.

A narrow AA-ResNet (aa_resnet50's Bottleneck blocks, one per stage, 8-64 base channels, 64 px)
has every kind of AA layer the full model has: strided (pooled attention input) and unstrided,
at three grid sizes. ``benchmarks/compile_check.py`` runs the same check on the full aa_resnet50.
"""

import pytest
import timm
import torch

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.layers import augmented_layers

NARROW = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=16, aa_heads=2, img_size=64, num_classes=5)


@pytest.fixture
def narrow_model():
    torch.manual_seed(0)
    model = timm.create_model("aa_resnet50", **NARROW).train()
    assert len(augmented_layers(model)) == 3  # stages 2-4, the stride-2 first block of each
    return model


def test_forward_has_no_graph_breaks(narrow_model):
    explanation = torch._dynamo.explain(narrow_model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fullgraph_compile_matches_eager_forward_and_backward(narrow_model):
    x = torch.randn(2, 3, 64, 64)
    eager_out = narrow_model(x)
    eager_out.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in narrow_model.named_parameters()}
    narrow_model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(narrow_model, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for name, param in narrow_model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
