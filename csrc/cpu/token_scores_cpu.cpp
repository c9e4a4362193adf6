// token_scores on CPU: the fused SPViT selector (design section 2), two passes per image.
//
// Pass 1 (per image and head, over every row of S = all rows but the num_prefix prefix rows): LayerNorm of
//   the head's d channels, u = GELU(W_in xn + b_in); the global half u[d/2:] is summed in row order and its
//   mean g enters the first score layer as a per-(image, head) bias:
//   W1 [local, g] + b1 = W1[:, :d/2] local + (W1[:, d/2:] g + b1).
//   The spatial rows' local half u[:d/2] and LayerNorm mean (the SE branch's head mean) are stashed
//   (n_spatial x C/2 floats per image, in cache when pass 2 runs), so the tokens are read once.
// Pass 2 (per block of spatial rows, all heads): two GELU layers from the stash, the keep-minus-drop logit
//   difference l0 - l1 (= log_softmax[0] - log_softmax[1]), the SE head weights, the weighted combination.
//
// Everything is computed in float32. Weights are converted once and transposed to (in, out), so the matmul
// loops run over contiguous outputs and vectorise without reassociating any sum; reductions over a row are
// written as 8 explicit partial sums. No loop relies on -ffast-math, so the order of every floating-point
// operation is fixed by the source and every output value is computed by the same serial code: results are
// bitwise the same for any thread count or work split (tested). The hot loops are compiled twice, for the
// x86-64 baseline the extension is built for and with target("avx2") (picked at run time where the CPU has
// it; no FMA, so it performs the same operations in the same order, only wider).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../spvit.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SPVIT_TS_AVX2 1
#define SPVIT_TS_INLINE inline __attribute__((always_inline))
#else
#define SPVIT_TS_AVX2 0
#define SPVIT_TS_INLINE inline
#endif

