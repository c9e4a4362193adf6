"""benchmarks/gpu_check.py (make gpu-check) without a GPU: one line and exit 0; its plan fits the budget and
every step names a script and flags that exist."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_fits_the_budget_and_names_real_flags():
    gc = _load()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--plan"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    names = [s["step"] for s in plan["steps"]]
    assert names == ["install", "gpu tests", "ops: token_scores", "ops: prune_pack", "ops: varlen_attention",
                     "end to end", "train step"]
    assert sum(s["budget_s"] for s in plan["steps"]) <= plan["budget_s"] == 480
    assert "--no-build-isolation --no-deps -e ." in plan["steps"][0]["command"]
    assert "-m gpu" in plan["steps"][1]["command"]
    for _, cmd, _ in gc.PLAN[2:]:
        script = ROOT / cmd[1]
        assert script.is_file(), script
        text = script.read_text()
        for flag in (c for c in cmd[2:] if c.startswith("--")):
            assert f'"{flag}"' in text, (script.name, flag)
    # a smaller budget scales every step down
    small = gc.plan(240)
    assert sum(s["budget_s"] for s in small) <= 240 and all(s["budget_s"] >= 1 for s in small)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == ["gpu-check: no CUDA GPU on this machine, nothing to check (run it "
                                                "where a GPU is)"]


def test_summary_compares_figures_with_targets(tmp_path, monkeypatch):
    """The summary from CSVs as the benchmarks write them (here: made-up rows in a temporary results folder)."""
    gc = _load()
    monkeypatch.setattr(gc, "RESULTS", tmp_path)
    (tmp_path / "throughput-GPU.csv").write_text(
        "# device: GPU\nmodel,mode,provider,speedup_vs_dense,speedup_vs_reference\n"
        "spvit_deit_small,topk,accelerated,1.8,2.5\n")
    (tmp_path / "prune_pack-GPU.csv").write_text("provider,pct_copy_ceiling\ncuda,75.0\ncuda,65.0\n")
    steps = [{"step": "install", "status": "ok", "seconds": 10.0, "budget_s": 180}]
    fig = gc.write_summary(tmp_path, "GPU", steps, {"device": "GPU", "commit": "abc"})
    assert fig["end to end vs dense (DeiT-S bf16 B256)"] == 1.8
    assert fig["prune_pack, % of copy bandwidth"] == 65.0  # the worst shape
    text = (tmp_path / "summary.md").read_text()
    assert "| end to end vs dense (DeiT-S bf16 B256) | 1.80x | >= 1.7x | yes |" in text
    assert "| end to end vs reference (DeiT-S bf16 B256) | 2.50x | >= 3x | **no** |" in text
    assert "| token_scores vs reference module | not measured | >= 20x | - |" in text
