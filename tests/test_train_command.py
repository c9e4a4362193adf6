"""python -m spvit_kernels.train on tiny ImageFolders: its outputs, exact resume, the evaluate command on its
checkpoint, bad input, and torchrun with 2 CPU processes (gloo)."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from spvit_kernels.models import create_model, load_checkpoint
from spvit_kernels.train import LOG_FIELDS, main

MODEL = "spvit_deit_tiny"
SIZE = ["--img-size", "32", "--patch-size", "8"]  # 16 patches: keeps 10, 6, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((32, 32, 3)) * 80 + 80 * c).astype(np.uint8)).save(d / f"{i}.png")
    return root


# Low targets: the keep rates start near 0.5, above them, so the multipliers (clipped at 0) must move.
MOVING_MULTIPLIERS = ("--ratio-multiplier-lr", "5", "--keep-ratios", "0.3", "0.2", "0.1")


def _args(folder, out, *extra):
    return ["--model", MODEL, "--data", str(folder), "--output", str(out), *SIZE, "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--warmup-epochs", "1", "--threads", "1", *extra]


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(_args(folder, out)) == 0
    return out


def test_outputs(trained):
    for name in ("checkpoint.pth", "best.pth", "log.csv", "results.json"):
        assert (trained / name).is_file(), name
    rows = list(csv.DictReader(open(trained / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and tuple(rows[0]) == LOG_FIELDS
    assert float(rows[0]["lr_backbone"]) == 0.0 and float(rows[1]["lr_backbone"]) > 0  # 1 warm-up epoch
    assert len(rows[0]["kept"].split("/")) == 3
    r = json.loads((trained / "results.json").read_text())
    assert r["masked"]["images"] == r["accelerated"]["images"] == 9
    assert r["masked"]["top1"] == r["accelerated"]["top1"] and r["prediction_disagreements"] == 0
    assert r["tokens_per_stage"] == [1 + 10 + 1, 1 + 6 + 2, 1 + 2 + 3]  # cls + kept + package rows
    assert r["images_per_s"]["accelerated"] > 0 and r["images_per_s"]["dense"] > 0
    assert {"commit", "date", "device", "torch", "timm"} <= set(r["provenance"])
    state = torch.load(trained / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scaler", "model_ema", "epoch", "rng", "args"} <= set(state)
    assert state["epoch"] == 1


def test_checkpoints_load_and_evaluate(trained, folder, tmp_path):
    model = create_model(MODEL, num_classes=3, img_size=32, patch_size=8)
    for name in ("checkpoint.pth", "best.pth"):
        load_checkpoint(model, str(trained / name))
    out = tmp_path / "eval.json"
    proc = _run([sys.executable, "-m", "spvit_kernels.evaluate", "--data", str(folder / "val"), "--model", MODEL,
                 "--checkpoint", str(trained / "checkpoint.pth"), "--num-classes", "3", *SIZE, "--workers", "0",
                 "--batch-size", "4", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(out.read_text())["accelerated"]["top1"]
    assert evaluated == pytest.approx(json.loads((trained / "results.json").read_text())["accelerated"]["top1"])


def test_resume_gives_the_same_weights(folder, tmp_path):
    """1 epoch, then --resume for the second: bit-identical to an uninterrupted 2-epoch run (the ratio loss's
    Lagrange multipliers too, which move after every step with --ratio-multiplier-lr)."""
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    mult = MOVING_MULTIPLIERS
    assert main(_args(folder, straight, *mult)) == 0
    args = _args(folder, out, *mult)
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 0
    assert main(_args(folder, out, "--resume", *mult)) == 0
    sa = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    sb = torch.load(straight / "checkpoint.pth", map_location="cpu", weights_only=False)
    a, b = sa["model"], sb["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sa["ratio_multipliers"].abs().sum() > 0 and torch.equal(sa["ratio_multipliers"], sb["ratio_multipliers"])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    straight_rows = list(csv.DictReader(open(straight / "log.csv")))
    assert [r["ratio_multipliers"] for r in rows] == [r["ratio_multipliers"] for r in straight_rows]


def test_backbone_is_loaded_into_student_and_teacher(folder, tmp_path):
    torch.manual_seed(3)
    dense = create_model(MODEL, num_classes=3, img_size=32, patch_size=8).vit
    path = tmp_path / "dense.pth"
    torch.save(dense.state_dict(), path)
    out = tmp_path / "bb"
    args = _args(folder, out, "--backbone", str(path))
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 0
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    # 1 epoch inside the warm-up: the backbone has lr 0, so it is still the dense checkpoint.
    for k, v in dense.state_dict().items():
        assert torch.equal(state["vit." + k], v), k


def _exit_code(args):
    """The command's exit code: argparse's SystemExit for flag errors, main's return value for the others."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("change, match", [
    ({"--model": "spvit_pit_ti"}, "--patch-size"),
    ({"--keep-ratios": ["0.5", "0.3"]}, "--keep-ratios"),
    ({"--resume": []}, "--resume"),
    ({"--batch-size": "0"}, "--batch-size"),
    ({"--batch-size": "13"}, "--batch-size"),   # more than the 12 training images
    ({"--device": "cuda"}, "--device"),
    ({"--backbone": "missing.pth"}, "--backbone"),
    ({"--data": "/nonexistent"}, "--data"),
    ({"--amp": "fp16", "--device": "cpu"}, "--amp"),
    ({"--ratio-multiplier-lr": "-1"}, "--ratio-multiplier-lr"),
])
def test_bad_input(folder, tmp_path, capsys, change, match):
    if change.get("--device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = _args(folder, tmp_path / "bad")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, *([value] if isinstance(value, str) else value)]
    assert _exit_code(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and match in err[-1], err


def test_errors_found_in_the_data(folder, tmp_path, capsys):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "train" / "b").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "train" / "a" / "x.png")
    assert main(_args(tmp_path / "d", tmp_path / "o")) == 2  # class b is empty
    assert "--data" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    torch.save(create_model("spvit_deit_small", num_classes=3, img_size=32, patch_size=8).vit.state_dict(), other)
    assert main(_args(folder, tmp_path / "o2", "--backbone", str(other))) == 2
    err = capsys.readouterr().err
    assert "--backbone" in err and len(err.strip().splitlines()) == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(folder, tmp_path):
    out = tmp_path / "ddp"
    args = _args(folder, out, *MOVING_MULTIPLIERS)  # its kept ratios are averaged over the ranks
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--batch-size") + 1] = "2"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                 "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "spvit_kernels.train",
                 *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["processes"] == 2 and r["masked"]["images"] == 9
    assert r["masked"]["top1"] == r["accelerated"]["top1"]
    assert proc.stdout.count("epoch 0:") == 1  # rank 0 prints
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert len(state["rng"]) == 2  # each rank's generators
    assert state["ratio_multipliers"].abs().sum() > 0