namespace spvit {
namespace {

constexpr int64_t kRows = 16;  // rows per block: the weight tiles stay in L1 across a block
constexpr int kLanes = 8;      // partial sums of a row reduction (one AVX2 register, two SSE registers)

// ---- elementwise math the compiler can vectorise (no libm call, no float select) ------------------------

// exp(x) for x <= 0: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 Taylor polynomial (relative error
// ~2e-7). GCC does not if-convert float selects under the default -ftrapping-math, so n is rounded with the
// 1.5 * 2^23 trick and clamped as an integer (below 2^-126 the result only needs to be tiny, not exact).
SPVIT_TS_INLINE float exp_nonpositive(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // Cody-Waite: ln2 = 0.693359375 - 2.12e-4
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  ni = ni < -126 ? -126 : ni;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Exact-form GELU 0.5 x (1 + erf(x / sqrt 2)), erf(a) = 1 - 1 / (1 + a1 a + ... + a6 a^6)^16 for a >= 0
// (Abramowitz & Stegun 7.1.28, |erf error| <= 3e-7; |GELU error| < 1e-6 on [-12, 12] against a float64 erf).
// No exp and one division: about twice as fast as an exp-based erf, and the polynomial only grows with a,
// so large inputs give q = inf, 1 / q = 0 and erf = 1 (no NaN).
SPVIT_TS_INLINE float gelu(float x) {
  const float z = x * 0.70710678118654752f;
  const float a = std::fabs(z);
  float q = 0.0000430638f;
  q = q * a + 0.0002765672f;
  q = q * a + 0.0001520143f;
  q = q * a + 0.0092705272f;
  q = q * a + 0.0422820123f;
  q = q * a + 0.0705230784f;
  q = q * a + 1.0f;
  q = q * q;
  q = q * q;
  q = q * q;
  q = q * q;  // q^16
  const float e = 1.0f - 1.0f / q;  // erf(|z|)
  return 0.5f * x * (1.0f + std::copysign(e, z));
}

// 1 / (1 + exp(-x)) without a select: with e = exp(-|x|) <= 1, sigmoid(|x|) = 1 / (1 + e) and
// sigmoid(x) = 0.5 + sign(x) (sigmoid(|x|) - 0.5). Absolute error ~1e-7.
SPVIT_TS_INLINE float sigmoid(float x) {
  const float s = 1.0f / (1.0f + exp_nonpositive(-std::fabs(x)));
  return 0.5f + std::copysign(s - 0.5f, x);
}

SPVIT_TS_INLINE void gelu_inplace(float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = gelu(v[i]);
}

// sum_k a[k] and sum_k a[k] * b[k] as kLanes interleaved partial sums, added up in a fixed order.
SPVIT_TS_INLINE float lanes_total(const float* part) {
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

SPVIT_TS_INLINE float row_sum(const float* __restrict a, int64_t n) {
  float part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[k + j];
  for (; k < n; ++k) part[0] += a[k];
  return lanes_total(part);
}

SPVIT_TS_INLINE float row_dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[k + j] * b[k + j];
  for (; k < n; ++k) part[0] += a[k] * b[k];
  return lanes_total(part);
}

// Eight floats as one value: GCC / Clang vector extensions, one AVX2 register in the avx2 build and two SSE
// registers in the baseline build, with the same multiplies and adds in both (no FMA is ever formed: the
// baseline and avx2 targets have none). Loads and stores go through memcpy: no alignment is assumed.
typedef float v8f __attribute__((vector_size(32)));

SPVIT_TS_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

SPVIT_TS_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// out[r, n0 : n0 + 8 V] for R rows: bias + a[r, 0] wt[0, :] + a[r, 1] wt[1, :] + ... in this order. The R x V
// accumulators stay in registers across the whole k loop and each loaded row of wt serves R rows of a: per k
// the loop issues V loads of wt, R broadcasts and R V multiplies and adds, so the floating-point pipes, not
// the loads and stores of out (what bound the earlier row-at-a-time loop), set its rate.
template <int R, int V>
SPVIT_TS_INLINE void gemm_tile(const float* __restrict a, int64_t lda, const float* __restrict wt,
                               const float* __restrict bias, int64_t K, int64_t N, int64_t n0,
                               float* __restrict out) {
  v8f acc[R][V];
  for (int v = 0; v < V; ++v) {
    const v8f b = load8(bias + n0 + 8 * v);
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    v8f w[V];
    for (int v = 0; v < V; ++v) w[v] = load8(wt + k * N + n0 + 8 * v);
    for (int r = 0; r < R; ++r) {
      const float av = a[r * lda + k];
      for (int v = 0; v < V; ++v) acc[r][v] += av * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store8(out + r * N + n0 + 8 * v, acc[r][v]);
}

// The same sums for R rows and the columns [n0, N) that a vector does not fill (N % 8 of them).
template <int R>
SPVIT_TS_INLINE void gemm_tail(const float* __restrict a, int64_t lda, const float* __restrict wt,
                               const float* __restrict bias, int64_t K, int64_t N, int64_t n0,
                               float* __restrict out) {
  for (int r = 0; r < R; ++r)
    for (int64_t n = n0; n < N; ++n) {
      float s = bias[n];
      for (int64_t k = 0; k < K; ++k) s += a[r * lda + k] * wt[k * N + n];
      out[r * N + n] = s;
    }
}

template <int R>
SPVIT_TS_INLINE void gemm_rows(const float* __restrict a, int64_t lda, const float* __restrict wt,
                               const float* __restrict bias, int64_t K, int64_t N, float* __restrict out) {
  int64_t n0 = 0;
  for (; n0 + 16 <= N; n0 += 16) gemm_tile<R, 2>(a, lda, wt, bias, K, N, n0, out);
  if (n0 + 8 <= N) {
    gemm_tile<R, 1>(a, lda, wt, bias, K, N, n0, out);
    n0 += 8;
  }
  if (n0 < N) gemm_tail<R>(a, lda, wt, bias, K, N, n0, out);
}

// out[r, :] = bias + sum_k a[r, k] * wt[k, :] for r < rows; a (rows, K) row stride lda, wt (K, N), out (rows, N).
// Rows go four at a time (then one at a time); every output is summed in the same order (bias, then k = 0, 1,
// ...) whichever group its row falls in, so a row's result does not depend on the rows beside it.
SPVIT_TS_INLINE void gemm_bias(const float* __restrict a, int64_t lda, int64_t rows, const float* __restrict wt,
                               const float* __restrict bias, int64_t K, int64_t N, float* __restrict out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) gemm_rows<4>(a + r * lda, lda, wt, bias, K, N, out + r * N);
  for (; r < rows; ++r) gemm_rows<1>(a + r * lda, lda, wt, bias, K, N, out + r * N);
}

// LayerNorm (eps 1e-5, affine) of `rows` rows of d values (row stride ld) into xn (rows, d); mean[r] out.
SPVIT_TS_INLINE void layer_norm(const float* __restrict x, int64_t ld, int64_t rows, int64_t d,
                                const float* __restrict g, const float* __restrict b, float* __restrict xn,
                                float* __restrict mean) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict xr = x + r * ld;
    float* __restrict o = xn + r * d;
    const float mu = row_sum(xr, d) * inv_d;
    for (int64_t k = 0; k < d; ++k) o[k] = xr[k] - mu;
    float rstd = 1.0f / std::sqrt(row_dot(o, o, d) * inv_d + 1e-5f);
    if (rstd == 0.0f) {
      // The squares overflowed (|x - mean| beyond ~1e19): LayerNorm is scale invariant, so take the variance of
      // the row scaled by its largest |x - mean| (eps is then far below the variance). NaN / inf rows stay NaN.
      float amax = 0.0f;
      for (int64_t k = 0; k < d; ++k) amax = std::max(amax, std::fabs(o[k]));
      if (std::isfinite(amax)) {
        const float inv = 1.0f / amax;
        float ss = 0.0f;
        for (int64_t k = 0; k < d; ++k) ss += (o[k] * inv) * (o[k] * inv);
        rstd = inv / std::sqrt(ss * inv_d);
      }
    }
    for (int64_t k = 0; k < d; ++k) o[k] = o[k] * rstd * g[k] + b[k];
    mean[r] = mu;
  }
}

// dst[:n] = src[:n]. Not std::memcpy: a call per row of a few dozen floats cost ~8% of the kernel (GCC also
// turns a plain copy loop into that call).
SPVIT_TS_INLINE void copy_floats(const float* __restrict src, int64_t n, float* __restrict dst) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) store8(dst + k, load8(src + k));
  for (; k < n; ++k) dst[k] = src[k];
}

