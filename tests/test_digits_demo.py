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
        "dense backbone, untrained selectors", "dense backbone, random dropping (mean of 3 draws)",
        "dense backbone, brightest patches kept (hand-made, reads the image)",
        "SPViT's fine-tuned backbone, random dropping (mean of 3 draws)",
        "SPViT's fine-tuned backbone, brightest patches kept (hand-made, reads the image)"]
RANDOM_ROWS = (4, 6)


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
                           str(tmp_path / "run"), "--results", str(results), "--threads", "1", "--random-seeds", "3",
                           "--spvit-warmup", "0"],  # the backbone trained too: the fine-tuned backbone's rows
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (results / "digits_demo_quick.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == ROWS
    for line in lines:
        top1, ips = float(line.split(" | ")[1].split()[0]), float(line.split(" | ")[2])
        assert 0.0 <= top1 <= 100.0 and ips > 0
    for i in RANDOM_ROWS:
        low, high = map(float, lines[i].split(" | ")[1].split()[1].strip("()").split("-"))  # the draws' range
        assert low <= float(lines[i].split(" | ")[1].split()[0]) <= high
    kept = [line.split(" | ")[3].rstrip(" |") for line in lines]
    assert kept[0] == "all 64" and kept[1:] == ["39/24/9"] * 7  # 0.617, 0.369, 0.137 of 64 patches
    # masked and accelerated learned models agree (the same validation set, the same decisions)
    assert lines[1].split(" | ")[1] == lines[2].split(" | ")[1]
    png = results / "digits_kept_tokens.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = json.loads((tmp_path / "run" / "spvit" / "results.json").read_text())
    assert train["prediction_disagreements"] == 0
    assert not (results / "digits_demo-cpu.csv").exists()  # the quick run never overwrites the full run's table
    with open(tmp_path / "run" / "spvit" / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_brightest_kept_keeps_the_brightest_patches():
    """The hand-made baseline keeps, at every stage, the brightest patches among those still there (checked
    against the model's own record of the kept patches, which tracks rows independently of the baseline)."""
    import torch

    from spvit_kernels.models import create_model

    demo = _load_demo()
    torch.manual_seed(0)
    model = create_model(demo.MODEL, num_classes=10, img_size=32, patch_size=4)
    model.__class__ = demo.BrightestKeptSPViT
    model.eval()
    g = torch.Generator().manual_seed(3)
    # 2 images with 64 distinct patch levels, 2 with random ones
    levels = torch.stack([torch.randperm(64, generator=g) for _ in range(2)]).float().reshape(2, 1, 8, 8) / 64
    levels = torch.cat([levels, torch.rand(2, 1, 8, 8, generator=g)])
    images = levels.repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        _, info = model(images, return_info=True)
    brightness = levels.reshape(4, 64)
    for b in range(4):
        order = torch.argsort(brightness[b], descending=True)
        for s, kept in enumerate(info["kept_indices"]):
            k = len(kept[b])
            assert k == [39, 24, 9][s]
            assert sorted(kept[b].tolist()) == sorted(order[:k].tolist()), (b, s)


def test_digits_folder_is_rewritten_whole_for_another_split(tmp_path):
    demo = _load_demo()
    demo.write_digits(tmp_path, quick=True, seed=0)
    demo.write_digits(tmp_path, quick=True, seed=1)
    train = {p.name for p in (tmp_path / "train").glob("*/*.png")}
    val = {p.name for p in (tmp_path / "val").glob("*/*.png")}
    assert len(train) == 48 and len(val) == 12 and not train & val
