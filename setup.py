"""Build spvit_kernels and its native extension ``spvit_kernels._C``.

What gets compiled:
  * always: the op schemas and bindings (csrc/*.cpp), the C++ CPU kernels (csrc/cpu/*.cpp) and the CUDA
    kernels of csrc/cuda/*.cu compiled by the host compiler against the SIMT execution layer
    (csrc/simt/*.cpp, csrc/simt/simt.h): they run on CPU tensors as the `cuda_simt` backends, which is how
    tests execute the CUDA C++ code on machines without a GPU. The binary keeps its symbol table: the layer
    reads it to find (and poison) the kernels' static __shared__ variables;
  * the CUDA kernels (csrc/cuda/*.cu) whenever a CUDA toolkit (nvcc) is found and the installed torch is a
    CUDA build. A visible GPU is *not* required: CI compiles the CUDA sources on machines without one.

Environment switches:
  SPVIT_BUILD_CUDA=1      require the CUDA build (fail if nvcc or a CUDA torch is missing)
  SPVIT_BUILD_CUDA=0      skip the CUDA sources even when they could be built
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0+PTX": sm_80 and sm_90 machine code, PTX for sm_90)
  MAX_JOBS                parallel compile jobs (ninja)
  SPVIT_DEBUG=1           -O0 -g host code and -G device code

Install with ``pip install --no-build-isolation -e .`` so the extension is built against the torch already
installed in the environment.
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _log(msg):
    print(f"[spvit_kernels setup] {msg}", flush=True)


def _find_cuda_home():
    """The toolkit root: $CUDA_HOME / $CUDA_PATH, else the folder above `nvcc`, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _read_version():
    scope = {}
    with open(os.path.join(ROOT, "spvit_kernels", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _want_cuda():
    switch = os.environ.get("SPVIT_BUILD_CUDA", "auto").strip().lower()
    have_toolkit = _cuda_home is not None
    have_cuda_torch = torch.version.cuda is not None
    if switch in ("0", "false", "no", "off"):
        _log("SPVIT_BUILD_CUDA=0: skipping the CUDA sources")
        return False
    if switch in ("1", "true", "yes", "on"):
        if not have_toolkit:
            sys.exit("SPVIT_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        if not have_cuda_torch:
            sys.exit(f"SPVIT_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        return True
    if not have_toolkit:
        _log("no CUDA toolkit (nvcc) found: building the CPU kernels only")
        return False
    if not have_cuda_torch:
        _log(f"torch {torch.__version__} is a CPU build: building the CPU kernels only")
        return False
    return True


def _wheel_cuda_include_dirs():
    """Headers of the `nvidia-*` wheels (cublas, cusparse, ...) that ATen's CUDA headers include.

    A bare toolkit (nvcc + cudart) lacks them; a CUDA build of torch from PyPI ships them under
    site-packages/nvidia/<lib>/include (one merged `cu13` folder for CUDA 13).
    """
    if _cuda_home and os.path.exists(os.path.join(_cuda_home, "include", "cublas_v2.h")):
        return []
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extensions():
    debug = os.environ.get("SPVIT_DEBUG", "0") == "1"
    host_flags = ["-O0", "-g"] if debug else ["-O3"]
    host_flags += ["-fopenmp"]  # the C++ standard is the one torch's BuildExtension picks for its headers
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "simt", "*.cpp")))
    macros = [("SPVIT_TORCH_VERSION", f'"{torch.__version__}"')]
    build_cuda = _want_cuda()
    if not build_cuda:
        _log(f"building spvit_kernels._C (CPU) from {len(sources)} sources")
        return [CppExtension(
            "spvit_kernels._C", sources, define_macros=macros + [("SPVIT_CUDA_ARCHS", '""')],
            extra_compile_args={"cxx": host_flags}, extra_link_args=["-fopenmp"])]

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = _wheel_cuda_include_dirs()
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    if debug:
        nvcc_flags = ["-O0", "-G", "--expt-relaxed-constexpr"]
    _log(f"building spvit_kernels._C (CPU + CUDA) from {len(sources)} C++ and {len(cuda_sources)} CUDA "
         f"sources; CUDA_HOME={_cuda_home}; TORCH_CUDA_ARCH_LIST={archs}; torch {torch.__version__} "
         f"(CUDA {torch.version.cuda})")
    if include_dirs:
        _log("CUDA headers from the nvidia wheels: " + ", ".join(include_dirs))
    return [CUDAExtension(
        "spvit_kernels._C", sources + cuda_sources, include_dirs=include_dirs,
        define_macros=macros + [("SPVIT_WITH_CUDA", None), ("SPVIT_CUDA_ARCHS", f'"{archs}"')],
        extra_compile_args={"cxx": host_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])]


setup(
    name="spvit_kernels",
    version=_read_version(),
    description="Fused GPU kernels that make token-pruned (SPViT) Vision Transformers run on fewer tokens",
    packages=find_packages(include=["spvit_kernels", "spvit_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "timm>=0.9", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "timm", "triton", "torchvision", "tqdm"],
        "bench": ["matplotlib", "tqdm", "pandas"],
        "eval": ["torchvision", "tqdm", "pillow"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
