// The op schemas of the `spvit` library and the Python bindings of the native kernels.
//
// Every op is declared once here. Its per-device kernels are registered from Python
// (spvit_kernels/ops/_library.py) so that one validation routine per op serves every backend; the C++
// and CUDA kernels below are reached through that layer via the bindings at the end of this file.
#include <torch/extension.h>

#include "spvit.h"

TORCH_LIBRARY(spvit, m) {
  m.def(
      "token_scores(Tensor x, Tensor cu_seqlens, int num_packages, int num_heads, Tensor ln_weight, "
      "Tensor ln_bias, Tensor w_in, Tensor b_in, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, "
      "Tensor b3, Tensor se_w1, Tensor se_b1, Tensor se_w2, Tensor se_b2) -> (Tensor, Tensor)");
  m.def(
      "prune_pack(Tensor x, Tensor cu_seqlens, Tensor keep_score, Tensor keep_prob, int num_packages, "
      "str mode, float threshold=0.0, int? num_keep=None, str package=\"mean\") -> (Tensor, Tensor, Tensor)");
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int? max_seqlen=None, "
      "float? softmax_scale=None) -> Tensor");
}

namespace {

// What this binary was built with, for `python -m spvit_kernels.info` and the build tests.
py::dict build_info() {
  py::dict info;
  info["torch_version"] = SPVIT_TORCH_VERSION;
#ifdef SPVIT_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_archs"] = SPVIT_CUDA_ARCHS;
#else
  info["with_cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spvit_kernels native kernels (reached through torch.ops.spvit.* and spvit_kernels.ops)";
  m.def("build_info", &build_info, "What this extension was compiled with");
  // --- CPU kernels ---
  m.def("prune_pack_cpu", &spvit::prune_pack_cpu, "prune_pack on CPU (csrc/cpu/prune_pack_cpu.cpp)");
  m.def("token_scores_cpu", &spvit::token_scores_cpu, "token_scores on CPU (csrc/cpu/token_scores_cpu.cpp)");
  // --- CUDA kernels executed on the CPU by the SIMT layer (csrc/simt/simt.h) ---
  m.def("prune_pack_cuda_simt", &spvit::prune_pack_cuda_simt,
        "prune_pack's CUDA kernels run on CPU tensors (csrc/simt/prune_pack_simt.cpp)");
  m.def("simt_set_schedule", &spvit::simt_set_schedule, "Thread schedule seed of the following SIMT launches");
  m.def("simt_schedule", &spvit::simt_schedule, "Thread schedule seed of the SIMT launches");
  m.def("simt_static_shared_bytes", &spvit::simt_static_shared_bytes,
        "Static __shared__ bytes the SIMT layer found (and poisons) per launched kernel");
  // --- CUDA kernels ---
#ifdef SPVIT_WITH_CUDA
  m.def("prune_pack_cuda", &spvit::prune_pack_cuda, "prune_pack on CUDA (csrc/cuda/prune_pack_cuda.cu)");
#endif
}
