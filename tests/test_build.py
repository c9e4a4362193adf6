"""The built extension: what it was compiled with, and that `python -m spvit_kernels.info` tells the truth."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from spvit_kernels import info
from spvit_kernels._ext import build_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))


def test_built_against_the_running_torch_minor():
    built = build_info()["torch_version"].split("+")[0].split(".")[:2]
    assert built == torch.__version__.split("+")[0].split(".")[:2]


def test_cuda_build_required_in_ci():
    # CI sets SPVIT_REQUIRE_CUDA_BUILD=1: there the CUDA sources must have been compiled.
    if os.environ.get("SPVIT_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("SPVIT_REQUIRE_CUDA_BUILD is not set")
    assert build_info()["with_cuda"], "the extension was built without its CUDA sources"


@pytest.mark.skipif(not build_info()["with_cuda"], reason="extension built without CUDA")
def test_extension_has_sm80_and_sm90_machine_code():
    if not CUDA_SOURCES:
        pytest.skip("no CUDA sources in csrc/cuda yet")
    if info.find_cuobjdump() is None:
        pytest.fail("cuobjdump not found (neither on PATH, in CUDA_HOME, nor shipped with Triton)")
    archs = set(info.compiled_sm_archs())
    expected = {f"sm_{a.replace('.', '').replace('+PTX', '')}"
                for a in build_info()["cuda_archs"].replace(" ", ";").split(";") if a}
    assert {"sm_80", "sm_90"} <= expected, f"arch list {build_info()['cuda_archs']} lacks 8.0 or 9.0"
    assert expected <= archs, f"machine code for {sorted(expected - archs)} missing; found {sorted(archs)}"


def test_info_cli_reports_every_op():
    out = subprocess.run([sys.executable, "-m", "spvit_kernels.info"], capture_output=True, text=True, check=True)
    for name in info.OPS:
        assert f"backends: {name}" in out.stdout
    assert ("yes" if build_info()["with_cuda"] else "no") in out.stdout.split("CUDA kernels compiled")[1].splitlines()[0]
    assert ("no" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)) in \
        out.stdout.split("GPU visible")[1].splitlines()[0]
