"""`python -m spvit_kernels.evaluate` end to end on a synthetic ImageFolder, single process and under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spvit_kernels import accelerate
from spvit_kernels.models import create_model, to_paper_state_dict

CLASSES = ["apple", "boat", "cloud"]
PER_CLASS = 4
NUM_CLASSES = 8  # more than the folder's 3 classes, so that neither top-1 nor top-5 is trivially 100 %
MODEL = "spvit_deit_tiny"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 4 generated PNGs of odd sizes (class-tinted noise), plus one corrupt file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            h, w = 37 + 11 * i, 53 + 7 * c
            pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
            pixels[..., c] = pixels[..., c] // 2 + 128
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    (root / "boat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this file is cut short")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A paper-format checkpoint of a random spvit_deit_tiny with 8 classes."""
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "paper.pth"
    torch.save({"model": to_paper_state_dict(model), "epoch": 29}, path)
    return path


def _direct_loop(folder, checkpoint):
    """The expected result, computed without the evaluation code: every image through the paper transform
    (written out here), one batch, the accelerated model."""
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            images.append(tf(Image.open(folder / name / f"img{i}.png").convert("RGB")))
            labels.append(c)
    model = accelerate(create_model(MODEL, num_classes=NUM_CLASSES, checkpoint=checkpoint))
    labels = torch.tensor(labels)
    with torch.no_grad():
        logits, info = model(torch.stack(images), return_info=True)
        dense = model.vit(torch.stack(images))
    top5 = logits.topk(5, dim=-1).indices
    return {"top1": 100.0 * (top5[:, 0] == labels).float().mean().item(),
            "top5": 100.0 * (top5 == labels[:, None]).any(dim=-1).float().mean().item(),
            "tokens": info["num_tokens"].double().mean(dim=1).tolist(),
            "dense_top1": 100.0 * (dense.argmax(-1) == labels).float().mean().item()}


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    return proc


def _evaluate_cmd(folder, checkpoint, out, *extra):
    return ["--data", str(folder), "--model", MODEL, "--checkpoint", str(checkpoint), "--num-classes",
            str(NUM_CLASSES), "--batch-size", "5", "--workers", "0", "--out", str(out), *extra]


def _check(result, expected):
    assert result["images"] == len(CLASSES) * PER_CLASS
    assert result["corrupt_skipped"] == 1
    acc = result["accelerated"]
    assert acc["top1"] == pytest.approx(expected["top1"]) and acc["top5"] == pytest.approx(expected["top5"])
    assert acc["mean_tokens_per_stage"] == pytest.approx(expected["tokens"])  # 1 + 121 + 1, 1 + 72 + 2, 1 + 27 + 3
    assert acc["images_per_s"] > 0 and result["data_loading_s"] > 0


