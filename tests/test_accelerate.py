"""Tests of spvit_kernels.accelerate: the pruned ragged execution == the reference (masked) SPViT model.

On CPU (C++ backends) in float32: logits within a tight tolerance and identical kept sets, for every model
name, both pruning modes and every package mode; torch.compile(fullgraph=True) of top-k; autocast.
On the GPU in bfloat16: top-1 agreement and logits within tolerance, with a comparison that lets a token
whose keep_score lies within rounding of the decision boundary flip (and only such a token); no host
synchronisation in top-k mode, CUDA-graph capture and torch.compile.
"""

import copy

import pytest
import torch

from spvit_kernels import accelerate
from spvit_kernels.accelerate import AcceleratedSPViT
from spvit_kernels.models import MODEL_SHAPES, calibrate_thresholds, create_model

from .utils import requires_gpu

MODEL_NAMES = sorted(MODEL_SHAPES)  # the DeiT shapes at 224 px; the other families: test_model_families.py, test_lvvit.py
PRUNINGS = ["topk", "threshold"]
PACKAGES = ["mean", "sum", "none"]
NUM_CLASSES = 10
CPU_BATCH = 2

# (dtype, tolerance on logits relative to their largest magnitude, keep_score band in which a decision may
# flip). float32 decisions must not flip at all; bf16 ones only inside the band.
CPU_TOL = (torch.float32, 1e-4, 0.0)
GPU_TOLS = [(torch.bfloat16, 6e-2, 6e-2), (torch.float16, 2e-2, 1e-2), (torch.float32, 1e-4, 1e-5)]


def _images(batch, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g).to(device=device, dtype=dtype)


def _model_pair(name, pruning, package, device="cpu", dtype=torch.float32, calib_seed=99):
    """(reference, accelerated) with the same weights. Threshold mode gets per-stage thresholds calibrated on
    other images, so that each stage keeps roughly its keep ratio (some tokens kept, some dropped)."""
    torch.manual_seed(0)
    ref = create_model(name, num_classes=NUM_CLASSES, pruning=pruning, package=package).to(device, dtype)
    if pruning == "threshold":
        calibrate_thresholds(ref, _images(CPU_BATCH, dtype, device, seed=calib_seed))
    return ref, accelerate(copy.deepcopy(ref))


def _rel_err(a, b):
    scale = b.float().abs().max().clamp(min=1e-6)
    return ((a.float() - b.float()).abs().max() / scale).item()


# --- CPU, float32: exact kept sets, tight logits -------------------------------------------------------------

@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cpu_accelerated_matches_reference(name, pruning, package):
    ref, acc = _model_pair(name, pruning, package)
    assert isinstance(acc, AcceleratedSPViT)
    images = _images(CPU_BATCH)
    with torch.inference_mode():
        logits_ref, info_ref = ref(images, return_info=True)
        logits_acc, info_acc = acc(images, return_info=True)
        plain = acc(images)
    assert logits_acc.shape == (CPU_BATCH, NUM_CLASSES) and logits_acc.dtype == torch.float32
    _, tol, _ = CPU_TOL
    assert _rel_err(logits_acc, logits_ref) < tol
    torch.testing.assert_close(plain, logits_acc, atol=0, rtol=0)
    for s in range(3):
        for b in range(CPU_BATCH):
            assert torch.equal(info_acc["kept_indices"][s][b], info_ref["kept_indices"][s][b]), \
                f"stage {s} image {b}: kept sets differ"
        kept = int(info_ref["num_kept"][s].sum())
        assert 0 < kept < CPU_BATCH * 196, "the test must prune some tokens and keep some"
    assert torch.equal(info_acc["num_kept"], info_ref["num_kept"])
    assert torch.equal(info_acc["num_tokens"], info_ref["num_tokens"])
    assert info_acc["selector_layers"] == info_ref["selector_layers"]


def test_state_dict_unchanged_and_bad_model():
    ref, acc = _model_pair("spvit_deit_tiny", "topk", "mean")
    sd_ref, sd_acc = ref.state_dict(), acc.state_dict()
    assert list(sd_ref) == list(sd_acc)
    assert all(torch.equal(sd_ref[k], sd_acc[k]) for k in sd_ref)
    same = create_model("spvit_deit_tiny", num_classes=NUM_CLASSES)
    assert accelerate(same) is same  # in place
    with pytest.raises(TypeError, match="model"):
        accelerate(torch.nn.Linear(3, 3))


