"""backend="triton": the Triton kernels run by triton's interpreter on CPU tensors, against the
independent float64 loop reference (outputs and all five gradients), plus torch.compile.

No GPU needed. TRITON_INTERPRET=1 must be set before triton itself is imported (its standard
library is decorated then), so in a normal run this module re-runs itself in a subprocess with it
set (:func:`test_interpreter_cases_in_a_subprocess`); the cases below run there.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers.attention_loop_gradients import loop_relative_attention_autograd
from helpers.attention_loop_reference import loop_relative_attention, make_inputs

from aa_lightning.attention import relative_attention_2d

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_case = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


def test_interpreter_cases_in_a_subprocess():
    if INTERPRETED:
        pytest.skip("already in the interpreter")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not in_a_subprocess",
        ],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.fixture
def interpreted():
    """The triton ops module, its kernels interpreted (with the interpreter's bfloat16 dot made exact)."""
    from aa_lightning.compat.triton import patch_interpreter_bfloat16_dot
    from aa_lightning.kernels.triton import kernels as triton_kernels
    from aa_lightning.kernels.triton import ops as triton_attention

    patch_interpreter_bfloat16_dot()

    assert not isinstance(triton_kernels._fwd, triton_kernels.triton.JITFunction)
    return triton_attention


def loop_output_and_grads(inputs, weights):
    """The float64 loop reference's output and its gradients w.r.t. (q, k, v, rel_h, rel_w) for the
    loss (out * weights).sum() (autograd through the differentiable loop, checked against the plain one)."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = loop_relative_attention_autograd(*leaves)
    plain = loop_relative_attention(*(t.detach() for t in leaves))
    torch.testing.assert_close(out.detach(), plain, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((out * weights.double()).sum(), leaves)
    return out.detach(), grads


def triton_output_and_grads(inputs, weights, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs[:3]] + [
        t.detach().float().requires_grad_() for t in inputs[3:]
    ]
    out = relative_attention_2d(*leaves, backend="triton")
    grads = torch.autograd.grad((out.float() * weights.float()).sum(), leaves)
    return out, grads


SHAPES = [  # (B, Nh, H, W, dkh, dvh): non-square, H or W = 1, 1x1, odd sizes, dkh != dvh, dkh 3 / 8 / 20 / 64
    (2, 2, 3, 5, 3, 2),
    (1, 2, 4, 2, 8, 5),
    (1, 1, 1, 6, 3, 3),
    (1, 2, 5, 1, 20, 4),
    (1, 1, 1, 1, 3, 2),
    (1, 1, 3, 7, 64, 8),
    (1, 1, 5, 9, 8, 24),  # key blocks of several grid rows, the last one partial
]


@interpreter_case
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_loop_reference_float32(interpreted, shape):
    inputs = make_inputs(*shape, dtype=torch.float32, seed=sum(shape))
    weights = torch.randn(*shape[:4], shape[5], generator=torch.Generator().manual_seed(1))
    want, want_grads = loop_output_and_grads(inputs, weights)
    out, grads = triton_output_and_grads(inputs, weights, torch.float32)
    assert out.dtype == torch.float32 and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    for name, got, expected in zip(("q", "k", "v", "rel_h", "rel_w"), grads, want_grads):
        assert got.shape == expected.shape, name
        message = lambda m, name=name: f"grad {name}: {m}"  # noqa: E731
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-5, msg=message)


@interpreter_case
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_inputs_accumulate_in_float32(interpreted, dtype):
    shape = (1, 2, 4, 6, 8, 4)
    inputs = make_inputs(*shape, dtype=torch.float32, seed=3)
    inputs = [t.to(dtype).float() if i < 3 else t for i, t in enumerate(inputs)]  # the same values in both
    weights = torch.randn(*shape[:4], shape[5], generator=torch.Generator().manual_seed(1))
    want, want_grads = loop_output_and_grads(inputs, weights)
    out, grads = triton_output_and_grads(inputs, weights, dtype)
    assert out.dtype == dtype
    # one rounding of p and of the output to 8 (bf16) / 11 (fp16) bits; sums in float32
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=4 * tol, atol=4 * tol)


@interpreter_case
def test_triton_column_chunks_of_wide_rows(interpreted, monkeypatch):
    """Rows wider than a key block are split into column chunks (W > 32 on a GPU); forced here at 8."""
    monkeypatch.setattr(interpreted, "_MAX_WP", 8)
    shape = (1, 1, 3, 19, 4, 3)
    assert interpreted.block_sizes(3, 19, 4, 3).column_chunks(19) == 3
    inputs = make_inputs(*shape, dtype=torch.float32, seed=5)
    weights = torch.randn(*shape[:4], shape[5], generator=torch.Generator().manual_seed(1))
    want, want_grads = loop_output_and_grads(inputs, weights)
    out, grads = triton_output_and_grads(inputs, weights, torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-5)


@interpreter_case
def test_triton_under_bf16_autocast(interpreted):
    inputs = make_inputs(1, 2, 3, 4, 4, 4, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relative_attention_2d(*inputs, backend="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), loop_relative_attention(*inputs), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and t.grad.abs().sum() > 0 for t in inputs)


@interpreter_case
def test_triton_is_one_op_under_torch_compile(interpreted):
    """fullgraph=True raises on a graph break; the graph holds the custom op, not its internals."""
    inputs = make_inputs(1, 2, 3, 4, 4, 2, dtype=torch.float32, requires_grad=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: relative_attention_2d(*t, backend="triton"), fullgraph=True, backend=backend)
    out = compiled(*inputs)
    eager = relative_attention_2d(*inputs, backend="triton")
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert all(t.grad is not None for t in inputs)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("triton_relative_attention" in t for t in targets) == 1, targets
    torch._dynamo.reset()


def test_triton_op_traces_as_one_node_on_fake_tensors():
    """Without a GPU or the interpreter: make_fx traces the backend through the op's fake
    implementation (the kernels never run), forward and backward, one op node each."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def forward_backward(*t):
        out = relative_attention_2d(*t, backend="triton")
        return torch.autograd.grad(out.sum(), t)

    inputs = make_inputs(2, 2, 3, 5, 4, 3, dtype=torch.float32, requires_grad=True)
    graph = make_fx(forward_backward, tracing_mode="fake")(*inputs)
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert sum(t.startswith("aa_lightning.triton_relative_attention.") for t in targets) == 1, targets
    assert sum(t.startswith("aa_lightning.triton_relative_attention_backward.") for t in targets) == 1, targets
    grads = [node for node in graph.graph.nodes if node.op == "output"][0].args[0]
    assert [tuple(g.meta["val"].shape) for g in grads] == [tuple(t.shape) for t in inputs]
