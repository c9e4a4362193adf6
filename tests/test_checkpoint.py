"""Checkpoint import (spvit_kernels.models.load_checkpoint): our layout, the paper code's, a plain backbone."""

import argparse
import warnings

import pytest
import torch

from spvit_kernels.models import (CheckpointError, CheckpointFormat, SPViT, create_model, load_checkpoint,
                                  to_paper_state_dict)

NUM_CLASSES = 7  # small heads keep the models cheap
# The smallest model of each family whose paper-layout round trip is tested (families join as they land).
ROUND_TRIP_MODELS = ["spvit_deit_tiny", "spvit_lvvit_s", "spvit_pit_ti"]


def _model(seed, name="spvit_deit_tiny", **cfg):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, **cfg)
    # Fresh LayerNorms are all ones / zeros; randomise every tensor so that a wrong mapping cannot pass.
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():  # BatchNorm's num_batches_tracked
                t.copy_(torch.randint_like(t, 1, 1000))
            elif key.endswith("running_var"):  # a variance stays positive (LV-ViT's stem)
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.copy_(torch.randn_like(t))
    return model


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{k} was modified by a failed load"


def test_own_state_dict_round_trip(tmp_path):
    src, dst = _model(1), _model(2)
    path = tmp_path / "ours.pth"
    torch.save(src.state_dict(), path)
    result = load_checkpoint(dst, path)
    assert result.layout == "ours" and result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_weights(src, dst)


