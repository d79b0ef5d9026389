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


# Per-target block sizes (ops.block_sizes): at 5 x 10 (16-column key blocks, L = 50 -> 64 queries)
# sm_75 halves the forward's and dq pass's key blocks, sm_120 the 16-bit dk/dv pass's query block.
TARGET_SHAPE = (1, 2, 5, 10, 8, 4)


@interpreter_case
@pytest.mark.parametrize(
    "capability, dtype",
    [(75, torch.float16), (75, torch.float32), (100, torch.bfloat16), (120, torch.bfloat16), (120, torch.float16)],
)
def test_triton_block_sizes_of_each_target_match_the_loop_reference(interpreted, monkeypatch, capability, dtype):
    """The blocks chosen for a target run here as on that GPU (the interpreter takes the target's
    block sizes when ``ops.capability`` reports it) and give the loop reference's numbers."""
    h, w, dkh, dvh = TARGET_SHAPE[2:]
    default = {k: interpreted.block_sizes(h, w, dkh, dvh, k, dtype) for k in interpreted.KERNELS}
    chosen = {k: interpreted.block_sizes(h, w, dkh, dvh, k, dtype, capability) for k in interpreted.KERNELS}
    if capability == 75:
        assert [chosen[k].block_n for k in interpreted.KERNELS] == [32, 32, 64] != [b.block_n for b in default.values()]
    if capability == 120:
        assert chosen["_bwd_dkdv"].block_m == 32 < default["_bwd_dkdv"].block_m == 64
    monkeypatch.setattr(interpreted, "capability", lambda device: capability)
    inputs = make_inputs(*TARGET_SHAPE, dtype=torch.float32, seed=11)
    inputs = [t.to(dtype).float() if i < 3 else t for i, t in enumerate(inputs)]  # the same values in both
    weights = torch.randn(*TARGET_SHAPE[:4], TARGET_SHAPE[5], generator=torch.Generator().manual_seed(2))
    want, want_grads = loop_output_and_grads(inputs, weights)
    out, grads = triton_output_and_grads(inputs, weights, dtype)
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=4 * tol, atol=4 * tol)


def _refusing_launch(interpreted, monkeypatch, refused_kernels, error):
    """ops._launch raising ``error`` for ``refused_kernels`` (a stand-in for a GPU refusing them);
    returns the list of kernels launched."""
    from aa_lightning.kernels.triton import fallback

    monkeypatch.setattr(fallback, "_REFUSED", set())
    launched, launch = [], interpreted._launch

    def stand_in(kernel, *args):
        launched.append(kernel)
        if kernel in refused_kernels:
            raise error
        return launch(kernel, *args)

    monkeypatch.setattr(interpreted, "_launch", stand_in)
    return launched


def _out_of_resources():
    import triton

    return triton.OutOfResources(101 * 1024, 99 * 1024, "shared memory")


@interpreter_case
@pytest.mark.parametrize("refused", [("_fwd",), ("_bwd_dkdv",)])
def test_triton_launch_refused_falls_back_to_chunked_with_one_warning(interpreted, monkeypatch, refused):
    """A kernel the GPU refuses (triton's OutOfResources) -> the chunked backend's numbers, one warning
    naming the shape and the GPU; the next call of that shape goes straight to chunked, silently."""
    import warnings

    launched = _refusing_launch(interpreted, monkeypatch, refused, _out_of_resources())
    shape = (2, 2, 3, 5, 4, 3)
    inputs = make_inputs(*shape, dtype=torch.float32, seed=7)
    weights = torch.randn(*shape[:4], shape[5], generator=torch.Generator().manual_seed(1))
    want, want_grads = loop_output_and_grads(inputs, weights)
    with pytest.warns(RuntimeWarning) as caught:
        out, grads = triton_output_and_grads(inputs, weights, torch.float32)
    messages = [str(w.message) for w in caught if "refused" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"kernel {refused[0]} for H x W = 3 x 5, dkh 4, dvh 3, float32" in messages[0], messages[0]
    assert "cpu (triton interpreter)" in messages[0] and "'chunked'" in messages[0], messages[0]
    assert launched == (["_fwd"] if refused == ("_fwd",) else ["_fwd", "_bwd_dq", "_bwd_dkdv"])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    for name, got, expected in zip(("q", "k", "v", "rel_h", "rel_w"), grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    launched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again, again_grads = triton_output_and_grads(inputs, weights, torch.float32)
    assert launched == []  # straight to chunked, forward and backward
    torch.testing.assert_close(again, out)
    other = make_inputs(1, 1, 4, 4, 4, 3, dtype=torch.float32, seed=8)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        relative_attention_2d(*other, backend="triton")
    assert launched == ["_fwd"]  # another shape: the kernels are tried again (and refused again if _fwd)
    assert [str(w.message)[:60] for w in later if "refused" in str(w.message)] == (
        ["the Triton attention kernel _fwd for H x W = 4 x 4, dkh 4, d"] if refused == ("_fwd",) else []
    )


@interpreter_case
def test_triton_cuda_launch_out_of_resources_falls_back_and_other_errors_surface(interpreted, monkeypatch):
    """cuLaunchKernel's CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (as triton's launcher raises it) falls
    back too; any other RuntimeError is a bug and is raised."""
    inputs = make_inputs(1, 1, 3, 4, 4, 2, dtype=torch.float32, seed=9)
    refusal = RuntimeError("Triton Error [CUDA]: too many resources requested for launch")
    _refusing_launch(interpreted, monkeypatch, ("_fwd",), refusal)
    with pytest.warns(RuntimeWarning, match="too many resources requested for launch"):
        out = relative_attention_2d(*inputs, backend="triton")
    torch.testing.assert_close(out.double(), loop_relative_attention(*inputs), rtol=1e-5, atol=2e-6)
    _refusing_launch(interpreted, monkeypatch, ("_fwd",), RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        relative_attention_2d(*inputs, backend="triton")


@interpreter_case
def test_triton_refusal_falls_back_under_torch_compile(interpreted, monkeypatch):
    """The fallback lives inside the custom op, so a compiled graph (one op node) falls back too."""
    _refusing_launch(interpreted, monkeypatch, ("_fwd",), _out_of_resources())
    inputs = make_inputs(1, 2, 3, 4, 4, 2, dtype=torch.float32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda *t: relative_attention_2d(*t, backend="triton"), fullgraph=True, backend=lambda gm, _: gm.forward
    )
    with pytest.warns(RuntimeWarning, match="refused by the GPU"):
        out = compiled(*inputs)
    torch.testing.assert_close(out.detach().double(), loop_relative_attention(*inputs), rtol=1e-5, atol=2e-6)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)
    torch._dynamo.reset()


def test_refusal_warning_names_the_gpu(monkeypatch):
    """The warning names a CUDA device by its name and compute capability."""
    from aa_lightning.kernels.triton import fallback

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert fallback._gpu_name(torch.device("cuda", 0)) == "Tesla T4 (compute capability 7.5, sm_75)"


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
