"""`python -m spvit_kernels.info`: what this installation was built with, runs with, and can use."""

import os
import platform
import shutil

import torch

from . import ops
from ._ext import _C, build_info
from .version import __version__

OPS = ("token_scores", "prune_pack", "varlen_attention", "policy_attention", "selector_train", "add_layer_norm",
       "gelu_mlp")


def find_cuobjdump():
    """A cuobjdump binary: on PATH, in the CUDA toolkit, or the one Triton ships."""
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def compiled_sm_archs():
    """The sm_XX machine-code targets embedded in the extension (via cuobjdump), or None if unknown."""
    import subprocess

    tool = find_cuobjdump()
    if tool is None or not build_info()["with_cuda"]:
        return None
    out = subprocess.run([tool, "--list-elf", _C.__file__], capture_output=True, text=True)
    archs = set()
    for line in out.stdout.splitlines():
        # lines look like: "ELF file    1: _C.1.sm_90.cubin"
        for token in line.replace(".", " ").split():
            if token.startswith("sm_") and token[3:].rstrip("a").isdigit():
                archs.add(token)
    return sorted(archs)


def collect():
    info = build_info()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = {
        "spvit_kernels": __version__,
        "python": platform.python_version(),
        "torch (built against)": info["torch_version"],
        "torch (running)": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "CUDA kernels compiled": "yes" if info["with_cuda"] else "no",
        "CUDA arch list": info["cuda_archs"] or "-",
        "GPU visible": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no",
        "OpenMP": "yes" if info["openmp"] else "no",
        # CPU speed collapses when threads oversubscribe the cores (the commands take --threads)
        "CPU threads (torch)": f"{torch.get_num_threads()} of {os.cpu_count()} cores",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if info["with_cuda"]:
        sm = compiled_sm_archs()
        rows["CUDA machine code"] = "unknown (no cuobjdump)" if sm is None else (", ".join(sm) or "none")
    for name in OPS:
        rows[f"backends: {name}"] = ", ".join(ops.available_backends(name))
    return rows


def main(argv=None):
    import argparse

    argparse.ArgumentParser(prog="python -m spvit_kernels.info",
                            description="What this installation of spvit_kernels was built with, runs with (versions, "
                                        "CUDA targets, CPU threads) and which backend of each op is usable here."
                            ).parse_args(argv)
    rows = collect()
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
