"""python/digits_demo.py --quick: scikit-learn's digits as an ImageFolder, a dense backbone, the train command on
it, and the table and picture it writes (the figures of the full run are in benchmarks/results/)."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("sklearn")

ROWS = ["dense backbone", "SPViT, learned selectors (masked)", "SPViT, learned selectors (accelerated)",
        "same backbone, untrained selectors", "same backbone, random dropping (mean of 3 draws)"]


def _load_demo():
    spec = importlib.util.spec_from_file_location("digits_demo", ROOT / "python" / "digits_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_folder_is_stratified_and_upscaled(tmp_path):
    from PIL import Image

    demo = _load_demo()
    n_train, n_val = demo.write_digits(tmp_path, quick=True)
    assert (n_train, n_val) == (48, 12)
    for split, n in (("train", n_train), ("val", n_val)):
        classes = sorted(p.name for p in (tmp_path / split).iterdir())
        assert classes == [str(c) for c in range(10)]
        files = list((tmp_path / split).glob("*/*.png"))
        assert len(files) == n
    img = Image.open(next((tmp_path / "val").glob("*/*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    px = img.load()
    # nearest 4x upscaling: every 4x4 block is one value, and grey (R == G == B)
    assert all(px[4 * i, 4 * j] == px[4 * i + 3, 4 * j + 2] for i in range(8) for j in range(8))
    assert all(len(set(px[i, j])) == 1 for i in range(32) for j in range(32))


def test_quick_demo_writes_table_and_picture(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "digits_demo.py"), "--quick", "--out",
                           str(tmp_path / "run"), "--results", str(results), "--threads", "1", "--random-seeds", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (results / "digits_demo_quick.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == ROWS
    for line in lines:
        top1, ips = float(line.split(" | ")[1].split()[0]), float(line.split(" | ")[2])
        assert 0.0 <= top1 <= 100.0 and ips > 0
    low, high = map(float, lines[-1].split(" | ")[1].split()[1].strip("()").split("-"))  # the draws' range
    assert low <= float(lines[-1].split(" | ")[1].split()[0]) <= high
    kept = [line.split(" | ")[3].rstrip(" |") for line in lines]
    assert kept[0] == "all 64" and kept[1:] == ["39/24/9"] * 4  # 0.617, 0.369, 0.137 of 64 patches
    # masked and accelerated learned models agree (the same validation set, the same decisions)
    assert lines[1].split(" | ")[1] == lines[2].split(" | ")[1]
    png = results / "digits_kept_tokens.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = json.loads((tmp_path / "run" / "spvit" / "results.json").read_text())
    assert train["prediction_disagreements"] == 0
    assert not (results / "digits_demo-cpu.csv").exists()  # the quick run never overwrites the full run's table
    with open(tmp_path / "run" / "spvit" / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 1
