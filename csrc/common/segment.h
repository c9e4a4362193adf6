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

}  // namespace spvit
