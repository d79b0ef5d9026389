"""benchmarks/gpu_check.sh cannot run here (no GPU); its Python steps run with --device cpu --smoke
so that the script is not dead on arrival: every step writes its JSON + Markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_step(step: str, out_dir: Path) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            step,
            "--device",
            "cpu",
            "--smoke",
            "--out-dir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (out_dir / f"{step}.md").is_file()
    return json.loads((out_dir / f"{step}.json").read_text())


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_correctness_step_smoke(tmp_path):
    pytest.importorskip("triton")
    record = run_step("correctness", tmp_path)
    rows = {(r["dtype"], r["backend"]): r for r in record["rows"]}
    assert set(rows) == {(d, b) for d in ("torch.float32", "torch.bfloat16") for b in ("chunked", "triton")}
    for (dtype, _), row in rows.items():
        bound = 1e-5 if dtype == "torch.float32" else 5e-2
        assert all(row[k] < bound for k in ("out", "q", "k", "v", "rel_h", "rel_w")), row


@pytest.mark.slow
def test_layer_step_smoke(tmp_path):
    pytest.importorskip("triton")
    rows = run_step("layer", tmp_path)["rows"]
    assert {r["backend"] for r in rows} == {"chunked", "triton", "floor (flash SDPA, content only)"}
    assert all("error" not in r and r["ms"] > 0 for r in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("step", ["models", "detection"])
def test_model_steps_smoke(tmp_path, step):
    rows = run_step(step, tmp_path)["rows"]
    assert rows and all("error" not in r for r in rows), rows


@pytest.mark.slow
def test_whole_script_smoke(tmp_path):
    env = {**os.environ, "AA_GPU_CHECK_VENV": sys.prefix, "AA_GPU_CHECK_OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--smoke"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "## detection" in (tmp_path / "README.md").read_text()
