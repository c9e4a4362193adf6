// The rows of one image in a packed ragged batch, shared by the CPU and CUDA prune_pack kernels.
//
// Image b owns rows cu[b] .. cu[b+1]-1 laid out [cls, candidates, P old package rows]. The bounds are
// clamped to [0, T] so that bad cu_seqlens (only possible when they were not read on the host) keep every
// access in bounds instead of faulting.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPVIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPVIT_HOST_DEVICE inline
#endif

namespace spvit {

struct Segment {
  int64_t start;      // cls row (if n_cls)
  int64_t n_cls;      // 1, or 0 for an empty segment
  int64_t first;      // first candidate row
  int64_t n_cand;     // candidates
  int64_t pkg_start;  // first old package row
  int64_t n_old;      // old package rows (num_packages for valid input)
};

SPVIT_HOST_DEVICE int64_t clamp_row(int64_t v, int64_t T) { return v < 0 ? 0 : (v > T ? T : v); }

SPVIT_HOST_DEVICE Segment segment(const int32_t* cu, int64_t b, int64_t T, int64_t P) {
  const int64_t s = clamp_row(cu[b], T);
  int64_t e = clamp_row(cu[b + 1], T);
  if (e < s) e = s;
  const int64_t len = e - s;
  Segment g;
  g.start = s;
  g.n_cls = len > 0 ? 1 : 0;
  g.first = s + g.n_cls;
  g.n_cand = len - 1 - P > 0 ? len - 1 - P : 0;
  g.pkg_start = g.first + g.n_cand;
  g.n_old = e - g.pkg_start;
  return g;
}

// Rows of a top-k output, fixed by the shapes alone (so that eager, compiled and captured calls agree):
// B * (1 + k + P + new_pkg) with k = min(num_keep, T - B * (1 + P)), the most candidates one image can have.
// An image with fewer than k candidates leaves zero rows with src_index -1 after the last image.
// -1 if that passes int32 (cu_seqlens_out could not index it).
SPVIT_HOST_DEVICE int64_t topk_output_rows(int64_t B, int64_t T, int64_t P, int64_t new_pkg, int64_t num_keep) {
  constexpr int64_t kMax = 2147483647;
  if (B < 1 || T < 0 || P < 0 || num_keep < 0 || P > kMax || T > (int64_t(1) << 62) / (1 + P)) return -1;
  const int64_t most = T - B * (1 + P) > 0 ? T - B * (1 + P) : 0;
  const int64_t k = num_keep < most ? num_keep : most;
  const int64_t per_image = 1 + P + new_pkg + k;  // < 2^62: no overflow
  if (per_image > kMax / B) return -1;
  return B * per_image;
}

}  // namespace spvit
