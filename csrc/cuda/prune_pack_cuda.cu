// prune_pack on CUDA: keep decision, gather of prefix / kept / old package rows, pooling of the dropped rows
// into a new package row, src_index and cu_seqlens_out (design sections 2-4).
//
// Layout (design section 3): x (T, C) rows of all images concatenated, image b owns rows
// cu_seqlens[b] .. cu_seqlens[b+1]-1 = [Q prefix rows, n_b candidates, P old package rows]. Output image b:
// [Q prefix rows, kept candidates in order, P old package rows, new package row (package != none)]. With
// package_merge "add" and P = 1 ("merge") the old package row is not copied: the pooled row plus the old
// one, added in fp32 and rounded once, takes its place (src_index -1).
//
// Kernels (all on the current stream):
//   count_kept_kernel  (threshold mode only) grid B: kept candidates per image.
//   offsets_kernel     one block: per-image output counts -> exclusive prefix sum (int64 offsets) and the
//                      int32 cu_seqlens_out. Threshold mode reads the total back (the op's one sync).
//   prune_pack_kernel  grid B, one block per image: decision, gather, pooling. In top-k mode with
//                      B <= kFusedOffsetsMaxImages each block sums the counts of the images before it
//                      itself (the counts only depend on cu_seqlens), so the op is one launch.
//
// Top-k selection is a block-wide radix select over order-preserving 32-bit keys of the scores (held in
// shared memory for up to kMaxCached candidates, re-read from global memory -- correct, slower -- above
// that), then an ordered scan over the keys equal to the cut key resolves ties to the lower index. The
// result is a per-candidate predicate, so every later phase streams over candidates in chunks and no
// per-image list has to fit in shared memory.
//
// Robustness: every segment read from cu_seqlens is clamped to [0, T] and every write is bounded by
// total_rows, so unchecked bad cu_seqlens give wrong numbers but never an out-of-bounds access. Row and
// element offsets are int64 (T * C can pass 2^31).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include "device_compat.h"

#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/segment.h"
#include "../spvit.h"

namespace spvit {
namespace {

constexpr int kThreads = 512;               // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
static_assert(kThreads >= 256 && kThreads % 32 == 0 && kWarps <= 32, "radix select needs 256 threads");
constexpr int kMaxCached = 4096;            // candidates per image whose keys live in shared memory
constexpr int64_t kFusedOffsetsMaxImages = 4096;  // top-k: blocks compute their own offset up to this B
// Independent loads in flight per thread: 4 of one element on the scalar path; of 16 bytes, 2 for 16-bit rows and
// 1 for float32 ones (whose 4-float packs take 4 accumulators each). More passed the 64-register cap of two
// 512-thread blocks per SM and spilled to local memory. Each keeps >= 16 KiB of loads in flight per SM.
template <int EPV>
constexpr int kUnrollFor = EPV == 1 ? 4 : (EPV == 4 ? 1 : 2);
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Order-preserving key of a score: larger score -> larger key; -0 == +0; NaN -> 0, below -inf.
__host__ __device__ __forceinline__ uint32_t order_key(uint32_t u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN ranks lowest
  if ((u & 0x7fffffffu) == 0u) u = 0u;             // signed zeros compare equal
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint32_t score_key(const float* score, int64_t row) {
  return order_key(__float_as_uint(__ldg(score + row)));
}

__device__ __forceinline__ int clamp_cu(int64_t v, int64_t total_rows) {
  return static_cast<int>(min(v, min(total_rows, kInt32Max)));
}

// --- block primitives (every thread of the block must call them) ---------------------------------------

// Exclusive prefix sum of v over the threads in thread order; *total gets the sum over the block.
// scratch: kWarps + 1 shared slots.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* total, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const T w = lane < kWarps ? scratch[lane] : T(0);
    T wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += y;
    }
    if (lane < kWarps) scratch[lane] = wi - w;  // exclusive offset of each warp
    if (lane == kWarps - 1) scratch[kWarps] = wi;
  }
  __syncthreads();
  const T excl = scratch[warp] + x - v;
  *total = scratch[kWarps];
  __syncthreads();  // scratch may be reused right away
  return excl;
}

// Sum over the block, in a fixed order (deterministic for floats). scratch: kWarps shared slots.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = T(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// EPV elements moved as one unit (16 bytes on the vector path, one element on the scalar path).
template <typename scalar_t, int EPV>
struct alignas(sizeof(scalar_t) * EPV) Pack {
  scalar_t v[EPV];
};

