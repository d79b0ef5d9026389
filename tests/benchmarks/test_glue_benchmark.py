"""benchmarks/glue_benchmark.py: the whole cpu_kernel call of two trees side by side (benchmarks/ is not a
package: imported by path)."""

import sys
from pathlib import Path

import pytest

from aa_lightning.kernels.cpu import available

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from glue_benchmark import ROOT, Worker, measure  # noqa: E402


@pytest.mark.skipif(not available(), reason="no C compiler: the cpu_kernel backend cannot run")
def test_the_glue_benchmark_compares_two_trees_bit_for_bit():
    """Two workers of one tree time the same call and hash the same bits, and the training pass's
    hash is not the forward's (it covers the gradients too)."""
    shape = (1, 2, 3, 3, 2, 2)
    workers = {"now": Worker(ROOT, 1, "float32"), "again": Worker(ROOT, 1, "float32")}
    try:
        rows = measure(shape, workers, rounds=2, inner=1)
        hashes = {
            p: workers["now"].ask(shape=shape, bits=True, **{"pass": p})["bits"]
            for p in ("forward", "forward+backward")
        }
    finally:
        for worker in workers.values():
            worker.close()
    assert [(r["pass"], r["bits"]) for r in rows] == [("forward", "same"), ("forward+backward", "same")]
    assert hashes["forward"] != hashes["forward+backward"]
    assert all(r["ms now"] > 0 and r["ms again"] > 0 and len(r["rounds_ms"]["now"]) == 2 for r in rows)
