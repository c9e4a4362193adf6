"""Test configuration shared by every test module.

Without a GPU, Triton kernels are tested on CPU tensors under TRITON_INTERPRET=1. Triton reads that
variable when a kernel is decorated, so it is set here, before any spvit_kernels module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _spread_selector_init(request, monkeypatch):
    """Fresh selectors follow the official initialisation (std 0.02 weights, zero biases), under which every
    keep score is within about 1e-3 of 0: scores tie to rounding, and tests of kept sets, thresholds and
    packed-vs-masked agreement would test nothing. A trained selector spreads its scores, so tests build
    selectors with nn.Linear's default initialisation instead; tests marked `official_init` get the real one."""
    if request.node.get_closest_marker("official_init") is not None:
        return
    from torch import nn

    from spvit_kernels.models.selector import TokenSelector

    def spread(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()

    monkeypatch.setattr(TokenSelector, "reset_parameters", spread)


@pytest.fixture(autouse=True)
def _simt_schedule(request):
    """Tests (or parameters) marked simt_schedule(seed) run the cuda_simt backends under that schedule."""
    marker = request.node.get_closest_marker("simt_schedule")
    if marker is None:
        yield
        return
    from spvit_kernels.ops import simt_schedule

    with simt_schedule(marker.args[0]):
        yield
