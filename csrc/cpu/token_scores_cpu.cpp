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
// bitwise the same for any thread count or work split (tested). The hot loops (token_scores_cpu_kernels.inc)
// are compiled three times and picked at run time by what the CPU has (SPVIT_TS_ISA caps it): for the x86-64
// baseline the extension is built for, with target("avx2") (no FMA: the same operations in the same order as
// the baseline, only wider), and with target("avx512f,fma"), whose GEMM tiles are sixteen wide with fused
// multiply-adds (one rounding per product instead of two: results differ from the other two builds in the
// last bits; 1.3-1.8x faster than the AVX2 build on this project's CPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../spvit.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
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

namespace isa_base {
#define SPVIT_TS_WIDE 0
#include "token_scores_cpu_kernels.inc"
#undef SPVIT_TS_WIDE
}  // namespace isa_base

#if SPVIT_TS_AVX2
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace isa_avx512 {
#define SPVIT_TS_WIDE 1
#include "token_scores_cpu_kernels.inc"
#undef SPVIT_TS_WIDE

// The passes for CPUs with AVX-512F and FMA: the GEMMs fused multiply-add, everything else as isa_base.
template <typename scalar_t>
void global_pass(const scalar_t* x, int64_t ldx, int64_t s0, int64_t m, int64_t n_sp, int64_t h0, int64_t h1,
                 const Params& p, float* bias1, float* stash_u, float* stash_mean) {
  isa_avx512::global_pass_impl(x, ldx, s0, m, n_sp, h0, h1, p, bias1, stash_u, stash_mean);
}
void score_pass(int64_t i_begin, int64_t i_end, const float* stash_u, const float* stash_mean, const float* bias1,
                const Params& p, float* keep_score, float* keep_prob) {
  isa_avx512::score_pass_impl(i_begin, i_end, stash_u, stash_mean, bias1, p, keep_score, keep_prob);
}
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// The baseline and AVX2 builds of isa_base (same source, same operation order).
template <typename scalar_t>
void global_pass_base(const scalar_t* x, int64_t ldx, int64_t s0, int64_t m, int64_t n_sp, int64_t h0,
                      int64_t h1, const Params& p, float* bias1, float* stash_u, float* stash_mean) {
  isa_base::global_pass_impl(x, ldx, s0, m, n_sp, h0, h1, p, bias1, stash_u, stash_mean);
}
void score_pass_base(int64_t i_begin, int64_t i_end, const float* stash_u, const float* stash_mean,
                     const float* bias1, const Params& p, float* keep_score, float* keep_prob) {
  isa_base::score_pass_impl(i_begin, i_end, stash_u, stash_mean, bias1, p, keep_score, keep_prob);
}
#if SPVIT_TS_AVX2
template <typename scalar_t>
__attribute__((target("avx2"))) void global_pass_avx2(const scalar_t* x, int64_t ldx, int64_t s0, int64_t m,
                                                       int64_t n_sp, int64_t h0, int64_t h1, const Params& p,
                                                       float* bias1, float* stash_u, float* stash_mean) {
  isa_base::global_pass_impl(x, ldx, s0, m, n_sp, h0, h1, p, bias1, stash_u, stash_mean);
}
__attribute__((target("avx2"))) void score_pass_avx2(int64_t i_begin, int64_t i_end, const float* stash_u,
                                                      const float* stash_mean, const float* bias1,
                                                      const Params& p, float* keep_score, float* keep_prob) {
  isa_base::score_pass_impl(i_begin, i_end, stash_u, stash_mean, bias1, p, keep_score, keep_prob);
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
// SPVIT_TS_ISA=base / avx2 / avx512 caps the instruction set (to compare them, or to get the baseline's results
// on a newer CPU); unset: the widest the CPU has.
int cpu_isa() {
  static const int isa = [] {
    int best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") ? 2 : cpu_has_avx2() ? 1 : 0;
    const char* cap = std::getenv("SPVIT_TS_ISA");
    if (cap != nullptr) {
      const std::string c(cap);
      best = std::min(best, c == "base" ? 0 : c == "avx2" ? 1 : 2);
    }
    return best;
  }();
  return isa;
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
    if (cpu_isa() == 2) {
      global_pass = &isa_avx512::global_pass<scalar_t>;
      score_pass = &isa_avx512::score_pass;
    } else if (cpu_isa() == 1) {
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
          global_pass(xp, ldx, s0, seg_m[b], seg_sp[b], 0, H, p, bias_b, stash_u.data(), stash_mean.data());
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
          global_pass(xp, ldx, seg_first[b], seg_m[b], seg_sp[b], h, h + 1, p, bias1.data() + b * H * d2,
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
