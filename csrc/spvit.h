// Declarations of the native kernels compiled into spvit_kernels._C.
//
// Argument validation lives in Python (spvit_kernels/ops/_validate.py), shared by every backend; the
// kernels here only re-check what they need to stay in bounds (TORCH_CHECK), so a direct call with bad
// input raises instead of reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <tuple>

namespace spvit {

// --- token_scores (csrc/cpu/token_scores_cpu.cpp) ---------------------------------------------------
// Returns (keep_score, keep_prob), float32 of shape (T,).
std::tuple<at::Tensor, at::Tensor> token_scores_cpu(
    const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t num_packages, int64_t num_heads,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& se_w1, const at::Tensor& se_b1,
    const at::Tensor& se_w2, const at::Tensor& se_b2, int64_t num_prefix);

// --- prune_pack (csrc/cpu/prune_pack_cpu.cpp, csrc/cuda/prune_pack_cuda.cu, csrc/simt/prune_pack_simt.cpp) ----------------------------
// mode: 0 = threshold, 1 = topk. package: 0 = none, 1 = sum, 2 = mean. package_merge: 0 = concat (the new
// package row is appended), 1 = add (one package row per image: with num_packages = 1 the pooled row is added
// to the old one in fp32 and replaces it, with num_packages = 0 it is appended).
// total_rows: the number of output rows, computed by the caller (Python) from cu_seqlens, or -1.
// num_prefix: rows at the start of every image that are always kept (cls, distillation, register tokens).
// Returns (x_out, cu_seqlens_out, src_index).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_pack_cpu(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& keep_score, const at::Tensor& keep_prob,
    int64_t num_packages, int64_t mode, double threshold, int64_t num_keep, int64_t package, int64_t total_rows,
    int64_t package_merge, int64_t num_prefix);

// The same CUDA kernels and launcher executed on CPU tensors by the SIMT layer (csrc/simt/).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_pack_cuda_simt(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& keep_score, const at::Tensor& keep_prob,
    int64_t num_packages, int64_t mode, double threshold, int64_t num_keep, int64_t package, int64_t total_rows,
    int64_t package_merge, int64_t num_prefix);

// Thread schedule seed of the following SIMT launches (csrc/simt/simt.h: 0 in order, 1 reversed, 2 one warp
// ahead, 3 random; seed % 4 picks the kind, the seed draws the order).
void simt_set_schedule(int64_t seed);
int64_t simt_schedule();
// Bytes of static __shared__ memory the SIMT layer found (and poisons before every block) per launched kernel.
std::map<std::string, int64_t> simt_static_shared_bytes();

#ifdef SPVIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_pack_cuda(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& keep_score, const at::Tensor& keep_prob,
    int64_t num_packages, int64_t mode, double threshold, int64_t num_keep, int64_t package, int64_t total_rows,
    int64_t package_merge, int64_t num_prefix);
#endif

}  // namespace spvit