// --- kernels -------------------------------------------------------------------------------------------

// Threshold mode: kept[b] = number of candidates of image b whose key is above thr_key.
__global__ void __launch_bounds__(kThreads) count_kept_kernel(const int* __restrict__ cu,
                                                              const float* __restrict__ score, int64_t T,
                                                              int64_t P, int64_t Q, uint32_t thr_key,
                                                              int64_t* __restrict__ kept) {
  __shared__ int64_t scratch[kWarps];
  const Segment g = segment(cu, blockIdx.x, T, P, Q);
  int64_t c = 0;
  for (int64_t i = threadIdx.x; i < g.n_cand; i += kThreads) c += score_key(score, g.first + i) > thr_key;
  c = block_sum(c, scratch);
  if (threadIdx.x == 0) kept[blockIdx.x] = c;
}

// One block: offsets[b] = first output row of image b (offsets[B] = total), cu_out = offsets clamped to
// total_rows (-1: not clamped). kept == nullptr: top-k, kept = min(num_keep, n_b).
__global__ void __launch_bounds__(kThreads) offsets_kernel(const int* __restrict__ cu,
                                                           const int64_t* __restrict__ kept, int64_t B,
                                                           int64_t T, int64_t P, int64_t Q, int64_t num_keep,
                                                           int new_pkg, int merge, int64_t total_rows,
                                                           int64_t* __restrict__ offsets,
                                                           int* __restrict__ cu_out) {
  __shared__ int64_t scratch[kWarps + 1];
  const int64_t limit = total_rows >= 0 ? total_rows : kInt32Max;
  int64_t carry = 0;
  for (int64_t b0 = 0; b0 < B; b0 += kThreads) {
    const int64_t b = b0 + threadIdx.x;
    int64_t count = 0;
    if (b < B) {
      const Segment g = segment(cu, b, T, P, Q);
      count = out_rows(g, kept ? kept[b] : min(num_keep, g.n_cand), new_pkg, merge);
    }
    int64_t chunk_total;
    const int64_t excl = block_exclusive_scan(count, &chunk_total, scratch);
    if (b < B) {
      offsets[b] = carry + excl;
      cu_out[b] = clamp_cu(carry + excl, limit);
    }
    carry += chunk_total;
  }
  if (threadIdx.x == 0) {
    offsets[B] = carry;
    cu_out[B] = clamp_cu(carry, limit);
  }
}

struct Params {
  const void* x;       // (T, C) rows at stride ld
  void* out;           // (total_rows, C) contiguous
  int64_t ld;          // x.stride(0) in elements
  int64_t C;
  const int* cu;       // (B+1,)
  const float* score;  // (T,)
  const float* prob;   // (T,)
  int64_t T, B, P;
  int64_t Q;           // prefix rows per image
  int merge;           // 1: package_merge "add" with an old package row to add to
  int topk;            // 1: top-k, 0: threshold
  uint32_t thr_key;    // threshold mode: keep iff key > thr_key
  int64_t num_keep;    // top-k mode
  int package;         // 0 none, 1 sum, 2 mean
  int64_t total_rows;  // rows of out / src_index: no write at or past it
  const int64_t* offsets;  // (B+1,) from offsets_kernel, or nullptr: top-k, computed in the kernel
  int* cu_out;             // written here only when offsets == nullptr
  int64_t* src_index;      // (total_rows,)
};

