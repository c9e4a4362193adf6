// prune_pack on CPU: keep decision, gather of prefix / kept / old package rows, pooling of the dropped rows
// into a new package row, src_index and cu_seqlens_out (design sections 2-4).
//
// Layout: x (T, C) rows of all images concatenated, image b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1
// = [Q prefix rows, n_b candidates, P old package rows]. Output image b: [Q prefix rows, kept candidates in
// order, P old package rows, new package row (package != none)]; with package_merge "add" and P = 1 the old
// package row is not copied: the pooled row plus the old one (added in fp32) takes its place.
//
// Two passes over the images, each an at::parallel_for: (1) output rows per image (top-k: from
// cu_seqlens; threshold: count the kept candidates), then a serial prefix sum (top-k's total is fixed by
// the shapes, see topk_output_rows); (2) per image the decision
// (top-k by std::nth_element on a total order: higher score first, NaN last, ties to the lower index),
// memcpy of the kept rows and fp32 (double for float64) pooling of the dropped ones.
//
// Every segment read from cu_seqlens is clamped to [0, T] and no row at or past total_rows is written,
// so unchecked bad cu_seqlens give wrong numbers but never an out-of-bounds access.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common/segment.h"
#include "../spvit.h"

namespace spvit {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// The keep flags of one image's candidates (scores s[0..n)).
void decide(const float* s, int64_t n, bool topk, float thr, int64_t num_keep, std::vector<uint8_t>& keep,
            std::vector<int64_t>& order) {
  keep.assign(n, 0);
  if (!topk) {
    for (int64_t i = 0; i < n; ++i) keep[i] = s[i] > thr;  // NaN compares false: never kept
    return;
  }
  const int64_t k = std::min(num_keep, n);
  if (k == n) {
    std::fill(keep.begin(), keep.end(), 1);
    return;
  }
  if (k == 0) return;
  order.resize(n);
  std::iota(order.begin(), order.end(), int64_t(0));
  // A strict total order: a before b if a's score is higher, NaN last, equal scores by index.
  auto better = [s](int64_t a, int64_t b) {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return nb;
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
  for (int64_t j = 0; j < k; ++j) keep[order[j]] = 1;
}

template <typename scalar_t>
void run(const at::Tensor& x, const int32_t* cu, const float* score, const float* prob, int64_t B, int64_t P,
         int64_t Q, bool merge, bool topk, float thr, int64_t num_keep, int64_t package,
         const std::vector<int64_t>& offsets, int64_t total_rows, at::Tensor& x_out, int64_t* src_index) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = x.size(0), C = x.size(1);
  const int64_t ld = T > 1 ? x.stride(0) : C;
  const scalar_t* xin = x.data_ptr<scalar_t>();
  scalar_t* out = x_out.data_ptr<scalar_t>();
  const size_t row_bytes = static_cast<size_t>(C) * sizeof(scalar_t);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> keep;
    std::vector<int64_t> order;
    std::vector<acc_t> acc(C);
    for (int64_t b = b0; b < b1; ++b) {
      const Segment g = segment(cu, b, T, P, Q);
      decide(score + g.first, g.n_cand, topk, thr, num_keep, keep, order);
      int64_t o = offsets[b];
      auto put = [&](int64_t src) {  // next output row <- input row src
        if (o < total_rows) {
          if (row_bytes) std::memcpy(out + o * C, xin + src * ld, row_bytes);
          src_index[o] = src;
        }
        ++o;
      };
      for (int64_t j = 0; j < g.n_pre; ++j) put(g.start + j);
      for (int64_t i = 0; i < g.n_cand; ++i)
        if (keep[i]) put(g.first + i);
      for (int64_t j = 0; j < copied_old(g, merge); ++j) put(g.pkg_start + j);
      if (package == 0) continue;

      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t wsum = 0;
      int64_t dropped = 0;
      for (int64_t i = 0; i < g.n_cand; ++i) {
        if (keep[i]) continue;
        const acc_t w = static_cast<acc_t>(prob[g.first + i]);
        const scalar_t* row = xin + (g.first + i) * ld;
        wsum += w;
        ++dropped;
        for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(row[c]);
      }
      if (o < total_rows) {
        if (package == 2) {  // mean: a zero vector when nothing was dropped or the weights sum to 0
          const bool zero = dropped == 0 || wsum == acc_t(0);
          for (int64_t c = 0; c < C; ++c) acc[c] = zero ? acc_t(0) : acc[c] / wsum;
        }
        if (merge && g.n_old > 0) {  // "add": the old package row joins in fp32, the sum is rounded once
          const scalar_t* old = xin + g.pkg_start * ld;
          for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(old[c]);
        }
        scalar_t* dst = out + o * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        src_index[o] = -1;
      }
    }
  });

  // Rows past the last image (top-k's size is fixed by the shapes, see topk_output_rows; an image with
  // fewer candidates leaves such rows): zeros, src_index -1.
  for (int64_t r = std::max<int64_t>(offsets[B], 0); r < total_rows; ++r) {
    if (row_bytes) std::memset(static_cast<void*>(out + r * C), 0, row_bytes);
    src_index[r] = -1;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_pack_cpu(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& keep_score, const at::Tensor& keep_prob,
    int64_t num_packages, int64_t mode, double threshold, int64_t num_keep, int64_t package, int64_t total_rows,
    int64_t package_merge, int64_t num_prefix) {
  // The Python layer validated everything; these checks keep a direct call in bounds.
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have contiguous rows (x.stride(1) == 1)");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, "x must have a non-negative row stride");
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 2,
              "cu_seqlens must be an int32 CPU tensor of shape (B+1,), B >= 1");
  const int64_t T = x.size(0), C = x.size(1), B = cu_seqlens.size(0) - 1;
  TORCH_CHECK(keep_score.device().is_cpu() && keep_score.scalar_type() == at::kFloat && keep_score.dim() == 1 &&
                  keep_score.size(0) == T,
              "keep_score must be a float32 CPU tensor of shape (T,) = (", T, ",)");
  TORCH_CHECK(keep_prob.device().is_cpu() && keep_prob.scalar_type() == at::kFloat && keep_prob.dim() == 1 &&
                  keep_prob.size(0) == T,
              "keep_prob must be a float32 CPU tensor of shape (T,) = (", T, ",)");
  TORCH_CHECK(num_packages >= 0, "num_packages must be >= 0, got ", num_packages);
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (threshold) or 1 (topk), got ", mode);
  TORCH_CHECK(package >= 0 && package <= 2, "package must be 0 (none), 1 (sum) or 2 (mean), got ", package);
  TORCH_CHECK(mode == 0 || num_keep >= 0, "num_keep must be >= 0 in topk mode, got ", num_keep);
  TORCH_CHECK(total_rows >= -1, "total_rows must be >= 0, or -1 to compute it, got ", total_rows);
  TORCH_CHECK(num_prefix >= 0, "num_prefix must be >= 0, got ", num_prefix);
  TORCH_CHECK(package_merge == 0 || package_merge == 1, "package_merge must be 0 (concat) or 1 (add), got ",
              package_merge);
  TORCH_CHECK(package_merge == 0 || (package != 0 && num_packages <= 1),
              "package_merge add needs package sum or mean and num_packages 0 or 1");

  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor score = keep_score.contiguous();
  const at::Tensor prob = keep_prob.contiguous();
  const int32_t* cu_p = cu.data_ptr<int32_t>();
  const float* score_p = score.data_ptr<float>();
  const bool topk = mode == 1;
  const float thr = static_cast<float>(threshold);  // compared in float32, like torch's `scores > threshold`
  const int64_t new_pkg = package != 0 ? 1 : 0;
  const bool merge = package_merge == 1 && num_packages > 0;  // the pooled row replaces the old package row
  if (topk && total_rows < 0) {
    total_rows = topk_output_rows(B, T, num_packages, num_prefix, new_pkg, merge, num_keep);
    TORCH_CHECK(total_rows >= 0, "num_keep = ", num_keep, " (num_packages = ", num_packages, ", B = ", B,
                "): the top-k output would have more rows than int32 cu_seqlens can index");
  }

  // Output rows per image, then their exclusive prefix sum.
  std::vector<int64_t> offsets(B + 1, 0);
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Segment g = segment(cu_p, b, T, num_packages, num_prefix);
      int64_t kept = 0;
      if (topk) {
        kept = std::min(num_keep, g.n_cand);
      } else {
        const float* s = score_p + g.first;
        for (int64_t i = 0; i < g.n_cand; ++i) kept += s[i] > thr;
      }
      offsets[b + 1] = out_rows(g, kept, new_pkg, merge);
    }
  });
  for (int64_t b = 0; b < B; ++b) offsets[b + 1] += offsets[b];
  if (total_rows < 0) total_rows = offsets[B];
  TORCH_CHECK(std::min(offsets[B], total_rows) <= kInt32Max, "cu_seqlens: the output would have ",
              std::min(offsets[B], total_rows), " rows, more than int32 cu_seqlens can index");

  at::Tensor x_out = at::empty({total_rows, C}, x.options());
  at::Tensor src_index = at::empty({total_rows}, x.options().dtype(at::kLong));
  at::Tensor cu_out = at::empty({B + 1}, cu.options());
  int32_t* cu_out_p = cu_out.data_ptr<int32_t>();
  for (int64_t b = 0; b <= B; ++b) cu_out_p[b] = static_cast<int32_t>(std::min(offsets[b], total_rows));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prune_pack_cpu", [&] {
    run<scalar_t>(x, cu_p, score_p, prob.data_ptr<float>(), B, num_packages, num_prefix, merge, topk, thr, num_keep,
                  package, offsets, total_rows, x_out, src_index.data_ptr<int64_t>());
  });
  return {x_out, cu_out, src_index};
}

}  // namespace spvit
