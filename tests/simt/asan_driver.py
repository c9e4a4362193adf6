"""Builds prune_pack's CUDA kernels with AddressSanitizer through the SIMT layer and runs them on the cases CI
emulates (tests/test_simt.py runs this).

usage: LD_PRELOAD="<libasan.so> <libstdc++.so.6>" ASAN_OPTIONS=detect_leaks=0 \
       python tests/simt/asan_driver.py <build folder>
AddressSanitizer aborts the process (non-zero exit status, report on stderr) at the first out-of-bounds access;
every case is also compared against the float64 reference.
"""

import os
import sys

import torch
from torch.utils import cpp_extension

from spvit_kernels import ops
from tests.test_prune_pack import check_against_oracle, make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODE_CODES = {"threshold": 0, "topk": 1}
PACKAGE_CODES = {"none": 0, "sum": 1, "mean": 2}
NAN, INF = float("nan"), float("inf")

# (spatial candidates per image, num_packages, C): empty and one-candidate images, ragged ViT-like images,
# 16-byte and scalar rows, and an image above the 4,096-candidate shared-memory cache.
CASES = [([196, 0, 1, 122, 30], 1, 36), ([27, 5, 0, 1], 3, 7), ([121, 72], 2, 24), ([4500, 3], 1, 8)]
MODES = [("topk", 0), ("topk", 1), ("topk", 27), ("topk", 10**6), ("threshold", 0.0), ("threshold", NAN)]
PACKAGES = ["mean", "sum", "none"]


def build(folder):
    env_preload = os.environ.pop("LD_PRELOAD", None)  # the compilers run without the sanitizer runtime
    try:
        return cpp_extension.load(
            name="spvit_simt_asan",
            sources=[os.path.join(ROOT, "tests", "simt", "asan_ops.cpp")],
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            extra_cflags=["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
            extra_ldflags=["-fsanitize=address"], is_python_module=False, build_directory=folder)
    finally:
        if env_preload is not None:
            os.environ["LD_PRELOAD"] = env_preload


def main():
    build(sys.argv[1])  # loads the op library into this (sanitized) process
    op = torch.ops.spvit_simt_asan
    runs = 0
    for spatial, P, C in CASES:
        big = max(spatial) > 4096
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for mode, arg in (MODES[1:3] + MODES[4:5] if big else MODES):
                for package in (PACKAGES[:1] if big else PACKAGES):
                    batch = make_batch(spatial, P, C, dtype, "mixed", "cpu", seed=runs)
                    threshold, num_keep = (arg, None) if mode == "threshold" else (0.0, arg)
                    ref = ops.prune_pack(*batch, P, mode, threshold, num_keep, package, backend="reference")
                    total = ref[0].shape[0] if mode == "topk" else -1  # as the Python layer passes it
                    op.set_schedule(runs % 4)
                    out = op.prune_pack(*batch, P, MODE_CODES[mode], float(threshold),
                                        -1 if num_keep is None else num_keep, PACKAGE_CODES[package], total,
                                        0, 1)  # package_merge concat, num_prefix 1
                    check_against_oracle(out, *batch, P, mode, threshold, num_keep, package)
                    runs += 1
    print(f"asan: {runs} prune_pack runs clean")


if __name__ == "__main__":
    main()
