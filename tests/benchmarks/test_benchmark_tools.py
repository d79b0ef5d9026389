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


def test_onnx_benchmark_compares_each_aa_runner_with_the_baseline_of_its_own_runtime():
    import pytest
    from onnx_benchmark import markdown, parse_args

    def row(model, runtime, rounds, **extra):
        return dict(model=model, runtime=runtime, input="8x8", pair="aa:base", img_per_s=sorted(rounds)[1], **extra)

    rows = [
        row("aa", "torch eager", [8.0, 9.0, 10.0], rounds_img_per_s=[8.0, 9.0, 10.0]),
        row("aa", "onnxruntime (onnx, opset 23)", [3.0, 6.0, 9.0], rounds_img_per_s=[3.0, 6.0, 9.0]),
        row("base", "torch eager", [10.0, 10.0, 10.0], rounds_img_per_s=[10.0, 10.0, 10.0]),
        row("base", "onnxruntime", [20.0, 30.0, 30.0], rounds_img_per_s=[20.0, 30.0, 30.0]),
    ]
    lines = markdown(rows).splitlines()
    eager, ort = lines[2].split(" | "), lines[3].split(" | ")
    assert eager[4] == "**0.90** (vs base)" and eager[5] == "0.80..1.00 (median 0.90)"
    assert ort[4] == "**0.20** (vs base)" and ort[5] == "0.15..0.30 (median 0.20)"  # against onnxruntime's base
    assert ort[6] == "0.67x"  # onnxruntime / eager of the same model
    with pytest.raises(SystemExit):
        parse_args(["--forms", "chunked@23"])  # no ONNX form


def test_the_attention_budget_is_the_goal_s_time_left_after_the_free_attention_bound():
    """benchmarks/attention_budget.py: baseline step T = 1000 B / img/s; budget = T (1/goal - 1/bound);
    needed = floor / budget, and no budget (inf) where the bound is below the goal. Worked by hand:
    baseline 10 img/s at batch 8 (T = 800 ms), free AA 9 img/s (bound 0.9), goal 0.8 ->
    budget 800 (1.25 - 1.111...) = 111.1 ms; floor 50 ms -> needed 0.45."""
    import pytest
    from attention_budget import budget_rows, markdown
    from model_benchmark import GOALS

    aa, base, dtype, channels_last, _ = GOALS[0]

    def speed(model, mode, img_per_s, rounds):
        return dict(
            model=model,
            mode=mode,
            dtype=dtype,
            channels_last=channels_last,
            img_per_s=img_per_s,
            rounds_img_per_s=rounds,
        )

    free = {
        "header": "machine: x; batch 8; 3 rounds",
        "rows": [
            speed(aa, "train", 9.0, [9.0, 8.0, 9.5]),
            speed(base, "train", 10.0, [10.0, 10.0, 10.0]),
            speed(aa, "infer", 5.0, [5.0, 5.0, 5.0]),
            speed(base, "infer", 10.0, [10.0, 10.0, 10.0]),
        ],
    }
    model_row = dict(model=aa, HxW="(model)", dtype=dtype, B=8, kernel_ms=100.0, fraction=0.5)
    roofline = {
        "rows": [
            dict(model_row, **{"pass": "forward+backward", "floor_ms": 50.0}),
            dict(model_row, **{"pass": "forward", "floor_ms": 20.0}),
        ]
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("attention_budget.GOALS", [(aa, base, dtype, channels_last, 0.8)])
        train, infer = budget_rows(free, roofline)
        assert train["baseline_step_ms"] == pytest.approx(800.0)
        assert train["budget_ms"] == pytest.approx(800 * (1 / 0.8 - 1 / 0.9))
        assert train["needed"] == pytest.approx(50.0 / (800 * (1 / 0.8 - 1 / 0.9)))
        assert train["bound_rounds"] == pytest.approx([0.8, 0.95])
        assert infer["bound"] == pytest.approx(0.5) and infer["needed"] == float("inf")  # the rest alone misses 0.8
        assert "none: the bound is below the goal" in markdown([train, infer])
        with pytest.raises(ValueError, match="batch 8, the roofline batch 4"):
            budget_rows(free, {"rows": [dict(r, B=4) for r in roofline["rows"]]})
