// Small kernels that show what the SIMT layer (csrc/simt/simt.h) catches; built and run by tests/test_simt.py.
//   simt_proofs <case> <schedule seed>   prints the kernel's output, one value a line, or "error: <message>"
//   (exit status 3) when the layer reports the launch.
#include "simt/simt.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kN = 64;

// out[i] = in[n - 1 - i] through shared memory; without the barrier a thread reads a slot not yet written.
template <bool kBarrier>
__global__ void reverse_kernel(const int* in, int* out) {
  __shared__ int s[kN];
  const int t = threadIdx.x;
  s[t] = in[t];
  if (kBarrier) __syncthreads();
  out[t] = s[kN - 1 - t];
}

// Warp sum with shuffles; kWrongLane reads lane + o with __shfl_up_sync instead of __shfl_down_sync.
template <bool kWrongLane>
__global__ void warp_sum_kernel(const int* in, int* out) {
  int v = in[blockIdx.x * 32 + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += kWrongLane ? __shfl_up_sync(0xffffffffu, v, o) : __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Every warp op: indexed shuffle (rotate by 5), xor butterfly with width 8, ballot, any, all.
__global__ void warp_ops_kernel(int* out) {
  const int lane = threadIdx.x;
  out[lane] = __shfl_sync(0xffffffffu, lane * 10, (lane + 5) % 32);
  out[32 + lane] = __shfl_xor_sync(0xffffffffu, lane, 3, 8);
  out[64 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[96 + lane] = __any_sync(0xffffffffu, lane == 17) + 2 * __all_sync(0xffffffffu, lane < 32) +
                   4 * __all_sync(0xffffffffu, lane < 31);
}

// Writes one slot past a 64-int shared array (caught by AddressSanitizer).
__global__ void shared_oob_kernel(int* out) {
  __shared__ int s[kN];
  s[threadIdx.x + 1] = 1;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Reads one element past the input (caught by AddressSanitizer).
__global__ void global_oob_kernel(const int* in, int* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// Thread 0 returns before a barrier the others wait at.
__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// In every warp, lanes 0-15 wait at __syncthreads and lanes 16-31 at a full-warp __syncwarp: a deadlock.
__global__ void mixed_barrier_kernel(int* out) {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

// Block b reads shared memory before writing it: the poison (-1), never block b-1's values.
template <typename T>
__global__ void read_before_write_kernel(T* out) {
  __shared__ T s[kN];
  out[blockIdx.x * kN + threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = static_cast<T>(blockIdx.x + 1);
}

// The same with dynamic shared memory, plus a write and read back within the block.
__global__ void dynamic_shared_kernel(int* out) {
  SPVIT_DYNAMIC_SHARED(int, s);
  out[blockIdx.x * 2 * kN + threadIdx.x] = s[threadIdx.x];
  __syncthreads();
  s[kN - 1 - threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * 2 * kN + kN + threadIdx.x] = s[threadIdx.x];
}

// Block-wide sum with atomics and 2-D indices.
__global__ void atomic_kernel(int* out) {
  __shared__ int total;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  if (t == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, t);
  __syncthreads();
  if (t == 0) out[blockIdx.y * gridDim.x + blockIdx.x] = total;
}

void print(const std::vector<int>& v) {
  for (int x : v) std::printf("%d\n", x);
}

int run(const std::string& name) {
  std::vector<int> in(kN);
  for (int i = 0; i < kN; ++i) in[i] = 100 + i;
  std::vector<int> out(4 * kN, 0);
  if (name == "reverse") {
    spvit_simt::launcher("reverse_kernel<true>", 1, kN, 0, nullptr, reverse_kernel<true>)(in.data(), out.data());
  } else if (name == "reverse_no_barrier") {
    spvit_simt::launcher("reverse_kernel<false>", 1, kN, 0, nullptr, reverse_kernel<false>)(in.data(), out.data());
  }
  if (name.rfind("reverse", 0) == 0) out.resize(kN); else if (name == "warp_sum" || name == "warp_sum_wrong_lane") {
    std::vector<int> vals(2 * 32);
    for (int i = 0; i < 64; ++i) vals[i] = i * i;
    if (name == "warp_sum") {
      spvit_simt::launcher("warp_sum_kernel<false>", 2, 32, 0, nullptr, warp_sum_kernel<false>)(vals.data(), out.data());
    } else {
      spvit_simt::launcher("warp_sum_kernel<true>", 2, 32, 0, nullptr, warp_sum_kernel<true>)(vals.data(), out.data());
    }
    out.resize(2);
  } else if (name == "warp_ops") {
    spvit_simt::launcher("warp_ops_kernel", 1, 32, 0, nullptr, warp_ops_kernel)(out.data());
    out.resize(128);
  } else if (name == "shared_oob") {
    spvit_simt::launcher("shared_oob_kernel", 1, kN, 0, nullptr, shared_oob_kernel)(out.data());
  } else if (name == "global_oob") {
    int* heap = static_cast<int*>(std::malloc(kN * sizeof(int)));  // exactly kN: the read past it is caught
    std::memcpy(heap, in.data(), kN * sizeof(int));
    spvit_simt::launcher("global_oob_kernel", 1, kN, 0, nullptr, global_oob_kernel)(heap, out.data());
    std::free(heap);
  } else if (name == "early_return") {
    spvit_simt::launcher("early_return_kernel", 1, kN, 0, nullptr, early_return_kernel)(out.data());
  } else if (name == "mixed_barrier") {
    spvit_simt::launcher("mixed_barrier_kernel", 1, kN, 0, nullptr, mixed_barrier_kernel)(out.data());
  } else if (name == "read_before_write") {
    std::vector<float> f(2 * kN);
    spvit_simt::launcher("read_before_write_kernel<int>", 2, kN, 0, nullptr, read_before_write_kernel<int>)(out.data());
    spvit_simt::launcher("read_before_write_kernel<float>", 2, kN, 0, nullptr, read_before_write_kernel<float>)(f.data());
    out.resize(2 * kN);
    for (float x : f) out.push_back(x != x ? -1 : static_cast<int>(x));  // NaN poison -> -1
  } else if (name == "dynamic_shared") {
    spvit_simt::launcher("dynamic_shared_kernel", 2, kN, kN * sizeof(int), nullptr, dynamic_shared_kernel)(out.data());
  } else if (name == "atomic") {
    spvit_simt::launcher("atomic_kernel", dim3(2, 3), dim3(8, 4), 0, nullptr, atomic_kernel)(out.data());
    out.resize(6);
  } else if (name == "too_many_threads") {
    spvit_simt::launcher("atomic_kernel", 1, dim3(64, 32), 0, nullptr, atomic_kernel)(out.data());
  } else if (name == "convert") {
    // float bits -> half bits, bfloat16 bits, and back, for the values given on stdin (hex float bits).
    unsigned bits;
    while (std::scanf("%x", &bits) == 1) {
      float f;
      std::memcpy(&f, &bits, 4);
      const __half h = __float2half(f);
      const __nv_bfloat16 b = __float2bfloat16(f);
      const float hf = __half2float(h), bf = __bfloat162float(b);
      std::printf("%04x %04x %08x %08x\n", h.x, b.x, __float_as_uint(hf), __float_as_uint(bf));
    }
    return 0;
  } else {
    std::fprintf(stderr, "unknown case %s\n", name.c_str());
    return 2;
  }
  print(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <case> <seed>\n", argv[0]);
    return 2;
  }
  spvit_simt::set_schedule(std::strtoull(argv[2], nullptr, 10));
  try {
    return run(argv[1]);
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 3;
  }
}
