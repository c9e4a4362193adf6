"""benchmarks/roofline_train.py: the modeled training step's counts (no GPU; the figures are labelled MODELED)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load():
    spec = importlib.util.spec_from_file_location("roofline_train", ROOT / "benchmarks" / "roofline_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model,C,H", [("DeiT-T", 192, 3), ("DeiT-S", 384, 6)])
def test_counts(model, C, H):
    rt = _load()
    gpu = rt.GPUS[0]
    rows = rt.step_rows(gpu, model, C, H, 256, 0.7, 0.35, rt.read_report(rt.REPORT)[0])
    by = {(r["form"], r["op"].split(":")[0]): r for r in rows}
    # the shared parts are identical in both forms
    for op in ("GEMMs student (forward + backward)", "GEMMs teacher (forward)", "AdamW update"):
        assert by[("paper", op)]["modeled_ms"] == by[("fused", op)]["modeled_ms"]
    # student GEMMs: 3 x 24 T C^2 per block, 12 blocks, plus patch embedding and head
    T = 256 * 197
    want = 3 * (24 * T * C * C * 12 + 2 * 256 * 196 * 768 * C + 2 * 256 * C * 1000) / 1e9
    assert by[("paper", "GEMMs student (forward + backward)")]["gflop"] == pytest.approx(want, abs=0.01)
    # the paper form's score passes: bytes per element x B H N^2 x 12 blocks
    paper = [r for r in rows if r["form"] == "paper" and r["op"].startswith("attention student") and "passes over"
             in r["op"]][0]
    per_elem = sum(b for _, b in rt.PASSES_FWD) + sum(b for _, b in rt.PASSES_BWD) + rt.EYE_POLICY / H
    assert paper["gbytes"] == pytest.approx(per_elem * 256 * H * 197 * 197 * 12 / 1e9, rel=1e-3)
    # the paper code's teacher: its own passes over its scores (forward only) and its matmuls; q, k, v cast to
    # float32 and back in the student (forward and backward) and the teacher
    teacher = [r for r in rows if r["form"] == "paper" and r["op"].startswith("attention teacher")]
    assert rt.TEACHER_PASSES and sum(b for _, b in rt.TEACHER_PASSES) == 28 and rt.QKV_CASTS == 36
    t_passes = [r for r in teacher if "passes over" in r["op"]][0]
    assert t_passes["gbytes"] == pytest.approx(28 * 256 * H * 197 * 197 * 12 / 1e9, rel=1e-3)
    t_mm = [r for r in teacher if "matmuls" in r["op"]][0]
    assert t_mm["gflop"] == pytest.approx(4 * 256 * H * 197 * 197 * (C // H) * 12 / 1e9, abs=0.01)
    casts = {r["op"].split(":")[0]: r["gbytes"] for r in rows if "cast to float32 and back" in r["op"]}
    assert casts["attention teacher"] == pytest.approx(36 * T * C * 12 / 1e9, rel=1e-3)
    assert casts["attention student"] == pytest.approx(2 * casts["attention teacher"], rel=1e-3)
    assert not any(r["form"] == "fused" and "cast to float32" in r["op"] for r in rows)
    # drop path: a pass per branch in the paper form; in the fused form only at the segment ends
    dp = {r["form"]: r["gbytes"] for r in rows if r["op"].startswith("drop path")}
    assert dp["paper"] == pytest.approx(rt.DROP_PATH * T * C * 12 / 1e9, rel=1e-3)
    assert dp["fused"] == pytest.approx(rt.DROP_PATH_SEGMENT_END * rt.SEGMENTS * T * C / 1e9, rel=1e-3)
    assert 0 < dp["fused"] < dp["paper"] / 5
    # the element-wise passes: bytes per token and channel per block x T C x 12 blocks (+ the fused form's
    # segment ends); add_layer_norm cuts the student's and the teacher's
    elt = {(r["form"], r["op"].split(":")[0]): r["gbytes"] for r in rows if "residual adds" in r["op"]}
    total = lambda passes: sum(b for _, b in passes)  # noqa: E731
    assert total(rt.EAGER_FWD) == 68 and total(rt.EAGER_BWD) == 128
    assert elt[("paper", "student forward")] == pytest.approx(68 * T * C * 12 / 1e9, rel=1e-3)
    assert elt[("paper", "teacher forward")] == elt[("paper", "student forward")]
    assert elt[("fused", "student backward")] == pytest.approx(
        (total(rt.FUSED_BWD) * 12 + rt.SEGMENTS * rt.SEGMENT_BWD) * T * C / 1e9, rel=1e-3)
    for part in ("student forward", "student backward", "teacher forward"):
        assert elt[("fused", part)] < 0.7 * elt[("paper", part)], part
    # gelu_mlp's epilogues: a fused-form row from the kernel report, positive and below half the student GEMMs
    epi = [r for r in rows if r["op"].startswith("gelu_mlp GEMM epilogues")]
    assert len(epi) == 1 and epi[0]["form"] == "fused"
    assert 0 < epi[0]["modeled_ms"] < 0.5 * by[("fused", "GEMMs student (forward + backward)")]["modeled_ms"]
    # attention memory kept for backward: O(N^2) against O(N)
    fused = [r for r in rows if r["form"] == "fused" and "policy_attention" in r["op"]][0]
    assert paper["saved_for_backward_gb"] > 20 * fused["saved_for_backward_gb"] > 0
