"""torch.compile with the inductor backend (generated C++ on CPU) of a small AA network: forward and
backward equal to eager. tests/models/test_models_compile.py checks graph capture with ``aot_eager``; this
one runs the code inductor generates, the path a ``torch.compile`` user gets."""

import pytest
import timm
import torch

import aa_lightning  # noqa: F401  (registers the AA models)
from aa_lightning.layers import augmented_layers

# aa_resnet50's Bottleneck blocks, one per stage, 8-64 base channels at 64 px: AA layers at 8x8,
# 4x4 and 2x2 (strided, pooled attention input), each with relative tables
NARROW = {
    "layers": (1, 1, 1, 1),
    "channels": (8, 16, 32, 64),
    "stem_width": 16,
    "aa_heads": 2,
    "img_size": 64,
    "num_classes": 5,
    "zero_init_last": False,
}  # a zero last BN per block would cut the AA layers' gradient


@pytest.mark.slow
def test_inductor_compiled_aa_network_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = timm.create_model("aa_resnet50", **NARROW).train()
    assert len(augmented_layers(model)) == 3
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in eager_grads.items() if "rel_" in n)
    model.load_state_dict(state)  # the BatchNorm running stats as before the eager step
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    torch._dynamo.reset()