// One block per image. EPV elements per Pack (16 bytes, or 1 on the scalar path).
template <typename scalar_t, int EPV>
__global__ void __launch_bounds__(kThreads, 2) prune_pack_kernel(const Params p) {
  using PackT = Pack<scalar_t, EPV>;
  constexpr int kUnroll = kUnrollFor<EPV>;
  __shared__ uint32_t keys[kMaxCached];       // candidate keys (n <= kMaxCached)
  __shared__ float red[kThreads * EPV];       // pooling partial sums, one slot per thread
  __shared__ int chunk_rows[kThreads];        // kept candidates of the current chunk
  __shared__ int64_t scan64[kWarps + 1];
  __shared__ float sum32[kWarps];
  __shared__ uint32_t hist[256];
  __shared__ int64_t sel[3];

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int new_pkg = p.package != 0;
  // The image's segment is the same for every thread: held in shared memory, not in registers. Under the
  // 64-register cap of two 512-thread blocks per SM its 64-bit fields were spilled to local memory (a 16-byte
  // stack frame, LDL / STL) at every use.
  __shared__ Segment g_shared;
  if (tid == 0) g_shared = segment(p.cu, b, p.T, p.P, p.Q);
  __syncthreads();
  const Segment& g = g_shared;
  const int64_t n = g.n_cand;
  const int64_t total_rows = p.total_rows;

  // ---- where this image's output starts
  int64_t out0;
  if (p.offsets != nullptr) {
    out0 = p.offsets[b];
  } else {
    int64_t part = 0;  // top-k: counts depend on cu_seqlens only
    for (int64_t j = tid; j < b; j += kThreads) {
      const Segment h = segment(p.cu, j, p.T, p.P, p.Q);
      part += out_rows(h, min(p.num_keep, h.n_cand), new_pkg, p.merge);
    }
    out0 = block_sum(part, scan64);
    if (tid == 0) {
      if (b == 0) p.cu_out[0] = 0;
      p.cu_out[b + 1] = clamp_cu(out0 + out_rows(g, min(p.num_keep, n), new_pkg, p.merge), total_rows);
    }
  }

  // ---- keys of the candidates
  const bool cached = n <= kMaxCached;
  if (cached) {
    for (int64_t i = tid; i < n; i += kThreads) keys[i] = score_key(p.score, g.first + i);
    __syncthreads();
  }
  auto key_of = [&](int64_t i) -> uint32_t { return cached ? keys[i] : score_key(p.score, g.first + i); };

  // ---- decision: keep(i) <=> key > cut_key, or key == cut_key and i <= cut_idx
  uint32_t cut_key = p.thr_key;
  int64_t cut_idx = -1;
  if (p.topk) {
    const int64_t k = min(p.num_keep, n);
    if (k == n) {  // all kept (also n == 0)
      cut_key = 0u;
      cut_idx = n;
    } else if (k == 0) {
      cut_key = 0xffffffffu;  // no score maps to this key
      cut_idx = -1;
    } else {
      // Radix select, 8 bits a pass from the top: the k-th largest key, and how many candidates equal
      // to it are kept (rank) out of how many there are (eq).
      uint32_t prefix = 0u, mask = 0u;
      int64_t rank = k, eq = 0;
      for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = tid; j < 256; j += kThreads) hist[j] = 0u;
        __syncthreads();
        for (int64_t i = tid; i < n; i += kThreads) {
          const uint32_t u = key_of(i);
          if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        // Thread t holds digit 255 - t: the exclusive scan counts the candidates with a larger digit.
        const int64_t c = tid < 256 ? static_cast<int64_t>(hist[255 - tid]) : 0;
        int64_t all;
        const int64_t above = block_exclusive_scan(c, &all, scan64);
        if (tid < 256 && above < rank && rank <= above + c) {  // exactly one thread
          sel[0] = 255 - tid;
          sel[1] = rank - above;
          sel[2] = c;
        }
        __syncthreads();
        prefix |= static_cast<uint32_t>(sel[0]) << shift;
        mask |= 0xffu << shift;
        rank = sel[1];
        eq = sel[2];
        __syncthreads();  // sel and hist are rewritten by the next pass
      }
      cut_key = prefix;
      if (rank == eq) {
        cut_idx = n;  // every candidate tied at the cut is kept
      } else {
        // Ties go to the lower index: the rank-th candidate (in index order) whose key is cut_key.
        if (tid == 0) sel[0] = -1;
        int64_t seen = 0;
        for (int64_t c0 = 0; c0 < n; c0 += kThreads) {
          const int64_t i = c0 + tid;
          const int64_t f = (i < n && key_of(i) == cut_key) ? 1 : 0;
          int64_t tot;
          const int64_t ex = block_exclusive_scan(f, &tot, scan64);
          if (f && seen + ex + 1 == rank) sel[0] = i;
          seen += tot;
          if (seen >= rank) break;  // uniform: seen is the same in every thread
        }
        __syncthreads();
        cut_idx = sel[0];
        __syncthreads();
      }
    }
  }
  auto keep = [&](int64_t i) -> bool {
    const uint32_t u = key_of(i);
    return u > cut_key || (u == cut_key && i <= cut_idx);
  };

  // Rows as Packs. On the vector path the host checked that pointers, C and ld are 16-byte multiples.
  const PackT* __restrict__ xin = static_cast<const PackT*>(p.x);
  PackT* __restrict__ xout = static_cast<PackT*>(p.out);
  const int64_t vpr = p.C / EPV;     // Packs per row
  const int64_t ldp = p.ld / EPV;    // Packs between input rows
  // Thread layout for row work: W threads across a row's Packs, R rows side by side.
  const int W = static_cast<int>(min(vpr, static_cast<int64_t>(kThreads)));
  const int R = W > 0 ? kThreads / W : 0;
  const int rr = W > 0 ? tid / W : 0;
  const int cc = W > 0 ? tid - rr * W : 0;
  const bool row_active = W > 0 && rr < R;

  // Copy rows r in [0, nrows): input row src(r) -> output row dst(r) (skipped at or past total_rows).
  auto copy_rows = [&](int64_t nrows, auto src, auto dst) {
    if (!row_active) return;
    for (int64_t r0 = rr; r0 < nrows; r0 += static_cast<int64_t>(R) * kUnroll) {
      for (int64_t v = cc; v < vpr; v += W) {
        PackT tmp[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + static_cast<int64_t>(u) * R;
          if (r < nrows) tmp[u] = xin[src(r) * ldp + v];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + static_cast<int64_t>(u) * R;
          if (r < nrows) {
            const int64_t d = dst(r);
            if (d < total_rows) xout[d * vpr + v] = tmp[u];
          }
        }
      }
    }
  };

  // ---- kept candidates, chunk by chunk of kThreads, in order
  const int64_t kept0 = out0 + g.n_pre;  // output row of the first kept candidate
  int64_t kept = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kThreads) {
    const int64_t i = c0 + tid;
    const int64_t f = (i < n && keep(i)) ? 1 : 0;
    int64_t tot;
    const int64_t ex = block_exclusive_scan(f, &tot, scan64);
    if (f) {
      chunk_rows[ex] = static_cast<int>(i - c0);
      const int64_t d = kept0 + kept + ex;
      if (d < total_rows) p.src_index[d] = g.first + i;
    }
    __syncthreads();
    const int64_t base_src = g.first + c0, base_dst = kept0 + kept;
    copy_rows(
        tot, [&](int64_t r) { return base_src + chunk_rows[r]; }, [&](int64_t r) { return base_dst + r; });
    kept += tot;
    __syncthreads();  // chunk_rows is rewritten by the next chunk
  }

  // ---- prefix rows and old package rows
  const int64_t pkg_out = kept0 + kept;  // output row of the first old package row
  auto fixed_src = [&](int64_t r) { return r < g.n_pre ? g.start + r : g.pkg_start + (r - g.n_pre); };
  auto fixed_dst = [&](int64_t r) { return r < g.n_pre ? out0 + r : pkg_out + (r - g.n_pre); };
  const int64_t n_fixed = g.n_pre + copied_old(g, p.merge);
  for (int64_t r = tid; r < n_fixed; r += kThreads) {
    const int64_t d = fixed_dst(r);
    if (d < total_rows) p.src_index[d] = fixed_src(r);
  }
  copy_rows(n_fixed, fixed_src, fixed_dst);

  // ---- new package row: fp32 keep_prob-weighted pooling of the dropped candidates (merge: plus the old
  // package row, in fp32)
  // Block-uniform and live across the pooling loop: read from shared memory (in a register it was spilled).
  __shared__ int64_t new_row_shared;
  if (tid == 0) new_row_shared = pkg_out + copied_old(g, p.merge);
  __syncthreads();
  const int64_t& new_row = new_row_shared;
  const bool add_old = p.merge && g.n_old > 0;
  if (new_pkg) {
    float wpart = 0.f;
    for (int64_t i = tid; i < n; i += kThreads)
      if (!keep(i)) wpart += __ldg(p.prob + g.first + i);
    const float wsum = block_sum(wpart, sum32);
    const int64_t dropped = n - kept;
    const bool mean = p.package == 2;
    const bool zero = mean && (dropped == 0 || wsum == 0.f);
    for (int64_t v0 = 0; v0 < vpr; v0 += W) {
      const int64_t v = v0 + cc;
      float acc[EPV];
#pragma unroll
      for (int e = 0; e < EPV; ++e) acc[e] = 0.f;
      if (row_active && v < vpr && !zero) {
        // This thread's rows: candidates rr, rr + R, ...; kUnroll loads in flight.
        for (int64_t i0 = rr; i0 < n; i0 += static_cast<int64_t>(R) * kUnroll) {
          PackT tmp[kUnroll];
          float w[kUnroll];
          bool dropped_u[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t i = i0 + static_cast<int64_t>(u) * R;
            dropped_u[u] = i < n && !keep(i);
            w[u] = 0.f;
            if (dropped_u[u]) {
              w[u] = __ldg(p.prob + g.first + i);
              tmp[u] = xin[(g.first + i) * ldp + v];
            }
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (dropped_u[u]) {
#pragma unroll
              for (int e = 0; e < EPV; ++e) acc[e] = fmaf(w[u], static_cast<float>(tmp[u].v[e]), acc[e]);
            }
          }
        }
      }
      if (row_active) {
#pragma unroll
        for (int e = 0; e < EPV; ++e) red[(rr * W + cc) * EPV + e] = acc[e];
      }
      __syncthreads();
      if (tid < W && v0 + tid < vpr) {
        float s[EPV];
#pragma unroll
        for (int e = 0; e < EPV; ++e) s[e] = 0.f;
        for (int q = 0; q < R; ++q) {
#pragma unroll
          for (int e = 0; e < EPV; ++e) s[e] += red[(q * W + tid) * EPV + e];
        }
        float pooled[EPV];
#pragma unroll
        for (int e = 0; e < EPV; ++e) pooled[e] = zero ? 0.f : (mean ? s[e] / wsum : s[e]);
        if (add_old) {
          const PackT old = xin[g.pkg_start * ldp + v0 + tid];
#pragma unroll
          for (int e = 0; e < EPV; ++e) pooled[e] += static_cast<float>(old.v[e]);
        }
        PackT o;
#pragma unroll
        for (int e = 0; e < EPV; ++e) o.v[e] = static_cast<scalar_t>(pooled[e]);
        if (new_row < total_rows) xout[new_row * vpr + v0 + tid] = o;
      }
      __syncthreads();
    }
    if (tid == 0 && new_row < total_rows) p.src_index[new_row] = -1;
  }

  // ---- rows past the last image but inside total_rows (top-k's size is fixed by the shapes, see
  // topk_output_rows: an image with fewer candidates leaves such rows): zeros, src_index -1.
  if (b == p.B - 1) {
    const int64_t produced = p.offsets != nullptr ? p.offsets[p.B] : new_row + new_pkg;
    if (produced < total_rows) {
      for (int64_t r = produced + tid; r < total_rows; r += kThreads) p.src_index[r] = -1;
      if (row_active) {
        PackT zero_pack;
#pragma unroll
        for (int e = 0; e < EPV; ++e) zero_pack.v[e] = static_cast<scalar_t>(0.f);
        for (int64_t r = produced + rr; r < total_rows; r += R)
          for (int64_t v = cc; v < vpr; v += W) xout[r * vpr + v] = zero_pack;
      }
    }
  }
}