def test_calibrated_threshold_keeps_the_keep_ratios():
    """The threshold mode of the benchmark: on the calibration images, the mean keep equals top-k's."""
    torch.manual_seed(0)
    model = create_model("spvit_deit_tiny", num_classes=NUM_CLASSES, pruning="threshold")
    images = _images(3, seed=5)
    thresholds = calibrate_thresholds(model, images)
    assert len(thresholds) == 3 and model.config.threshold == thresholds
    assert model.config.threshold_at(1) == thresholds[1]
    with torch.inference_mode():
        _, info = accelerate(model)(images, return_info=True)
    for s, ratio in enumerate(model.config.keep_ratios):
        assert int(info["num_kept"][s].sum()) == 3 * round(ratio * 196)


def test_train_mode_is_the_training_form_and_eval_the_fast_path():
    """In training mode the accelerated model runs SPViT's training form on its parameters (the reference model's
    output, noise for noise); eval() puts it back on the packed path."""
    ref, acc = _model_pair("spvit_deit_tiny", "topk", "mean")
    images = _images(2)
    noise = [torch.randn(2, 196, 2) for _ in range(3)]
    ref.train(), acc.train()
    out_ref, out_acc = ref(images, gumbel_noise=noise), acc(images, gumbel_noise=noise)
    torch.testing.assert_close(out_acc.logits, out_ref.logits, atol=0, rtol=0)
    for d_acc, d_ref in zip(out_acc.decisions, out_ref.decisions):
        torch.testing.assert_close(d_acc, d_ref, atol=0, rtol=0)
    ref.eval(), acc.eval()
    with torch.inference_mode():
        assert _rel_err(acc(images), ref(images)) < CPU_TOL[1]


