"""relative_attention_2d: every backend against an independent float64 loop of the equation."""

import os

import pytest
import torch
from helpers.attention_loop_reference import loop_relative_attention, make_inputs

from aa_lightning.attention import rel_to_abs, relative_attention_2d, resolve_backend

EXACT_BACKENDS = ["reference", "chunked", "cpu_kernel", "fused", "onnx"]


SHAPES = [  # (B, Nh, H, W, dkh, dvh): non-square, dkh != dvh, H or W = 1
    (2, 2, 3, 5, 4, 3),
    (1, 3, 4, 2, 2, 5),
    (1, 2, 1, 6, 3, 2),
    (2, 1, 5, 1, 3, 3),
    (1, 1, 1, 1, 2, 2),
]


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_loop_reference_with_relative_terms(backend, shape):
    q, k, v, rel_h, rel_w = make_inputs(*shape)
    expected = loop_relative_attention(q, k, v, rel_h, rel_w)
    out = relative_attention_2d(q, k, v, rel_h, rel_w, backend=backend)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_backends_match_loop_reference_content_only(backend, shape):
    q, k, v, _, _ = make_inputs(*shape)
    expected = loop_relative_attention(q, k, v)
    torch.testing.assert_close(relative_attention_2d(q, k, v, backend=backend), expected, rtol=1e-10, atol=1e-12)


def test_relative_terms_change_the_output():
    q, k, v, rel_h, rel_w = make_inputs(1, 2, 3, 4, 3, 2)
    with_rel = relative_attention_2d(q, k, v, rel_h, rel_w, backend="chunked")
    without = relative_attention_2d(q, k, v, backend="chunked")
    assert (with_rel - without).abs().max() > 1e-3


def test_chunked_backend_is_exact_across_chunk_boundaries(monkeypatch):
    import aa_lightning.attention.chunked as chunked

    q, k, v, rel_h, rel_w = make_inputs(2, 2, 5, 3, 4, 3)
    whole = relative_attention_2d(q, k, v, rel_h, rel_w, backend="chunked")
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 1)  # one query row per chunk
    rows = relative_attention_2d(q, k, v, rel_h, rel_w, backend="chunked")
    torch.testing.assert_close(rows, whole, rtol=1e-12, atol=1e-12)


def test_rel_to_abs_matches_its_definition():
    x = torch.randn(2, 3, 5, 9, dtype=torch.float64)
    out = rel_to_abs(x)
    for i in range(5):
        for j in range(5):
            torch.testing.assert_close(out[:, :, i, j], x[:, :, i, j - i + 4])


@pytest.mark.parametrize("backend", ["chunked", "cpu_kernel", "fused", "onnx", "reference"])
def test_gradcheck(backend, monkeypatch):
    import aa_lightning.attention.chunked as chunked

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 64)  # several chunks in backward
    inputs = make_inputs(1, 2, 2, 3, 3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: relative_attention_2d(*t, backend=backend), inputs)


def test_gradients_match_reference_float32():
    inputs = make_inputs(2, 4, 6, 7, 8, 4, dtype=torch.float32, requires_grad=True)
    grads = {}
    for backend in EXACT_BACKENDS:
        for t in inputs:
            t.grad = None
        out = relative_attention_2d(*inputs, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[backend] = [t.grad.clone() for t in inputs]
        assert all(g.abs().sum() > 0 for g in grads[backend])
    for backend in ("chunked", "cpu_kernel", "fused", "onnx"):
        for got, want in zip(grads[backend], grads["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "cpu_kernel", "fused"])
def test_fp32_and_bf16_autocast_against_reference(backend):
    q, k, v, rel_h, rel_w = make_inputs(2, 4, 8, 6, 8, 4, dtype=torch.float32)
    ref = relative_attention_2d(q, k, v, rel_h, rel_w, backend="reference")
    out = relative_attention_2d(q, k, v, rel_h, rel_w, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = relative_attention_2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), rel_h, rel_w, backend=backend)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", ["chunked", "cpu_kernel"])
def test_bf16_autocast_backward_reaches_every_input(backend):
    inputs = make_inputs(1, 2, 4, 4, 4, 4, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relative_attention_2d(*inputs, backend=backend)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in inputs)


def test_input_errors():
    q, k, v, rel_h, rel_w = make_inputs(1, 2, 3, 4, 3, 2)
    with pytest.raises(ValueError, match="together"):
        relative_attention_2d(q, k, v, rel_h, None)
    with pytest.raises(ValueError, match=r"rel_h must be \[2H-1, dkh\] = \[5, 3\]"):
        relative_attention_2d(q, k, v, rel_w, rel_w)
    with pytest.raises(ValueError, match="backend must be one of"):
        relative_attention_2d(q, k, v, rel_h, rel_w, backend="magic")
    with pytest.raises(ValueError, match=r"q, k must be \[B, Nh, H, W, dkh\]"):
        relative_attention_2d(q[0], k[0], v[0])


def _triton_importable(monkeypatch, importable: bool) -> None:
    """The registered triton backend, as if triton were (not) installed."""
    import dataclasses

    from aa_lightning.attention import registry

    triton = dataclasses.replace(registry.get_backend("triton"), available=lambda: importable)
    monkeypatch.setitem(registry._REGISTRY, "triton", triton)


def test_auto_dispatch_on_cuda_is_triton_with_chunked_fallback(monkeypatch):
    cuda = torch.device("cuda")
    _triton_importable(monkeypatch, True)
    assert resolve_backend("auto", cuda) == "triton"
    assert resolve_backend("auto", torch.device("mps")) == "fused"
    _triton_importable(monkeypatch, False)
    assert resolve_backend("auto", cuda) == "chunked"
    with pytest.raises(ValueError, match="'triton' needs the triton package"):
        resolve_backend("triton", cuda)


def test_triton_available_is_importability(monkeypatch):
    import importlib.util

    from aa_lightning.attention import backend_available

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert backend_available("triton") is False
    monkeypatch.undo()
    assert backend_available("triton") is (importlib.util.find_spec("triton") is not None)


def test_triton_backend_scales_q_and_reshapes_for_the_kernel(monkeypatch):
    """The dispatch path up to the kernel call, on CPU: the kernel sees [B*Nh, H, W, d] with q scaled."""
    import sys
    import types

    calls = []

    def fake_kernel(q, k, v, rel_h, rel_w):
        calls.append((q, k, v, rel_h, rel_w))
        return torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    fake = types.SimpleNamespace(DTYPES=dtypes, triton_relative_attention=fake_kernel)
    monkeypatch.setitem(sys.modules, "aa_lightning.kernels.triton.ops", fake)
    import aa_lightning.kernels.triton as triton_package

    monkeypatch.setattr(triton_package, "ops", fake, raising=False)
    q, k, v, rel_h, rel_w = make_inputs(2, 3, 4, 5, 6, 2, dtype=torch.float32)
    out = relative_attention_2d(q, k, v, rel_h, rel_w, backend="triton")
    assert out.shape == (2, 3, 4, 5, 2)
    ((kq, kk, kv, kh, kw),) = calls
    torch.testing.assert_close(kq, q.reshape(6, 4, 5, 6) * 6**-0.5)
    assert kk.shape == (6, 4, 5, 6) and kv.shape == (6, 4, 5, 2) and kh is rel_h and kw is rel_w


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs the kernels on CPU")
def test_triton_backend_refuses_cpu_tensors_clearly():
    pytest.importorskip("triton")
    inputs = make_inputs(1, 1, 2, 2, 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors; got cpu"):
        relative_attention_2d(*inputs, backend="triton")
