"""The native backends of prune_pack: "cpu" (C++, csrc/cpu/prune_pack_cpu.cpp), "cuda" (CUDA C++,
csrc/cuda/prune_pack_cuda.cu) and "cuda_simt" (the same CUDA C++ kernels and launcher run on CPU tensors by the
SIMT layer, csrc/simt/; for tests, never picked by backend=None; see spvit_kernels.ops.simt). Each registers
itself only when this build has its kernel.

Each receives the validated tuple of spvit_kernels.ops.prune_pack._check:
    (x (T, C), cu_seqlens (B+1,) int32, keep_score (T,) f32, keep_prob (T,) f32, num_packages, mode,
     threshold, num_keep, package, total_rows, package_merge, num_prefix)
and return (x_out (T_out, C), cu_seqlens_out (B+1,) int32, src_index (T_out,) int64).
total_rows is None in threshold mode: the kernels count the kept rows (on CUDA with one host
synchronisation); in top-k mode it is the output size and the CUDA kernel does not synchronise.
"""

import torch

from .._ext import native
from . import _registry

OP = "prune_pack"
MODE_CODES = {"threshold": 0, "topk": 1}  # as declared in csrc/spvit.h
PACKAGE_CODES = {"none": 0, "sum": 1, "mean": 2}
MERGE_CODES = {"concat": 0, "add": 1}

_cpu_kernel = native("prune_pack_cpu")
_cuda_kernel = native("prune_pack_cuda")
_simt_kernel = native("prune_pack_cuda_simt")


def _native_args(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold, num_keep, package,
                 total_rows, package_merge, num_prefix):
    return (x, cu_seqlens, keep_score, keep_prob, int(num_packages), MODE_CODES[mode], float(threshold),
            -1 if num_keep is None else int(num_keep), PACKAGE_CODES[package],
            -1 if total_rows is None else int(total_rows), MERGE_CODES[package_merge], int(num_prefix))


def _register_native(name, kernel, devices, doc):
    """Register `kernel` (a native entry point taking csrc/spvit.h's argument order) as backend `name`."""

    def backend(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold=0.0, num_keep=None,
                package="mean", total_rows=None, package_merge="concat", num_prefix=1):
        return kernel(*_native_args(x, cu_seqlens, keep_score, keep_prob, num_packages, mode, threshold, num_keep,
                                    package, total_rows, package_merge, num_prefix))

    backend.__name__ = backend.__qualname__ = f"prune_pack_{name}"
    backend.__doc__ = doc + " (see spvit_kernels.ops.prune_pack for the shapes)."
    return _registry.register_backend(OP, name, devices)(backend)


if _cpu_kernel is not None:
    prune_pack_cpu = _register_native("cpu", _cpu_kernel, lambda: {"cpu"},
                                      "C++ kernel: at::parallel_for over images")
if _cuda_kernel is not None:
    prune_pack_cuda = _register_native("cuda", _cuda_kernel,
                                       lambda: {"cuda"} if torch.cuda.is_available() else set(),
                                       "CUDA C++ kernel on the current stream")
if _simt_kernel is not None:
    prune_pack_cuda_simt = _register_native("cuda_simt", _simt_kernel, lambda: {"cpu"},
                                            "The CUDA kernels executed on CPU tensors, under the schedule of "
                                            "spvit_kernels.ops.simt (slow)")
