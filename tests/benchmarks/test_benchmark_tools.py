"""Stand-ins the benchmark scripts measure with (benchmarks/ is not a package: imported by path)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from model_benchmark import free_attention  # noqa: E402


def test_the_free_attention_stand_in_keeps_the_graph_and_its_shapes():
    """--attention free: out is v; dO reaches v, zeros reach q, k and the tables (so every
    parameter before the attention still gets a gradient of the right shape)."""
    q, k = (torch.randn(2, 3, 4, 5, 6, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 4, 5, 2, requires_grad=True)
    rel_h, rel_w = torch.randn(7, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    out = free_attention(q, k, v, rel_h, rel_w)
    assert torch.equal(out, v) and out.data_ptr() != v.data_ptr()
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, rel_h, rel_w], grad)
    assert torch.equal(grads[2], grad)
    for g, t in zip(grads[:2] + grads[3:], (q, k, rel_h, rel_w)):
        assert g.shape == t.shape and not g.any()
    out = free_attention(q, k, v)  # content-only layers: no tables
    assert torch.equal(torch.autograd.grad(out, v, grad)[0], grad)


def test_the_roofline_counts_come_from_the_models_shapes():
    """benchmarks/roofline.py: aa_resnet50's AA layers read off the built model (4 x 28x28 dkh 3,
    6 x 14x14 dkh 6, 3 x 7x7 dkh 13 at Nh 8), and per logit and training step 4 dkh + 3 dvh
    multiply-adds (the issue's 18 at dkh 3 / dvh 2, 86 at dkh 20 / dvh 2) and 2 exponentials."""
    from roofline import attention_shapes, counts

    assert attention_shapes("aa_resnet50", {}, 8) == {
        (8, 8, 28, 28, 3, 2): 4,
        (8, 8, 14, 14, 6, 3): 6,
        (8, 8, 7, 7, 13, 6): 3,
    }
    for shape, madds in (((8, 8, 28, 28, 3, 2), 18), ((1, 8, 32, 32, 20, 2), 86)):
        logits = shape[0] * shape[1] * (shape[2] * shape[3]) ** 2
        step = counts(shape)["forward+backward"]
        assert (step["madds"], step["exps"]) == (madds * logits, 2 * logits)
        forward = counts(shape)["forward"]
        assert (forward["madds"], forward["exps"]) == ((shape[4] + shape[5]) * logits, logits)