def test_compile_fullgraph_topk_cpu():
    """Top-k has no data-dependent size: the whole forward traces as one graph."""
    ref, acc = _model_pair("spvit_deit_tiny", "topk", "mean")
    images = _images(CPU_BATCH)
    compiled = torch.compile(acc, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(images)
        expect = ref(images)
    assert _rel_err(out, expect) < CPU_TOL[1]


def test_autocast_bfloat16_cpu():
    check_autocast_bfloat16_cpu(*_model_pair("spvit_deit_tiny", "topk", "mean"), _images(4))


def check_autocast_bfloat16_cpu(ref, acc, images):
    """Under CPU bfloat16 autocast the accelerated model keeps the reference's counts and its logits stay
    within 0.1 of their scale (autocast rounds the two forms' matmul inputs differently)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ref, info_ref = ref(images, return_info=True)
        logits_acc, info_acc = acc(images, return_info=True)
    assert torch.isfinite(logits_acc).all()
    assert torch.equal(info_acc["num_kept"], info_ref["num_kept"])
    assert _rel_err(logits_acc, logits_ref) < 0.1


# --- GPU ------------------------------------------------------------------------------------------------------

def _boundary(scores, cand, pruning, threshold, k):
    """The keep_score at which the decision of this stage switches, for one image."""
    if pruning == "threshold":
        return threshold
    ranked = torch.sort(scores[cand].double(), descending=True).values
    if k >= ranked.numel():
        return float("-inf")
    return float((ranked[k - 1] + ranked[k]) / 2) if k > 0 else float("inf")


def _flip_aware_compare(ref, images, info_ref, info_acc, band):
    """Compare kept sets stage by stage. A token may be kept by one model and not the other only if its
    reference keep_score lies within `band` of the decision boundary; once an image has such a flip, its
    later stages (and its logits) legitimately differ and are not compared. Returns the images without a flip."""
    cfg = ref.config
    clean = set(range(images.shape[0]))
    for s in range(cfg.num_stages):
        scores, cand = ref.stage_scores(images, s)
        k = cfg.num_keep(s, scores.shape[1])
        for b in sorted(clean):
            mine, theirs = set(info_acc["kept_indices"][s][b].tolist()), set(info_ref["kept_indices"][s][b].tolist())
            if mine == theirs:
                continue
            edge = _boundary(scores[b].cpu(), cand[b].cpu(), cfg.pruning, cfg.threshold_at(s), k)
            for t in mine ^ theirs:
                gap = abs(float(scores[b, t]) - edge)
                assert gap <= band, f"stage {s} image {b} token {t}: flipped {gap:.3g} away from the boundary"
            clean.discard(b)
    return sorted(clean)


def check_gpu_agreement(ref, acc, images, band, tol, same_tokens=True):
    """The GPU comparison every family uses: run both models with return_info, compare kept sets flip-aware
    (`band`), then the logits of the images without a flip within `tol` of the reference logits' scale, and
    (same_tokens) their token counts."""
    with torch.inference_mode():
        logits_ref, info_ref = ref(images, return_info=True)
        logits_acc, info_acc = acc(images, return_info=True)
        clean = _flip_aware_compare(ref, images, info_ref, info_acc, band)
    assert logits_acc.dtype == images.dtype and torch.isfinite(logits_acc).all()
    assert len(clean) >= images.shape[0] // 2, f"too many images flipped: {images.shape[0] - len(clean)}"
    assert _rel_err(logits_acc[clean], logits_ref[clean]) < tol
    if same_tokens:
        assert torch.equal(info_acc["num_tokens"][:, clean], info_ref["num_tokens"][:, clean])
    return logits_ref[clean], logits_acc[clean]


def assert_no_host_sync(model, images):
    """A second forward of `model` (the first compiles and autotunes) never synchronises with the GPU."""
    with torch.inference_mode():
        model(images)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@requires_gpu
@pytest.mark.parametrize("dtype,tol,band", GPU_TOLS)
@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("name", ["spvit_deit_tiny", "spvit_deit_small", "spvit_deit_320"])
def test_gpu_accelerated_matches_reference(name, pruning, package, dtype, tol, band):
    ref, acc = _model_pair(name, pruning, package, device="cuda", dtype=dtype)
    images = _images(17, dtype, "cuda", seed=3)
    logits_ref, logits_acc = check_gpu_agreement(ref, acc, images, band, tol, same_tokens=False)
    top1 = (logits_acc.argmax(-1) == logits_ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.9


@requires_gpu
def test_gpu_topk_has_no_host_sync():
    _, acc = _model_pair("spvit_deit_small", "topk", "mean", device="cuda", dtype=torch.bfloat16)
    assert_no_host_sync(acc, _images(8, torch.bfloat16, "cuda"))


@requires_gpu
def test_gpu_topk_cuda_graph_capture():
    _, acc = _model_pair("spvit_deit_small", "topk", "mean", device="cuda", dtype=torch.bfloat16)
    static = _images(8, torch.bfloat16, "cuda")
    with torch.inference_mode():
        expect = acc(static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                acc(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = acc(static)
        static.copy_(_images(8, torch.bfloat16, "cuda", seed=1))
        graph.replay()
        torch.cuda.synchronize()
        fresh = acc(static)
    assert torch.equal(out, fresh)
    assert not torch.equal(out, expect)


@requires_gpu
def test_gpu_compile_fullgraph_topk():
    ref, acc = _model_pair("spvit_deit_small", "topk", "mean", device="cuda", dtype=torch.bfloat16)
    images = _images(8, torch.bfloat16, "cuda")
    compiled = torch.compile(acc, fullgraph=True)
    with torch.inference_mode():
        out = compiled(images)
        expect = acc(images)
    assert _rel_err(out, expect) < 6e-2


def test_calibrate_edge_targets():
    """Keep ratios of 1 (keep every candidate) and tiny ones (keep none) give thresholds that do so."""
    torch.manual_seed(0)
    model = create_model("spvit_deit_tiny", num_classes=NUM_CLASSES, pruning="threshold")
    images = _images(1, seed=6)
    calibrate_thresholds(model, images, keep_ratios=(1.0, 0.002, 0.001))
    with torch.inference_mode():
        _, info = model(images, return_info=True)
    assert info["num_kept"][:, 0].tolist() == [196, 0, 0]
    with pytest.raises(ValueError, match="keep_ratios"):
        calibrate_thresholds(model, images, keep_ratios=(0.5, 0.6, 0.1))
