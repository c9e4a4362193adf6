// The op schemas of the `spvit` library and the Python bindings of the native kernels.
//
// Every op is declared once here. Its per-device kernels are registered from Python
// (spvit_kernels/ops/_library.py) so that one validation routine per op serves every backend; the C++
// and CUDA kernels below are reached through that layer via the bindings at the end of this file.
#include <torch/extension.h>

#include <tuple>

#include "spvit.h"

TORCH_LIBRARY(spvit, m) {
  m.def(
      "token_scores(Tensor x, Tensor cu_seqlens, int num_packages, int num_heads, Tensor ln_weight, "
      "Tensor ln_bias, Tensor w_in, Tensor b_in, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, "
      "Tensor b3, Tensor se_w1, Tensor se_b1, Tensor se_w2, Tensor se_b2, int num_prefix=1) -> (Tensor, Tensor)");
  m.def(
      "prune_pack(Tensor x, Tensor cu_seqlens, Tensor keep_score, Tensor keep_prob, int num_packages, "
      "str mode, float threshold=0.0, int? num_keep=None, str package=\"mean\", str package_merge=\"concat\", "
      "int num_prefix=1) -> (Tensor, Tensor, Tensor)");
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int? max_seqlen=None, "
      "float? softmax_scale=None) -> Tensor");
  // SPViT's training attention (a keep policy over the keys): the forward also returns the row statistics
  // (row max in log2 units, denominator) its backward needs; policy_attention is the composite front.
  m.def(
      "policy_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor policy, float eps, float softmax_scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "policy_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor policy, Tensor out, "
      "Tensor row_max, Tensor denom, float eps, float softmax_scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "policy_attention(Tensor q, Tensor k, Tensor v, Tensor policy, float eps=1e-06, float? softmax_scale=None) "
      "-> Tensor");
  // The selector's training form (weighted global mean, log-softmax and softmax per row). The forward also
  // returns what its backward reads instead of recomputing: u's local half (B, M, H, d/2), the global half's
  // weighted mean (B, H, d/2), the LayerNorm mean (= the SE branch's head means) and rstd (B, M, H).
  m.def(
      "selector_train_fwd(Tensor S, Tensor weights, int num_heads, "
      "Tensor ln_weight, Tensor ln_bias, Tensor w_in, Tensor b_in, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor w3, Tensor b3, Tensor se_w1, Tensor se_b1, Tensor se_w2, Tensor se_b2) "
      "-> (Tensor score, Tensor prob, Tensor u_loc, Tensor glob, Tensor mean, Tensor rstd)");
  // -> (dS, dweights, then the gradients of the 14 weights in their order).
  m.def(
      "selector_train_bwd(Tensor dscore, Tensor dprob, Tensor S, Tensor weights, int num_heads, "
      "Tensor ln_weight, Tensor ln_bias, Tensor w_in, Tensor b_in, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor w3, Tensor b3, Tensor se_w1, Tensor se_b1, Tensor se_w2, Tensor se_b2, "
      "Tensor score, Tensor prob, Tensor u_loc, Tensor glob, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "selector_train(Tensor S, Tensor weights, int num_heads, "
      "Tensor ln_weight, Tensor ln_bias, Tensor w_in, Tensor b_in, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor w3, Tensor b3, Tensor se_w1, Tensor se_b1, Tensor se_w2, Tensor se_b2) "
      "-> (Tensor, Tensor)");
  // Residual add + LayerNorm in one pass (s = x + branch [* branch_scale per row], y = LayerNorm(s) in
  // out_dtype): the forward also returns the row statistics its backward reads; s is an empty (0,) tensor when
  // branch is None (no copy of x). branch_scale (x.shape[:-1], float): stochastic depth's per-image factor.
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor? branch, Tensor? weight, Tensor? bias, float eps, "
      "ScalarType? out_dtype, Tensor? branch_scale=None) -> (Tensor s, Tensor y, Tensor mean, Tensor rstd)");
  // -> (dx in x_dtype, dbranch in branch_dtype, dweight, dbias); (0,) for an absent branch / weight / bias.
  m.def(
      "add_layer_norm_bwd(Tensor? dy, Tensor? dsum, Tensor s, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor rstd, ScalarType x_dtype, ScalarType? branch_dtype, Tensor? branch_scale=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm(Tensor x, Tensor? branch, Tensor? weight, Tensor? bias, float eps=1e-05, "
      "ScalarType? out_dtype=None, Tensor? branch_scale=None) -> (Tensor, Tensor)");
  // A transformer MLP fc2(gelu(fc1(h))) with GELU in the GEMM epilogues: the forward's fc1 writes u and gelu(u)
  // (returned for the backward; with for_backward false only gelu(u), and u, g come back empty (0,)), the
  // backward's fc2 input gradient multiplies by gelu'(u).
  m.def(
      "gelu_mlp_fwd(Tensor h, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool for_backward=True) "
      "-> (Tensor out, Tensor u, Tensor g)");
  // -> (dh, dw1, db1, dw2, db2); (0,) for an absent bias.
  m.def(
      "gelu_mlp_bwd(Tensor dout, Tensor h, Tensor u, Tensor g, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gelu_mlp(Tensor h, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) -> Tensor");
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
  // The native entry points take their arguments in the order of csrc/spvit.h; the ones added later
  // (num_prefix, package_merge) have defaults so that calls written before them keep working.
  const auto prune_pack_args = [] {
    return std::make_tuple(py::arg("x"), py::arg("cu_seqlens"), py::arg("keep_score"), py::arg("keep_prob"),
                           py::arg("num_packages"), py::arg("mode"), py::arg("threshold"), py::arg("num_keep"),
                           py::arg("package"), py::arg("total_rows"), py::arg("package_merge") = 0,
                           py::arg("num_prefix") = 1);
  };
  // --- CPU kernels ---
  std::apply(
      [&](auto... a) {
        m.def("prune_pack_cpu", &spvit::prune_pack_cpu, "prune_pack on CPU (csrc/cpu/prune_pack_cpu.cpp)", a...);
      },
      prune_pack_args());
  m.def("token_scores_cpu", &spvit::token_scores_cpu, "token_scores on CPU (csrc/cpu/token_scores_cpu.cpp)",
        py::arg("x"), py::arg("cu_seqlens"), py::arg("num_packages"), py::arg("num_heads"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("w_in"), py::arg("b_in"), py::arg("w1"), py::arg("b1"), py::arg("w2"),
        py::arg("b2"), py::arg("w3"), py::arg("b3"), py::arg("se_w1"), py::arg("se_b1"), py::arg("se_w2"),
        py::arg("se_b2"), py::arg("num_prefix") = 1);
  // --- CUDA kernels executed on the CPU by the SIMT layer (csrc/simt/simt.h) ---
  std::apply(
      [&](auto... a) {
        m.def("prune_pack_cuda_simt", &spvit::prune_pack_cuda_simt,
              "prune_pack's CUDA kernels run on CPU tensors (csrc/simt/prune_pack_simt.cpp)", a...);
      },
      prune_pack_args());
  m.def("simt_set_schedule", &spvit::simt_set_schedule, "Thread schedule seed of the following SIMT launches");
  m.def("simt_schedule", &spvit::simt_schedule, "Thread schedule seed of the SIMT launches");
  m.def("simt_static_shared_bytes", &spvit::simt_static_shared_bytes,
        "Static __shared__ bytes the SIMT layer found (and poisons) per launched kernel");
  // --- CUDA kernels ---
#ifdef SPVIT_WITH_CUDA
  std::apply(
      [&](auto... a) {
        m.def("prune_pack_cuda", &spvit::prune_pack_cuda, "prune_pack on CUDA (csrc/cuda/prune_pack_cuda.cu)",
              a...);
      },
      prune_pack_args());
#endif
}