def test_single_process_matches_a_direct_loop(folder, checkpoint, tmp_path):
    out = tmp_path / "result.json"
    proc = _run([sys.executable, "-m", "spvit_kernels.evaluate",
                 *_evaluate_cmd(folder, checkpoint, out, "--compare", "dense,reference")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    expected = _direct_loop(folder, checkpoint)
    assert expected["tokens"] == [123.0, 75.0, 31.0]
    _check(result, expected)
    assert result["dense"]["top1"] == pytest.approx(expected["dense_top1"])
    assert "mean_tokens_per_stage" not in result["dense"]
    assert result["reference"]["top1_agreement"] == 100.0  # same semantics, float32
    assert result["reference"]["mean_tokens_per_stage"] == pytest.approx(expected["tokens"])
    assert "accelerated" in proc.stdout and "reference" in proc.stdout and "1 corrupt skipped" in proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_a_direct_loop(folder, checkpoint, tmp_path):
    out = tmp_path / "result.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    # Known intermittent defect, not understood yet: now and then (seen in CI's full run, never alone) rank 0
    # aborts at exit with "terminate called without an active exception" (a C++ thread of the gloo group). It is
    # retried at most twice, on that message only; any other failure fails at once.
    for attempt in range(3):
        proc = _run([*torchrun[:-1], str(_free_port()), "-m", "spvit_kernels.evaluate",
                     *_evaluate_cmd(folder, checkpoint, out)], tmp_path)
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 2
    _check(result, _direct_loop(folder, checkpoint))
    assert proc.stdout.count("images/s: model forward only") == 1  # rank 0 prints, rank 1 does not


def test_threshold_mode_calibrates_without_checkpoint_thresholds(folder, checkpoint, tmp_path):
    out = tmp_path / "result.json"
    proc = _run([sys.executable, "-m", "spvit_kernels.evaluate",
                 *_evaluate_cmd(folder, checkpoint, out, "--pruning", "threshold", "--limit", "6")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    # 6 files, one corrupt: all 5 decodable ones drawn (seeded, across the folder), not the first batch of one class
    assert result["threshold_note"].startswith("calibrated on 5 images drawn across the folder")
    assert result["images"] == 5 and result["corrupt_skipped"] == 1  # the limit counts the corrupt file too
    tokens = result["accelerated"]["mean_tokens_per_stage"]
    assert 2 <= tokens[2] < tokens[1] < tokens[0] <= 197


def test_errors(folder, checkpoint, tmp_path, capsys):
    from spvit_kernels.evaluate import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--data", str(empty), "--model", MODEL]) == 2
    assert "--data: " in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--model", MODEL]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(folder), "--model", "spvit_nope"])
    assert "invalid choice: 'spvit_nope'" in capsys.readouterr().err
    from spvit_kernels.evaluation.data import CorruptImageError, open_image_folder

    with pytest.raises(CorruptImageError, match="cannot decode .*broken.png"):
        ds = open_image_folder(folder, on_corrupt="error")
        for i in range(len(ds)):
            ds[i]
    small = create_model("spvit_deit_small", num_classes=NUM_CLASSES)
    wrong = tmp_path / "small.pth"
    torch.save(small.state_dict(), wrong)
    assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(wrong),
                 "--num-classes", str(NUM_CLASSES), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "wrong shape: vit.cls_token is (1, 1, 384)" in err
    assert "looks like a model with 384 channels, depth 12, 8 classes; the model has 192 channels" in err
    assert len(err.splitlines()) <= 11  # a few lines, not one per tensor
    assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint: no checkpoint file at ") and "path_or_state_dict" not in err
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(text)]) == 2
    assert "is neither a complete zip archive as torch.save writes nor a legacy pickle" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--data", str(folder), "--model", MODEL, "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA GPU is usable here" in capsys.readouterr().err
    assert main(["--data", str(folder), "--model", MODEL, "--device", "nonsense"]) == 2
    assert "--device: 'nonsense' is not a device" in capsys.readouterr().err


def test_defaults_from_the_checkpoint_and_the_machine(folder, checkpoint, tmp_path, capsys):
    """No --num-classes: the checkpoint's head (8 classes, the folder has 3); workers sized to the cores; the
    corrupt file named; no --checkpoint: a warning, and the folder's class count."""
    from spvit_kernels.evaluate import main

    out = tmp_path / "r.json"
    assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(checkpoint), "--batch-size", "4",
                 "--threads", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["num_classes"] == NUM_CLASSES and result["threads"] == 1
    assert result["workers"] == min(4, max(0, (os.cpu_count() or 1) - 1))
    assert [Path(f).name for f in result["corrupt_files"]] == ["broken.png"]
    assert "skipped (cannot be decoded): " in captured.out and "broken.png" in captured.out
    assert "warning" not in captured.err
    _check(result, _direct_loop(folder, checkpoint))
    assert main(["--data", str(folder), "--model", MODEL, "--workers", "0", "--limit", "2", "--out", str(out)]) == 0
    assert "no --checkpoint: spvit_deit_tiny has random weights" in capsys.readouterr().err
    assert json.loads(out.read_text())["num_classes"] == len(CLASSES)


def test_threshold_calibration_does_not_depend_on_the_batch_size(folder, checkpoint, tmp_path, capsys):
    from spvit_kernels.evaluate import main

    notes = []
    for batch in ("2", "7"):
        out = tmp_path / f"r{batch}.json"
        assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(checkpoint), "--batch-size",
                     batch, "--workers", "0", "--pruning", "threshold", "--calibration-images", "6", "--out",
                     str(out)]) == 0
        result = json.loads(out.read_text())
        notes.append((result["threshold_note"], result["accelerated"]["mean_tokens_per_stage"]))
    assert notes[0] == notes[1] and notes[0][0].startswith("calibrated on 6 images drawn across the folder")
    out = tmp_path / "given.json"
    assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(checkpoint), "--workers", "0",
                 "--pruning", "threshold", "--threshold", "0.5", "-0.25", "1.0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["threshold_note"] == "from --threshold: (0.5, -0.25, 1.0)"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--data", str(folder), "--model", MODEL, "--threshold", "0.5"])
    assert "--threshold needs --pruning threshold" in capsys.readouterr().err


def test_help_shows_defaults_and_model_names(capsys):
    from spvit_kernels.evaluate import main
    from spvit_kernels.models import list_models

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: topk)" in text
    assert all(name in text for name in list_models())


@pytest.mark.parametrize("n,world", [(13, 2), (5, 3), (2, 4), (0, 2)])
def test_shards_cover_every_index_once(n, world):
    from spvit_kernels.evaluation.data import ShardSampler

    shards = [list(ShardSampler(n, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(ShardSampler(n, rank, world)) for rank in range(world)] == [len(s) for s in shards]


def test_corrupt_image_error_from_a_worker(folder, checkpoint, capsys):
    from spvit_kernels.evaluate import main

    assert main(["--data", str(folder), "--model", MODEL, "--checkpoint", str(checkpoint), "--num-classes",
                 str(NUM_CLASSES), "--workers", "1", "--on-corrupt", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --data: cannot decode") and "broken.png" in err