def test_randaugment_posterize_at_the_top_level_gives_the_zero_image():
    """RandAugment inc1 keeps 0 bits at level 10: Pillow >= 11 raises there; the paper's Pillow gave black."""
    from PIL import Image
    from timm.data import auto_augment

    from spvit_kernels.training.data import train_transform

    tf = train_transform(32)
    (ra,) = [t for t in tf.transforms if isinstance(t, auto_augment.RandAugment)]
    (op,) = [o for o in ra.ops if o.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    out = op(img)
    assert out.size == img.size and out.mode == img.mode and not np.asarray(out).any()
    op.magnitude = 5  # 2 bits kept: the ordinary path
    assert np.array_equal(np.asarray(op(img)), np.asarray(img) & 0b11000000)


def test_train_crop_center_without_augmentation_is_the_validation_transform():
    from PIL import Image

    from spvit_kernels.training.data import eval_transform, train_transform

    img = Image.fromarray((np.random.default_rng(1).random((41, 37, 3)) * 255).astype(np.uint8))
    plain = train_transform(32, randaugment=False, reprob=0, hflip=0, crop="center")
    assert torch.equal(plain(img), eval_transform(32)(img))
    flipped = train_transform(32, randaugment=False, reprob=0, hflip=1.0, crop="center")
    assert torch.equal(flipped(img), eval_transform(32)(img).flip(-1))
    full = train_transform(32, crop="center")  # RandAugment and erasing on: still the size, other values
    out = full(img)
    assert out.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop must be 'random' or 'center'"):
        train_transform(32, crop="middle")


@pytest.mark.parametrize("flags,message", [(["--crop-scale", "0", "1"], "--crop-scale must be 0 < MIN <= MAX <= 1"),
                                           (["--crop-scale", "0.9", "0.5"], "--crop-scale must be"),
                                           (["--hflip", "1.5"], "--hflip must be a probability")])
def test_bad_augmentation_flags(folder, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main(_args(folder, tmp_path / "out", *flags))
    assert message in capsys.readouterr().err
