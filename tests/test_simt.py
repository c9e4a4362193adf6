"""The SIMT execution layer (csrc/simt/simt.h) catches what it is there to catch.

Small kernels (tests/simt/simt_proofs.cpp) are compiled with the host compiler and run under every schedule:
a removed barrier and a shuffle from the wrong lane change the result, a barrier some threads never reach and
a barrier deadlock are reported naming the kernel, shared memory reads before writes see the poison in every
block (static, template and dynamic shared memory). Built with AddressSanitizer, an out-of-bounds shared or
global access aborts the run, and prune_pack's CUDA kernels run clean on the emulated cases (ASan op library,
tests/simt/asan_ops.cpp + asan_driver.py).
"""

import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from spvit_kernels import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROOFS = os.path.join(ROOT, "tests", "simt", "simt_proofs.cpp")
SCHEDULES = [0, 1, 2, 3, 7]  # in order, reversed, one warp ahead, random (two seeds)
N = 64

CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
requires_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")


def _libasan():
    if CXX is None:
        return None
    out = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def _compile(out_dir, name, flags):
    exe = os.path.join(out_dir, name)
    cmd = [CXX, "-std=c++17", "-O1", "-g", "-I", os.path.join(ROOT, "csrc"), PROOFS, "-o", exe] + flags
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def proofs(tmp_path_factory):
    return _compile(str(tmp_path_factory.mktemp("simt")), "simt_proofs", [])


@pytest.fixture(scope="module")
def proofs_asan(tmp_path_factory):
    if _libasan() is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    return _compile(str(tmp_path_factory.mktemp("simt_asan")), "simt_proofs_asan",
                    ["-fsanitize=address", "-fno-omit-frame-pointer"])


def run(exe, case, seed, stdin=None):
    """(exit status, output lines as ints or the error line, stderr)."""
    p = subprocess.run([exe, case, str(seed)], capture_output=True, text=True, input=stdin, timeout=120)
    lines = p.stdout.split()
    if p.returncode == 0 and case != "convert":
        return p.returncode, [int(v) for v in lines], p.stderr
    return p.returncode, p.stdout, p.stderr


# --- barriers, shuffles, errors --------------------------------------------------------------------------

@requires_cxx
@pytest.mark.parametrize("seed", SCHEDULES)
def test_removed_barrier_changes_the_result(proofs, seed):
    rc, out, _ = run(proofs, "reverse", seed)
    assert rc == 0 and out == [100 + N - 1 - i for i in range(N)]
    rc, racy, _ = run(proofs, "reverse_no_barrier", seed)
    assert rc == 0 and racy != out and -1 in racy  # a slot read before its write holds the poison


@requires_cxx
@pytest.mark.parametrize("seed", SCHEDULES)
def test_shuffle_from_the_wrong_lane_changes_the_result(proofs, seed):
    want = [sum(i * i for i in range(32)), sum(i * i for i in range(32, 64))]
    assert run(proofs, "warp_sum", seed)[:2] == (0, want)
    rc, wrong, _ = run(proofs, "warp_sum_wrong_lane", seed)
    assert rc == 0 and wrong != want


@requires_cxx
@pytest.mark.parametrize("seed", [0, 3])
def test_warp_operations(proofs, seed):
    rc, out, _ = run(proofs, "warp_ops", seed)
    lanes = range(32)
    assert rc == 0
    assert out[:32] == [((i + 5) % 32) * 10 for i in lanes]  # __shfl_sync from lane + 5
    assert out[32:64] == [(i & ~7) + ((i % 8) ^ 3) for i in lanes]  # __shfl_xor_sync, width 8
    ballot = sum(1 << i for i in lanes if i % 3 == 0)
    assert out[64:96] == [struct.unpack("i", struct.pack("I", ballot))[0]] * 32
    assert out[96:] == [1 + 2] * 32  # any(lane == 17), all(lane < 32), not all(lane < 31)


@requires_cxx
@pytest.mark.parametrize("case,message", [
    ("early_return", "kernel early_return_kernel, block (0,0,0): __syncthreads reached by 63 of 64 threads"),
    ("mixed_barrier", "kernel mixed_barrier_kernel, block (0,0,0): barrier deadlock"),
    ("too_many_threads", "kernel atomic_kernel, block (0,0,0): 2048 threads per block"),
])
def test_bad_barriers_and_launches_are_reported(proofs, case, message):
    for seed in (0, 1):
        rc, out, _ = run(proofs, case, seed)
        assert rc == 3 and message in out, out


@requires_cxx
@pytest.mark.parametrize("seed", [0, 3])
def test_shared_memory_is_poisoned_before_every_block(proofs, seed):
    rc, out, _ = run(proofs, "read_before_write", seed)  # template kernel, int and float, 2 blocks each
    assert rc == 0 and out == [-1] * (4 * N)
    rc, out, _ = run(proofs, "dynamic_shared", seed)  # 2 blocks: poison, then the values written in-block
    assert rc == 0
    for b in range(2):
        block = out[b * 2 * N:(b + 1) * 2 * N]
        assert block[:N] == [-1] * N and block[N:] == [N - 1 - t for t in range(N)]


