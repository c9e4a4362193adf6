"""benchmarks/cpu_targets.py: its work counts, and one tiny case through `measure` (outputs compared, the ideal
speed-up and the share of the matmul rate 2x needs derived from the counts and the ceilings given)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cpu_targets  # noqa: E402

from spvit_kernels import ops  # noqa: E402


def test_work_counts():
    case = next(cpu_targets.token_scores_cases([2]))
    op, shape, B, fast, run, work, _ = case
    C, H = 192, 3  # DeiT-T first
    assert (op, B, fast) == ("token_scores", 2, "cpu")
    assert work["gflop"] == pytest.approx(2.75 * C * (C // H) * 2 * 196 / 1e9)
    assert work["gbytes"] == pytest.approx((2 * 197 * C * 4 + 2 * 4 * 2 * 197) / 1e9)
    lengths_case = next(cpu_targets.varlen_cases(3))
    assert lengths_case[0] == "varlen_attention" and lengths_case[5]["gflop"] > 0


@pytest.mark.skipif("cpu" not in ops.available_backends("token_scores"), reason="C++ extension not built")
def test_measure_one_case():
    sel_case = next(cpu_targets.token_scores_cases([1]))
    ceilings = {"matmul_float32_TFLOPs": 0.1, "copy_GBps": 10.0}
    rows = cpu_targets.measure([sel_case], 1, ceilings)
    ref, fast = rows
    assert (ref["provider"], fast["provider"]) == ("reference", "cpu")
    work = sel_case[5]
    ideal_ms = max(work["gflop"] / 100.0, work["gbytes"] / 10.0) * 1e3
    assert fast["ideal_ms"] == pytest.approx(ideal_ms, rel=1e-3)
    assert fast["speedup_vs_reference"] == pytest.approx(ref["ms"] / fast["ms"], rel=0.02)
    assert fast["met"] == ("yes" if ref["ms"] / fast["ms"] >= 2.0 else "no")
    assert fast["pct_matmul_for_2x"] == pytest.approx(100 * 2 * work["gflop"] / ref["ms"] * 1e3 / 100.0, rel=0.02)
    assert torch.get_num_threads() >= 1
