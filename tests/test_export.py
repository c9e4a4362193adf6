"""torch.export of accelerated models: the exported program runs and matches the eager model.

Top-k pruning has static sizes; threshold pruning's sizes depend on the data (the number of kept rows is
read on the host at every stage), which torch.export represents with unbacked symbolic sizes, so both
export, with a dynamic batch dimension.
"""

import shutil

import pytest
import torch
from torch.export import Dim

from spvit_kernels import accelerate
from spvit_kernels.models import calibrate_thresholds, create_model

# One small model per family (the families added later join this list).
FAMILY_MODELS = ["spvit_deit_tiny", "spvit_lvvit_s", "spvit_pit_ti"]
# (dtype, atol, rtol): the exported graph runs the same kernels as eager, so the match is close to exact.
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)]
NUM_CLASSES = 10
BATCH = Dim("batch", min=1, max=1024)


def _model(name, dtype, pruning="topk"):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, pruning=pruning)
    with torch.no_grad():  # random selectors, so that the scores differ between tokens and images
        for p in model.selectors.parameters():
            p.copy_(torch.randn_like(p))
    if pruning == "threshold":
        calibrate_thresholds(model, torch.randn(3, 3, 224, 224))
    return accelerate(model.to(dtype))


def _images(batch, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g).to(dtype)


def _export(model, dtype):
    return torch.export.export(model, (_images(2, dtype, 1),), dynamic_shapes=({0: BATCH},))


@pytest.mark.parametrize("name", FAMILY_MODELS)
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_export_topk_matches_eager(name, dtype, atol, rtol):
    model = _model(name, dtype)
    program = _export(model, dtype)
    for batch in (3, 1):  # not the batch it was exported with
        images = _images(batch, dtype, 10 + batch)
        out = torch.full((batch, NUM_CLASSES), float("nan"), dtype=dtype)
        out.copy_(program.module()(images))
        with torch.no_grad():
            torch.testing.assert_close(out, model(images), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS[:1])
def test_export_threshold_with_data_dependent_sizes(dtype, atol, rtol):
    model = _model("spvit_deit_tiny", dtype, pruning="threshold")
    program = _export(model, dtype)
    images = _images(4, dtype, 7)
    with torch.no_grad():
        expected, info = model(images, return_info=True)
    # The images keep different numbers of patches: a program specialised to the export input would differ.
    assert len(set(info["num_kept"][0].tolist())) > 1
    torch.testing.assert_close(program.module()(images), expected, atol=atol, rtol=rtol)


def test_save_and_load(tmp_path):
    model = _model("spvit_deit_tiny", torch.float32)
    path = tmp_path / "spvit_deit_tiny.pt2"
    torch.export.save(_export(model, torch.float32), path)
    loaded = torch.export.load(path)
    images = _images(3, torch.float32, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(images), model(images), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package") or shutil.which("c++") is None,
                    reason="needs AOTInductor and a C++ compiler")
def test_aot_inductor_package(tmp_path):
    model = _model("spvit_deit_tiny", torch.float32)
    package = torch._inductor.aoti_compile_and_package(_export(model, torch.float32),
                                                       package_path=str(tmp_path / "spvit_deit_tiny_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    images = _images(3, torch.float32, 5)
    with torch.no_grad():
        torch.testing.assert_close(runner(images), model(images), atol=1e-4, rtol=1e-4)