@requires_cxx
def test_atomics_and_2d_indices(proofs):
    assert run(proofs, "atomic", 3)[:2] == (0, [sum(range(32))] * 6)


@requires_cxx
def test_half_and_bfloat16_conversions_round_like_torch(proofs):
    gen = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.randn(300, generator=gen) * 10 ** torch.randint(-8, 6, (300,), generator=gen),
                      torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, 2.98e-8, 1e38, -3e38,
                                    float("inf"), float("-inf"), 1.0 + 2**-11, 1.0 + 3 * 2**-11])])
    bits = vals.view(torch.int32).tolist()
    rc, out, _ = run(proofs, "convert", 0, stdin=" ".join(f"{b & 0xffffffff:x}" for b in bits))
    assert rc == 0
    rows = [line.split() for line in out.strip().splitlines()]
    half = torch.tensor([int(r[0], 16) for r in rows], dtype=torch.int32).to(torch.int16)
    bf16 = torch.tensor([int(r[1], 16) for r in rows], dtype=torch.int32).to(torch.int16)
    assert torch.equal(half, vals.half().view(torch.int16))
    assert torch.equal(bf16, vals.bfloat16().view(torch.int16))
    back_h = torch.tensor([int(r[2], 16) for r in rows], dtype=torch.int64).to(torch.int32).view(torch.float32)
    back_b = torch.tensor([int(r[3], 16) for r in rows], dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert torch.equal(back_h, vals.half().float()) and torch.equal(back_b, vals.bfloat16().float())


# --- AddressSanitizer ------------------------------------------------------------------------------------

@requires_cxx
@pytest.mark.parametrize("case,report", [("shared_oob", "global-buffer-overflow"),
                                         ("global_oob", "heap-buffer-overflow")])
def test_address_sanitizer_reports_out_of_bounds_accesses(proofs_asan, case, report):
    rc, _, err = run(proofs_asan, "reverse", 3)  # fiber switches give no false report
    assert rc == 0, err
    rc, _, err = run(proofs_asan, case, 3)
    assert rc != 0 and "AddressSanitizer" in err and report in err, err[-2000:]


@requires_cxx
def test_prune_pack_cuda_kernels_under_address_sanitizer(tmp_path):
    """prune_pack's CUDA kernels (all dtypes, modes, packages; empty, one-candidate and > 4,096-candidate
    images) built with AddressSanitizer through the SIMT layer: any out-of-bounds access aborts the run."""
    libasan = _libasan()
    if libasan is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    libstdcxx = subprocess.run([CXX, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    # libstdc++ preloaded too: the sanitizer's exception interceptors need it before any C++ library loads.
    env = dict(os.environ, LD_PRELOAD=f"{libasan} {libstdcxx}", ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "simt", "asan_driver.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0 and "prune_pack runs clean" in p.stdout, (p.stdout[-2000:], p.stderr[-4000:])


# --- the Python side ---------------------------------------------------------------------------------------

def test_cuda_simt_is_listed_but_never_the_default():
    from spvit_kernels.ops import _registry

    if "cuda_simt" not in _registry._BACKENDS["prune_pack"]:
        pytest.skip("this build has no SIMT backend")
    assert "cuda_simt" in ops.available_backends("prune_pack")
    assert _registry.resolve("prune_pack", None, "cpu").name != "cuda_simt"


def test_schedule_context_restores_and_checks_the_seed():
    from spvit_kernels.ops.simt import current_schedule

    before = current_schedule()
    with ops.simt_schedule(before + 5):
        assert current_schedule() == before + 5
    assert current_schedule() == before
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            with ops.simt_schedule(bad):
                pass


def test_prune_pack_shared_memory_is_found_for_poisoning():
    """The layer finds every static __shared__ array of prune_pack's kernels, templates included, in the
    extension's symbol table (keys alone are 4,096 x 4 bytes), so all of it is poisoned before each block."""
    from spvit_kernels._ext import native

    from .test_prune_pack import make_batch

    if native("simt_static_shared_bytes") is None:
        pytest.skip("this build has no SIMT backend")
    batch = make_batch([30, 0, 5], 1, 8, torch.float16)
    ops.prune_pack(*batch, 1, "threshold", backend="cuda_simt")
    ops.prune_pack(*batch, 1, "topk", num_keep=3, backend="cuda_simt")
    found = native("simt_static_shared_bytes")()
    main = [v for k, v in found.items() if k.startswith("prune_pack_kernel<")]
    assert main and main[0] >= 4096 * 4 + 512 * 4 + 512 * 4, found
    assert found.get("count_kept_kernel", 0) >= 16 * 8 and found.get("offsets_kernel", 0) >= 17 * 8, found
