"""Smoke tests of the example programs under python/: they run on CPU and write what they say."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "python", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pruning", ["topk", "threshold"])
def test_visualize_pruning_writes_png(tmp_path, pruning):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pruning.png"
    kept = _load("visualize_pruning").main(["--model", "spvit_deit_tiny", "--pruning", pruning, "--out", str(out)])
    assert out.stat().st_size > 10_000
    # top-k keeps round(r * 196); threshold mode calibrates on the image to the same mean keep
    assert [len(k) for k in kept] == [121, 72, 27]
    assert all(set(b) <= set(a) for a, b in zip(kept, kept[1:])), "a dropped patch came back"


@pytest.mark.parametrize("model", ["spvit_deit_tiny_distilled", "spvit_lvvit_s"])
def test_visualize_pruning_other_families(tmp_path, model):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pruning.png"
    kept = _load("visualize_pruning").main(["--model", model, "--package-merge", "add", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert [len(k) for k in kept] == [121, 72, 27]
    assert all(set(b) <= set(a) for a, b in zip(kept, kept[1:])), "a dropped patch came back"


def test_demo_reference_runs(capsys):
    _load("demo_reference").main(["--model", "spvit_deit_tiny", "--batch", "1", "--repeats", "1"])
    assert "spvit_deit_tiny" in capsys.readouterr().out