@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
@pytest.mark.parametrize("wrapped", [False, True])
def test_paper_layout_round_trip(tmp_path, wrapped, name):
    src, dst = _model(3, name), _model(4, name)
    paper = to_paper_state_dict(src)
    # The paper's keys: backbone names without our "vit." prefix, one selector copy per head.
    H, d = src.selectors[0].num_heads, src.selectors[0].head_dim
    assert "cls_token" in paper and "head.weight" in paper
    assert not any(k.startswith("vit.") or k.startswith("selectors.") for k in paper)
    assert "score_predictor.2.senet.2.bias" in paper
    assert f"score_predictor.0.in_conv.{H - 1}.1.weight" in paper
    assert f"score_predictor.0.in_conv.{H}.1.weight" not in paper
    assert paper["score_predictor.1.out_conv.0.4.weight"].shape == (2, d // 4)
    copies = [paper[f"score_predictor.1.out_conv.{h}.4.weight"].data_ptr() for h in range(H)]
    assert len(set(copies)) == H  # one tensor per head, as the paper's module holds
    # The paper code's training script saves its argparse arguments beside the model.
    obj = {"model": paper, "optimizer": {"state": {}}, "epoch": 30, "args": argparse.Namespace(lr=5e-4, model="deit")}
    obj = obj if wrapped else paper
    path = tmp_path / "paper.pth"
    torch.save(obj, path)
    result = load_checkpoint(dst, path)
    assert result.layout == "paper"
    _assert_same_weights(src, dst)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(src(images), dst(images))


def test_paper_selector_mapping_follows_the_spec():
    """The paper's module indices land on the parameters design section 2 names (checked by hand, not by the
    exporter): senet.0 = Linear(H, H//2), in_conv.h.0 = LayerNorm(d), out_conv.h.4 = Linear(d/4, 2); DeiT's
    backbone keys are timm's."""
    model = _model(5)
    paper = to_paper_state_dict(model)
    assert set(k for k in paper if not k.startswith("score_predictor.")) == set(model.vit.state_dict())
    sel = model.selectors[1]
    assert torch.equal(paper["score_predictor.1.senet.0.weight"], sel.se1.weight)
    assert torch.equal(paper["score_predictor.1.senet.2.bias"], sel.se2.bias)
    assert torch.equal(paper["score_predictor.1.in_conv.1.0.weight"], sel.norm.weight)
    assert torch.equal(paper["score_predictor.1.in_conv.0.1.bias"], sel.proj_in.bias)
    assert torch.equal(paper["score_predictor.1.out_conv.2.0.weight"], sel.mlp1.weight)
    assert torch.equal(paper["score_predictor.1.out_conv.2.2.weight"], sel.mlp2.weight)
    assert torch.equal(paper["score_predictor.1.out_conv.2.4.bias"], sel.mlp3.bias)


def test_create_model_with_checkpoint():
    src = _model(6)
    dst = create_model("spvit_deit_tiny", num_classes=NUM_CLASSES, checkpoint={"model": to_paper_state_dict(src)})
    _assert_same_weights(src, dst)


def test_backbone_checkpoint_keeps_selectors_and_warns():
    src, dst = _model(7), _model(8)
    selectors_before = {k: v.clone() for k, v in dst.selectors.state_dict().items()}
    backbone = src.vit.state_dict()  # timm names, as a DeiT release has them
    with pytest.warns(UserWarning, match="backbone only"):
        result = load_checkpoint(dst, {"model": backbone})
    assert result.layout == "backbone"
    for k, v in src.vit.state_dict().items():
        assert torch.equal(dst.vit.state_dict()[k], v), k
    for k, v in dst.selectors.state_dict().items():
        assert torch.equal(v, selectors_before[k]), k


def test_truncated_checkpoint_lists_every_missing_key():
    src, dst = _model(9), _model(10)
    snapshot = _snapshot(dst)
    paper = to_paper_state_dict(src)
    dropped = ["blocks.11.mlp.fc2.bias", "pos_embed"]
    for k in dropped:
        del paper[k]
    for h in range(3):
        del paper[f"score_predictor.2.out_conv.{h}.4.weight"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, paper)
    msg = str(info.value)
    for k in ["vit.blocks.11.mlp.fc2.bias", "vit.pos_embed", "selectors.2.mlp3.weight"]:
        assert f"missing: {k}" in msg
    assert "3 problem(s)" in msg
    _assert_unchanged(dst, snapshot)
    # strict=False loads the rest and reports the gaps.
    result = load_checkpoint(dst, paper, strict=False)
    assert sorted(result.missing_keys) == ["selectors.2.mlp3.weight", "vit.blocks.11.mlp.fc2.bias", "vit.pos_embed"]
    assert torch.equal(dst.vit.cls_token, src.vit.cls_token)


class _Unsafe:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_unreadable_file(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(to_paper_state_dict(_model(11)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(_model(12), path)
    torch.save({"model": to_paper_state_dict(_model(11)), "extra": _Unsafe()}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(_model(12), path)
    with pytest.raises(FileNotFoundError, match="path_or_state_dict"):
        load_checkpoint(_model(12), tmp_path / "nope.pth")


def test_mismatched_model_lists_every_wrong_shape_and_unexpected_key():
    src = _model(13, "spvit_deit_small")
    dst = _model(14, "spvit_deit_tiny")
    snapshot = _snapshot(dst)
    paper = to_paper_state_dict(src)  # 6 heads, 384 channels: in_conv.3..5 have no place in a 3-head selector
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, {"model": paper})
    msg, problems = str(info.value), info.value.problems
    assert "wrong shape: vit.cls_token is (1, 1, 384) in the checkpoint, (1, 1, 192) in the model" in problems
    assert any(p.startswith("wrong shape: selectors.0.se1.weight") for p in problems)
    assert "unexpected: score_predictor.0.in_conv.5.1.weight" in problems
    # A few lines that say which model the checkpoint is, not one line per tensor.
    assert "looks like a model with 384 channels, depth 12, 7 classes; the model has 192 channels, depth 12, " \
           "7 classes" in msg
    assert len(msg.splitlines()) <= 10 and f"and {len(problems) - 8} more" in msg
    _assert_unchanged(dst, snapshot)


def test_non_identical_head_copies_name_the_key():
    src, dst = _model(15), _model(16)
    snapshot = _snapshot(dst)
    paper = to_paper_state_dict(src)
    paper["score_predictor.1.in_conv.2.1.weight"][0, 0] += 1e-3
    with pytest.raises(CheckpointError, match=r"head copies differ: score_predictor\.1\.in_conv\.2\.1\.weight"):
        load_checkpoint(dst, paper)
    _assert_unchanged(dst, snapshot)


def test_threshold_beside_the_model():
    src, dst = _model(17, pruning="threshold"), _model(18, pruning="threshold")
    result = load_checkpoint(dst, {"model": src.state_dict(), "threshold": [0.5, -0.25, 1.0]})
    assert result.threshold == [0.5, -0.25, 1.0]
    assert dst.config.threshold == (0.5, -0.25, 1.0)
    with pytest.raises(CheckpointError, match="threshold"):
        load_checkpoint(dst, {"model": src.state_dict(), "threshold": [0.5]})
    assert dst.config.threshold == (0.5, -0.25, 1.0)


def test_bad_argument_type():
    with pytest.raises(TypeError, match="path_or_state_dict"):
        load_checkpoint(_model(19), 42)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="no tensors"):
            load_checkpoint(_model(19), {"epoch": 3})


class _RenamedHeadSPViT(SPViT):
    """A family whose published checkpoints call the classifier "classifier" instead of timm's "head"."""

    checkpoint_format = CheckpointFormat(backbone_prefix="vit.", renames=(("classifier.", "head."),))


def test_family_renames_apply_both_ways():
    src, dst = _model(20), _model(21)
    src.__class__ = dst.__class__ = _RenamedHeadSPViT
    paper = to_paper_state_dict(src)
    assert "classifier.weight" in paper and "head.weight" not in paper
    load_checkpoint(dst, paper)
    _assert_same_weights(src, dst)
    backbone = {k: v for k, v in paper.items() if not k.startswith("score_predictor.")}
    backbone["classifier.bias"] = backbone["classifier.bias"] + 1
    with pytest.warns(UserWarning, match="backbone only"):
        load_checkpoint(dst, backbone)
    assert torch.equal(dst.vit.head.bias, src.vit.head.bias + 1)


# --- hostile files and tensors: nothing is loaded, and the message names the file / entry / key ----------------

def test_flipped_bytes_are_caught_by_the_checksums(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _model(20).state_dict()}, path)
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    path.write_bytes(bytes(data))
    dst = _model(21)
    snapshot = _snapshot(dst)
    with pytest.raises(CheckpointError, match=r"ckpt\.pth' is damaged: entry '.*/data/\d+' does not match its "
                                              r"checksum .*nothing was loaded"):
        load_checkpoint(dst, path)
    _assert_unchanged(dst, snapshot)


def test_meta_and_complex_tensors_are_refused_before_anything_is_copied():
    src, dst = _model(22), _model(23)
    snapshot = _snapshot(dst)
    for bad_value, match in ((lambda v: v.to("meta"), "no data: vit.norm.bias is a meta tensor"),
                             (lambda v: v.to(torch.complex64), "wrong dtype: vit.norm.bias is complex64 in the "
                                                               "checkpoint, float32 in the model"),
                             (lambda v: v.to(torch.int64), "wrong dtype: vit.norm.bias is int64")):
        sd = src.state_dict()
        last = "vit.norm.bias"
        sd = {**{k: v for k, v in sd.items() if k != last}, last: bad_value(sd[last])}  # the bad one comes last
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(dst, sd)
        _assert_unchanged(dst, snapshot)
    # float64 / bfloat16 tensors of the right shape are fine (copy_ converts)
    load_checkpoint(dst, {k: v.double() for k, v in src.state_dict().items()})
    _assert_same_weights(src, dst)


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="neither a complete zip archive as torch.save writes nor a legacy "
                                              "pickle"):
        load_checkpoint(_model(24), path)
