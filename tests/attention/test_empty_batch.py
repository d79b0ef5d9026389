"""An empty batch [0, 3, H, W] gives an empty output and defined gradients, as timm's own ResNet does:
from every attention backend (relative_attention_2d) and from every AA model family."""

from __future__ import annotations

import pytest
import timm
import torch

import aa_lightning  # noqa: F401  (registers the models)
from aa_lightning.attention import BACKENDS, relative_attention_2d

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "content"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_every_backend(backend, relative):
    nh, h, w, dkh, dvh = 2, 3, 5, 4, 6
    q, k = (torch.randn(0, nh, h, w, dkh, requires_grad=True) for _ in range(2))
    v = torch.randn(0, nh, h, w, dvh, requires_grad=True)
    tables = (torch.randn(2 * h - 1, dkh, requires_grad=True), torch.randn(2 * w - 1, dkh, requires_grad=True))
    out = relative_attention_2d(q, k, v, *(tables if relative else (None, None)), backend=backend)
    assert out.shape == (0, nh, h, w, dvh)
    out.sum().backward()
    for t in (q, k, v, *(tables if relative else ())):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("name", ["aa_resnet26", "aa_wrn28_10", "aa_mnasnet_100"])
def test_empty_batch_models(name):
    size = 16 if name == "aa_wrn28_10" else 64
    model = timm.create_model(name, num_classes=7, img_size=size).train()
    reference = timm.create_model("resnet18", num_classes=7).train()
    images = torch.zeros(0, 3, size, size, requires_grad=True)
    assert reference(images).shape == (0, 7)  # what timm's ResNet does
    logits = model(images)
    assert logits.shape == (0, 7)
    logits.sum().backward()
    assert images.grad.shape == images.shape
    with torch.no_grad():
        assert model.eval()(torch.zeros(0, 3, size, size)).shape == (0, 7)