template <typename scalar_t>
SPVIT_TS_INLINE void load_rows(const scalar_t* __restrict src, int64_t ld_src, int64_t rows, int64_t n,
                               float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n; ++k) dst[r * n + k] = static_cast<float>(src[r * ld_src + k]);
}

// The selector's weights in float32 (raw pointers into tensors owned by token_scores_cpu).
struct Params {
  int64_t H, d, d2, d4, hh;
  const float *ln_w, *ln_b;
  const float *win_t, *b_in;             // (d, d) [k][n] = w_in[n][k], (d,)
  const float *w1_loc_t, *w1_glob, *b1;  // (d2, d2) [k][n] = w1[n][k], (d2, d2) [n][k] = w1[n][d2 + k], (d2,)
  const float *w2_t, *b2;                // (d2, d4) [k][q], (d4,)
  const float* w3d;                      // (d4,) = w3[0] - w3[1]
  float b3d;
  const float *se_w1, *se_b1, *se_w2, *se_b2;  // (hh, H), (hh,), (H, hh), (H,) as nn.Linear
};

// Pass 1 for head h of one image whose rows of S (all but the prefix rows) are [s0, s0 + m), the first n_sp spatial:
//   u = GELU(W_in LN(x) + b_in) for every row; bias1 (d2,) = W1[:, d2:] g + b1 with g the mean of u[d2:];
//   the spatial rows' local half u[:d2] and LayerNorm mean are stashed for pass 2 as
//   stash_u[(i * H + h) * d2 + n] and stash_mean[i * H + h] (i = spatial row index).
template <typename scalar_t>
SPVIT_TS_INLINE void global_pass_impl(const scalar_t* x, int64_t ldx, int64_t s0, int64_t m, int64_t n_sp,
                                      int64_t h, const Params& p, float* __restrict bias1,
                                      float* __restrict stash_u, float* __restrict stash_mean) {
  const int64_t H = p.H, d = p.d, d2 = p.d2;
  std::vector<float> xf(kRows * d), xn(kRows * d), u(kRows * d), mean(kRows), acc(d2, 0.0f);
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const int64_t rows = std::min(kRows, m - r0);
    const scalar_t* xr = x + (s0 + r0) * ldx + h * d;
    if constexpr (std::is_same<scalar_t, float>::value) {
      layer_norm(xr, ldx, rows, d, p.ln_w, p.ln_b, xn.data(), mean.data());  // float32 rows are read in place
    } else {
      load_rows(xr, ldx, rows, d, xf.data());
      layer_norm(xf.data(), d, rows, d, p.ln_w, p.ln_b, xn.data(), mean.data());
    }
    gemm_bias(xn.data(), d, rows, p.win_t, p.b_in, d, d, u.data());
    gelu_inplace(u.data(), rows * d);
    for (int64_t r = 0; r < rows; ++r)  // row order: a fixed summation order
      for (int64_t n = 0; n < d2; ++n) acc[n] += u[r * d + d2 + n];
    for (int64_t r = 0; r < std::min(rows, n_sp - r0); ++r) {
      copy_floats(u.data() + r * d, d2, stash_u + ((r0 + r) * H + h) * d2);
      stash_mean[(r0 + r) * H + h] = mean[r];
    }
  }
  const float inv_m = 1.0f / static_cast<float>(std::max<int64_t>(m, 1));
  for (int64_t n = 0; n < d2; ++n) acc[n] *= inv_m;
  for (int64_t n = 0; n < d2; ++n) bias1[n] = p.b1[n] + row_dot(p.w1_glob + n * d2, acc.data(), d2);
}

