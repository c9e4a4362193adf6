// The rows of one image in a packed ragged batch, shared by the CPU and CUDA prune_pack kernels.
//
// Image b owns rows cu[b] .. cu[b+1]-1 laid out [Q prefix rows, candidates, P old package rows] (Q =
// num_prefix: class / distillation / register tokens, 0 for a class-free model). The bounds are clamped to
// [0, T] and a short image gets as many prefix rows as it has, so bad cu_seqlens (only possible when they
// were not read on the host) keep every access in bounds instead of faulting.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPVIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPVIT_HOST_DEVICE inline
#endif

namespace spvit {

struct Segment {
  int64_t start;      // first prefix row
  int64_t n_pre;      // prefix rows: Q, or fewer for a segment shorter than Q
  int64_t first;      // first candidate row
  int64_t n_cand;     // candidates
  int64_t pkg_start;  // first old package row
  int64_t n_old;      // old package rows (num_packages for valid input)
};

SPVIT_HOST_DEVICE int64_t clamp_row(int64_t v, int64_t T) { return v < 0 ? 0 : (v > T ? T : v); }

SPVIT_HOST_DEVICE Segment segment(const int32_t* cu, int64_t b, int64_t T, int64_t P, int64_t Q) {
  const int64_t s = clamp_row(cu[b], T);
  int64_t e = clamp_row(cu[b + 1], T);
  if (e < s) e = s;
  const int64_t len = e - s;
  Segment g;
  g.start = s;
  g.n_pre = len < Q ? len : Q;
  g.first = s + g.n_pre;
  g.n_cand = len - g.n_pre - P > 0 ? len - g.n_pre - P : 0;  // no overflow for any Q, P >= 0
  g.pkg_start = g.first + g.n_cand;
  g.n_old = e - g.pkg_start;
  return g;
}

// Old package rows an output image copies as they are: none when the new row is merged into the old one
// (package_merge "add" with an old package row: `merge`).
SPVIT_HOST_DEVICE int64_t copied_old(const Segment& g, bool merge) { return merge ? 0 : g.n_old; }

// Output rows of one image that keeps `kept` candidates (new_pkg: 1 when a package row is pooled).
SPVIT_HOST_DEVICE int64_t out_rows(const Segment& g, int64_t kept, int64_t new_pkg, bool merge) {
  return g.n_pre + kept + copied_old(g, merge) + new_pkg;
}

// Rows of a top-k output, fixed by the shapes alone (so that eager, compiled and captured calls agree):
// B * (Q + k + package rows) with Q prefix rows, package rows = (merge ? 0 : P) + new_pkg per output image
// (as out_rows counts them) and k = min(num_keep, T - B * (Q + P)), the most candidates one image can
// have. An image with fewer than k candidates leaves zero rows with src_index -1 after the last image.
// -1 if that passes int32 (cu_seqlens_out could not index it).
SPVIT_HOST_DEVICE int64_t topk_output_rows(int64_t B, int64_t T, int64_t P, int64_t Q, int64_t new_pkg, bool merge,
                                           int64_t num_keep) {
  constexpr int64_t kMax = 2147483647;
  if (B < 1 || T < 0 || P < 0 || Q < 0 || new_pkg < 0 || num_keep < 0 || P > kMax || Q > kMax || new_pkg > 1 ||
      T > (int64_t(1) << 62) / (1 + P + Q))
    return -1;
  const int64_t most = T - B * (Q + P) > 0 ? T - B * (Q + P) : 0;
  const int64_t k = num_keep < most ? num_keep : most;
  const int64_t per_image = Q + k + (merge ? 0 : P) + new_pkg;  // < 2^63: no overflow
  if (per_image > kMax / B) return -1;
  return B * per_image;
}

}  // namespace spvit