template <typename scalar_t>
void launch_main(const Params& prm, bool vec16, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(prm.B));
  if (vec16) {
    SPVIT_LAUNCH(grid, kThreads, 0, stream, prune_pack_kernel<scalar_t, 16 / sizeof(scalar_t)>)(prm);
  } else {
    SPVIT_LAUNCH(grid, kThreads, 0, stream, prune_pack_kernel<scalar_t, 1>)(prm);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_pack_cuda(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& keep_score, const at::Tensor& keep_prob,
    int64_t num_packages, int64_t mode, double threshold, int64_t num_keep, int64_t package, int64_t total_rows,
    int64_t package_merge, int64_t num_prefix) {
  // The Python layer validated everything; these checks keep a direct call in bounds.
  TORCH_CHECK(on_kernel_device(x) && x.dim() == 2, "x must be a 2-D CUDA tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have contiguous rows (x.stride(1) == 1)");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, "x must have a non-negative row stride");
  TORCH_CHECK(cu_seqlens.device() == x.device() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 2,
              "cu_seqlens must be int32 of shape (B+1,), B >= 1, on x's device");
  const int64_t T = x.size(0), C = x.size(1), B = cu_seqlens.size(0) - 1;
  TORCH_CHECK(B < (int64_t(1) << 31), "cu_seqlens: too many images (", B, ")");
  for (const auto* t : {&keep_score, &keep_prob}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == T,
                t == &keep_score ? "keep_score" : "keep_prob", " must be float32 of shape (T,) = (", T,
                ",) on x's device");
  }
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

  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor score = keep_score.contiguous();
  const at::Tensor prob = keep_prob.contiguous();
  const int new_pkg = package != 0 ? 1 : 0;
  const int merge = (package_merge == 1 && num_packages > 0) ? 1 : 0;  // the pooled row replaces the old one
  const bool topk = mode == 1;
  if (topk && total_rows < 0) {  // top-k's size is fixed by the shapes: no synchronisation
    total_rows = topk_output_rows(B, T, num_packages, num_prefix, new_pkg, merge, num_keep);
    TORCH_CHECK(total_rows >= 0, "num_keep = ", num_keep, " (num_packages = ", num_packages, ", B = ", B,
                "): the top-k output would have more rows than int32 cu_seqlens can index");
  }
  const float thr = static_cast<float>(threshold);  // compared in float32, like torch's `scores > threshold`
  uint32_t thr_bits;
  std::memcpy(&thr_bits, &thr, sizeof(thr));
  // A NaN threshold keeps nothing (key > 0xffffffff never holds).
  const uint32_t thr_key = (thr != thr) ? 0xffffffffu : order_key(thr_bits);

  at::Tensor cu_out = at::empty({B + 1}, cu.options());
  at::Tensor offsets;  // undefined: top-k computes offsets inside the main kernel
  const bool fused = topk && total_rows >= 0 && B <= kFusedOffsetsMaxImages;
  if (!fused) {
    at::Tensor kept;
    if (!topk) {
      kept = at::empty({B}, cu.options().dtype(at::kLong));
      SPVIT_LAUNCH(static_cast<unsigned>(B), kThreads, 0, stream, count_kept_kernel)(
          cu.data_ptr<int>(), score.data_ptr<float>(), T, num_packages, num_prefix, thr_key,
          kept.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    offsets = at::empty({B + 1}, cu.options().dtype(at::kLong));
    SPVIT_LAUNCH(1, kThreads, 0, stream, offsets_kernel)(
        cu.data_ptr<int>(), topk ? nullptr : kept.data_ptr<int64_t>(), B, T, num_packages, num_prefix, num_keep,
        new_pkg, merge, total_rows, offsets.data_ptr<int64_t>(), cu_out.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (total_rows < 0) {
      // Threshold mode: the op's one synchronisation, to size the output.
      total_rows = offsets[B].item<int64_t>();
      TORCH_CHECK(total_rows <= kInt32Max, "cu_seqlens: the output would have ", total_rows,
                  " rows, more than int32 cu_seqlens can index");
    }
  }

  at::Tensor x_out = at::empty({total_rows, C}, x.options());
  at::Tensor src_index = at::empty({total_rows}, cu.options().dtype(at::kLong));

  Params prm;
  prm.x = x.data_ptr();
  prm.out = x_out.data_ptr();
  prm.ld = T > 1 ? x.stride(0) : C;
  prm.C = C;
  prm.cu = cu.data_ptr<int>();
  prm.score = score.data_ptr<float>();
  prm.prob = prob.data_ptr<float>();
  prm.T = T;
  prm.B = B;
  prm.P = num_packages;
  prm.Q = num_prefix;
  prm.merge = merge;
  prm.topk = topk ? 1 : 0;
  prm.thr_key = thr_key;
  prm.num_keep = topk ? num_keep : 0;
  prm.package = static_cast<int>(package);
  prm.total_rows = total_rows;
  prm.offsets = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  prm.cu_out = cu_out.data_ptr<int>();
  prm.src_index = src_index.data_ptr<int64_t>();

  const int64_t es = static_cast<int64_t>(x.element_size());
  const bool vec16 = aligned16(prm.x) && aligned16(prm.out) && (C * es) % 16 == 0 && (prm.ld * es) % 16 == 0;
  AT_DISPATCH_SWITCH(x.scalar_type(), "prune_pack_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch_main<scalar_t>(prm, vec16, stream); })
                         AT_DISPATCH_CASE(at::kHalf, [&] { launch_main<scalar_t>(prm, vec16, stream); })
                             AT_DISPATCH_CASE(at::kBFloat16, [&] { launch_main<scalar_t>(prm, vec16, stream); }));
  return {x_out, cu_out, src_index};
}

}  // namespace spvit
