"""The Triton token_scores kernel with num_prefix prefix rows per image (0, 1, 2), against a float64 oracle.

The oracle is the reference backend in its one-prefix-row form: every image is rebuilt as [one stand-in prefix
row, candidates, packages] (the stand-in never influences the candidates: prefix rows are neither scored nor in
the global mean), so the candidates' scores must equal those of the kernel run on [num_prefix prefix rows,
candidates, packages]. Prefix and package rows must be exactly +inf / 1.
"""

import pytest
import torch

from spvit_kernels import ops

from .test_token_scores import TRITON_TOL, make_weights
from .utils import HAS_GPU, make_cu_seqlens, requires_gpu, requires_triton_interpret

INF = float("inf")
CANDIDATES = [12, 0, 5, 1, 30]  # candidate rows per image: none, one, a few, more than one 16-row tile


def _images(num_prefix, num_packages, C, dtype, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    lengths = [num_prefix + n + num_packages for n in CANDIDATES]
    x = (1.5 * torch.randn(sum(lengths), C, generator=gen) + torch.randn(1, C, generator=gen)).to(dtype)
    return x.to(device), make_cu_seqlens(lengths, device)


def _oracle_one_prefix(x, cu, num_prefix, num_packages, H, weights):
    """float64 reference scores of each image's candidates, computed on [stand-in row, candidates, packages]."""
    bounds = cu.tolist()
    parts, lengths = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        stand_in = torch.zeros(1, x.shape[1], dtype=torch.float64)
        parts += [stand_in, x[s + num_prefix:e].double().cpu()]
        lengths.append(e - s - num_prefix + 1)
    x1 = torch.cat(parts)
    score, prob = ops.token_scores(x1, make_cu_seqlens(lengths), num_packages, H,
                                   *[w.double().cpu() for w in weights], backend="reference")
    # Back to the rows of x: drop the stand-in row of every image.
    keep = torch.ones(x1.shape[0], dtype=torch.bool)
    keep[make_cu_seqlens(lengths)[:-1].long()] = False
    return score[keep], prob[keep]


def _check(num_prefix, num_packages, dtype, device):
    from spvit_kernels.triton.token_scores import token_scores_triton

    C, H = 64, 2
    x, cu = _images(num_prefix, num_packages, C, dtype, device)
    w = [t.to(device) for t in make_weights(H, C // H)]
    score, prob = (t.cpu() for t in token_scores_triton(x, cu, num_packages, H, *w, num_prefix=num_prefix))
    assert not score.isnan().any() and not prob.isnan().any()
    bounds = cu.tolist()
    special = torch.zeros(x.shape[0], dtype=torch.bool)
    for s, e in zip(bounds[:-1], bounds[1:]):
        special[s:s + num_prefix] = True
        special[e - num_packages:e] = True
    assert torch.equal(score[special], torch.full_like(score[special], INF))
    assert torch.equal(prob[special], torch.ones_like(prob[special]))
    ref_score, ref_prob = _oracle_one_prefix(x, cu, num_prefix, num_packages, H, w)
    # Rows of x without the prefix rows, in the oracle's order.
    rest = torch.ones(x.shape[0], dtype=torch.bool)
    for s in bounds[:-1]:
        rest[s:s + num_prefix] = False
    cand = ~special[rest]
    atol, rtol, prob_atol = TRITON_TOL[dtype]
    torch.testing.assert_close(score[rest][cand], ref_score[cand].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(prob[rest][cand], ref_prob[cand].float(), atol=prob_atol, rtol=0)
    assert ref_score[cand].std() > 0.05  # scores vary: the comparison means something


@requires_triton_interpret
@pytest.mark.parametrize("num_packages", [0, 2])
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_triton_interpret_num_prefix(num_prefix, num_packages):
    _check(num_prefix, num_packages, torch.float32, "cpu")


@requires_triton_interpret
def test_triton_interpret_num_prefix_bfloat16():
    _check(2, 1, torch.bfloat16, "cpu")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_triton_cuda_num_prefix(num_prefix, dtype):
    _check(num_prefix, 2, dtype, "cuda")


@requires_gpu
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_cuda_device_guard():
    """Tensors on cuda:1 while cuda:0 is current: the launch must run on the tensors' device."""
    with torch.cuda.device(0):
        _check(1, 2, torch.bfloat16, "cuda:1")