// Pass 2 for spatial rows [i_begin, i_end) of one image (indices into its stash; outputs keep_score[i] and
// keep_prob[i], pointers already offset to the image's first spatial row); bias1 (H, d2) from pass 1.
SPVIT_TS_INLINE void score_pass_impl(int64_t i_begin, int64_t i_end, const float* stash_u, const float* stash_mean,
                                     const float* bias1, const Params& p, float* keep_score, float* keep_prob) {
  const int64_t H = p.H, d2 = p.d2, d4 = p.d4, hh = p.hh;
  std::vector<float> h1(kRows * d2), h2(kRows * d4);
  // Per-head values of the block as (H, kRows) and the SE hidden units as (hh, kRows): the combination
  // below runs over rows in the inner loops, which vectorise.
  std::vector<float> diff(H * kRows), hbar(H * kRows), a(hh * kRows), w_sum(kRows), score(kRows), prob(kRows);
  for (int64_t r0 = i_begin; r0 < i_end; r0 += kRows) {
    const int64_t rows = std::min(kRows, i_end - r0);
    for (int64_t h = 0; h < H; ++h) {
      gemm_bias(stash_u + (r0 * H + h) * d2, H * d2, rows, p.w1_loc_t, bias1 + h * d2, d2, d2, h1.data());
      gelu_inplace(h1.data(), rows * d2);
      gemm_bias(h1.data(), d2, rows, p.w2_t, p.b2, d2, d4, h2.data());
      gelu_inplace(h2.data(), rows * d4);
      for (int64_t r = 0; r < rows; ++r) {
        diff[h * kRows + r] = p.b3d + row_dot(h2.data() + r * d4, p.w3d, d4);
        hbar[h * kRows + r] = stash_mean[(r0 + r) * H + h];
      }
    }
    // SE head weights w = sigmoid(se_w2 GELU(se_w1 h_bar + se_b1) + se_b2), then the weighted combination.
    for (int64_t j = 0; j < hh; ++j) {
      float* __restrict aj = a.data() + j * kRows;
      for (int64_t r = 0; r < kRows; ++r) aj[r] = p.se_b1[j];
      for (int64_t k = 0; k < H; ++k) {
        const float wk = p.se_w1[j * H + k];
        const float* __restrict hk = hbar.data() + k * kRows;
        for (int64_t r = 0; r < kRows; ++r) aj[r] += wk * hk[r];
      }
      gelu_inplace(aj, kRows);
    }
    std::fill(w_sum.begin(), w_sum.end(), 0.0f);
    std::fill(score.begin(), score.end(), 0.0f);
    std::fill(prob.begin(), prob.end(), 0.0f);
    for (int64_t k = 0; k < H; ++k) {
      float z[kRows];
      for (int64_t r = 0; r < kRows; ++r) z[r] = p.se_b2[k];
      for (int64_t j = 0; j < hh; ++j) {
        const float wkj = p.se_w2[k * hh + j];
        const float* __restrict aj = a.data() + j * kRows;
        for (int64_t r = 0; r < kRows; ++r) z[r] += wkj * aj[r];
      }
      const float* __restrict dk = diff.data() + k * kRows;
      for (int64_t r = 0; r < kRows; ++r) {
        const float wk = sigmoid(z[r]);
        w_sum[r] += wk;
        score[r] += wk * dk[r];
        prob[r] += wk * sigmoid(dk[r]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      keep_score[r0 + r] = score[r] / w_sum[r];
      keep_prob[r0 + r] = prob[r] / w_sum[r];
    }
  }
}

// Each pass exists twice: compiled for the baseline and for AVX2 (same source, same operation order).
template <typename scalar_t>
void global_pass_base(const scalar_t* x, int64_t ldx, int64_t s0, int64_t m, int64_t n_sp, int64_t h,
                      const Params& p, float* bias1, float* stash_u, float* stash_mean) {
  global_pass_impl(x, ldx, s0, m, n_sp, h, p, bias1, stash_u, stash_mean);
}
void score_pass_base(int64_t i_begin, int64_t i_end, const float* stash_u, const float* stash_mean,
                     const float* bias1, const Params& p, float* keep_score, float* keep_prob) {
  score_pass_impl(i_begin, i_end, stash_u, stash_mean, bias1, p, keep_score, keep_prob);
}
#if SPVIT_TS_AVX2
template <typename scalar_t>
__attribute__((target("avx2"))) void global_pass_avx2(const scalar_t* x, int64_t ldx, int64_t s0, int64_t m,
                                                       int64_t n_sp, int64_t h, const Params& p, float* bias1,
                                                       float* stash_u, float* stash_mean) {
  global_pass_impl(x, ldx, s0, m, n_sp, h, p, bias1, stash_u, stash_mean);
}
__attribute__((target("avx2"))) void score_pass_avx2(int64_t i_begin, int64_t i_end, const float* stash_u,
                                                      const float* stash_mean, const float* bias1,
                                                      const Params& p, float* keep_score, float* keep_prob) {
  score_pass_impl(i_begin, i_end, stash_u, stash_mean, bias1, p, keep_score, keep_prob);
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_weight(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_scores_cpu(
    const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t num_packages, int64_t num_heads,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& se_w1, const at::Tensor& se_b1,
    const at::Tensor& se_w2, const at::Tensor& se_b2, int64_t num_prefix) {
  // Re-checks that keep every access in bounds (the full validation is in Python).
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, "x must be float32, float16 or bfloat16");
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "x must have contiguous rows (x.stride(1) == 1)");
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.dim() == 1 && cu_seqlens.scalar_type() == at::kInt &&
                  cu_seqlens.size(0) >= 1,
              "cu_seqlens must be a 1-D int32 CPU tensor");
  TORCH_CHECK(num_heads >= 2, "num_heads must be >= 2");
  TORCH_CHECK(num_packages >= 0, "num_packages must be >= 0");
  TORCH_CHECK(num_prefix >= 0, "num_prefix must be >= 0");
  const int64_t T = x.size(0), C = x.size(1), H = num_heads;
  TORCH_CHECK(C % H == 0 && (C / H) % 4 == 0 && C > 0,
              "num_heads must divide C into head dims that are multiples of 4");
  const int64_t d = C / H, d2 = d / 2, d4 = d / 4, hh = H / 2;
  check_weight(ln_weight, "ln_weight", d);
  check_weight(ln_bias, "ln_bias", d);
  check_weight(w_in, "w_in", d * d);
  check_weight(b_in, "b_in", d);
  check_weight(w1, "w1", d2 * d);
  check_weight(b1, "b1", d2);
  check_weight(w2, "w2", d4 * d2);
  check_weight(b2, "b2", d4);
  check_weight(w3, "w3", 2 * d4);
  check_weight(b3, "b3", 2);
  check_weight(se_w1, "se_w1", hh * H);
  check_weight(se_b1, "se_b1", hh);
  check_weight(se_w2, "se_w2", H * hh);
  check_weight(se_b2, "se_b2", H);

  // Prefix and package rows keep +inf / 1; every other row of a (clamped) image is written below.
  at::Tensor keep_score = at::full({T}, std::numeric_limits<float>::infinity(), x.options().dtype(at::kFloat));
  at::Tensor keep_prob = at::ones({T}, x.options().dtype(at::kFloat));
  const int64_t B = cu_seqlens.size(0) - 1;
  if (T == 0 || B <= 0) return {keep_score, keep_prob};

  // Weights in float32 (converted only if they are not), the matmul weights transposed to (in, out) by plain
  // loops into one buffer: ATen ops here (a transpose, a copy, a subtraction each) cost ~10 us per call, a
  // few percent of a one-image DeiT-B call.
  const at::Tensor win = f32(w_in), bin = f32(b_in), w1f = f32(w1), w2f = f32(w2), w3f = f32(w3), b3f = f32(b3);
  const at::Tensor ln_w = f32(ln_weight), ln_b = f32(ln_bias), b1f = f32(b1), b2f = f32(b2);
  const at::Tensor sw1 = f32(se_w1), sb1 = f32(se_b1), sw2 = f32(se_w2), sb2 = f32(se_b2);
  std::vector<float> wbuf(d * d + 2 * d2 * d2 + d2 * d4 + d4);
  float* const win_t = wbuf.data();               // (d, d): [k][n] = w_in[n][k]
  float* const w1_loc_t = win_t + d * d;          // (d2, d2): [k][n] = w1[n][k]
  float* const w1_glob = w1_loc_t + d2 * d2;      // (d2, d2): [n][k] = w1[n][d2 + k]
  float* const w2_t = w1_glob + d2 * d2;          // (d2, d4): [k][q] = w2[q][k]
  float* const w3d = w2_t + d2 * d4;              // (d4,): w3[0] - w3[1]
  {
    const float *wi = win.data_ptr<float>(), *wa = w1f.data_ptr<float>(), *wb = w2f.data_ptr<float>();
    const float* wc = w3f.data_ptr<float>();
    for (int64_t n = 0; n < d; ++n)
      for (int64_t k = 0; k < d; ++k) win_t[k * d + n] = wi[n * d + k];
    for (int64_t n = 0; n < d2; ++n)
      for (int64_t k = 0; k < d2; ++k) {
        w1_loc_t[k * d2 + n] = wa[n * d + k];
        w1_glob[n * d2 + k] = wa[n * d + d2 + k];
      }
    for (int64_t q = 0; q < d4; ++q)
      for (int64_t k = 0; k < d2; ++k) w2_t[k * d4 + q] = wb[q * d2 + k];
    for (int64_t q = 0; q < d4; ++q) w3d[q] = wc[q] - wc[d4 + q];
  }
  Params p;
  p.H = H;
  p.d = d;
  p.d2 = d2;
  p.d4 = d4;
  p.hh = hh;
  p.ln_w = ln_w.data_ptr<float>();
  p.ln_b = ln_b.data_ptr<float>();
  p.win_t = win_t;
  p.b_in = bin.data_ptr<float>();
  p.w1_loc_t = w1_loc_t;
  p.w1_glob = w1_glob;
  p.b1 = b1f.data_ptr<float>();
  p.w2_t = w2_t;
  p.b2 = b2f.data_ptr<float>();
  p.w3d = w3d;
  p.b3d = b3f.data_ptr<float>()[0] - b3f.data_ptr<float>()[1];
  p.se_w1 = sw1.data_ptr<float>();
  p.se_b1 = sb1.data_ptr<float>();
  p.se_w2 = sw2.data_ptr<float>();
  p.se_b2 = sb2.data_ptr<float>();

  // Clamped segments: bad cu_seqlens give wrong numbers, never an out-of-bounds access.
  const at::Tensor cu_c = cu_seqlens.contiguous();
  const int32_t* cu = cu_c.data_ptr<int32_t>();
  // seg_first: the image's first row of S (after its prefix rows); seg_m: rows of S; seg_sp: spatial rows.
  std::vector<int64_t> seg_first(B), seg_m(B), seg_sp(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = std::min<int64_t>(std::max<int64_t>(cu[b], 0), T);
    const int64_t e = std::min<int64_t>(std::max<int64_t>(cu[b + 1], s), T);
    seg_first[b] = num_prefix < e - s ? s + num_prefix : e;
    seg_m[b] = e - seg_first[b];
    seg_sp[b] = std::max<int64_t>(seg_m[b] - num_packages, 0);
  }
  std::vector<float> bias1(B * H * d2);
  float* score_p = keep_score.data_ptr<float>();
  float* prob_p = keep_prob.data_ptr<float>();
  const int64_t ldx = x.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "token_scores_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    auto global_pass = &global_pass_base<scalar_t>;
    auto score_pass = &score_pass_base;
#if SPVIT_TS_AVX2
    if (cpu_has_avx2()) {
      global_pass = &global_pass_avx2<scalar_t>;
      score_pass = &score_pass_avx2;
    }
#endif
    const int64_t row_floats = H * d2;  // stash floats per spatial row
    if (B >= 2 * at::get_num_threads()) {
      // Many images: both passes of an image on one thread; its stash (n_sp x C/2 floats) stays in cache.
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> stash_u, stash_mean;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t s0 = seg_first[b];
          stash_u.resize(seg_sp[b] * row_floats);
          stash_mean.resize(seg_sp[b] * H);
          float* bias_b = bias1.data() + b * H * d2;
          for (int64_t h = 0; h < H; ++h)
            global_pass(xp, ldx, s0, seg_m[b], seg_sp[b], h, p, bias_b + h * d2, stash_u.data(), stash_mean.data());
          score_pass(0, seg_sp[b], stash_u.data(), stash_mean.data(), bias_b, p, score_p + s0, prob_p + s0);
        }
      });
    } else {
      // Few images (e.g. B = 1): pass 1 split over (image, head), pass 2 over blocks of rows; one stash
      // for the whole batch (image b's spatial rows from stash_row[b]).
      std::vector<int64_t> stash_row(B + 1, 0);
      for (int64_t b = 0; b < B; ++b) stash_row[b + 1] = stash_row[b] + seg_sp[b];
      std::vector<float> stash_u(stash_row[B] * row_floats), stash_mean(stash_row[B] * H);
      at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / H, h = i % H;
          global_pass(xp, ldx, seg_first[b], seg_m[b], seg_sp[b], h, p, bias1.data() + i * d2,
                      stash_u.data() + stash_row[b] * row_floats, stash_mean.data() + stash_row[b] * H);
        }
      });
      std::vector<int64_t> block_image, block_row;  // work items: (image, first spatial row) of kRows-row blocks
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < seg_sp[b]; r += kRows) {
          block_image.push_back(b);
          block_row.push_back(r);
        }
      at::parallel_for(0, static_cast<int64_t>(block_image.size()), 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = block_image[i], s0 = seg_first[b];
          score_pass(block_row[i], std::min(block_row[i] + kRows, seg_sp[b]),
                     stash_u.data() + stash_row[b] * row_floats, stash_mean.data() + stash_row[b] * H,
                     bias1.data() + b * H * d2, p, score_p + s0, prob_p + s0);
        }
      });
    }
  });
  return {keep_score, keep_prob};
}

}  // namespace spvit
