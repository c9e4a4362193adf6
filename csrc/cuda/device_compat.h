// What csrc/cuda/*.cu need beyond standard C++ and ATen, for the two compilers that build them:
//   nvcc (__CUDACC__)      the CUDA runtime, ATen's CUDA stream and device guard;
//   host C++ (SPVIT_SIMT)  the SIMT execution layer csrc/simt/simt.h, which runs the same device code on
//                          CPU tensors (see csrc/simt/prune_pack_simt.cpp).
// Host code launches kernels with SPVIT_LAUNCH(grid, block, dynamic_smem, stream, kernel)(args...) instead of
// kernel<<<grid, block, dynamic_smem, stream>>>(args...), so the launch code is the same in both builds.
#pragma once

#include <ATen/core/Tensor.h>

#if defined(__CUDACC__)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define SPVIT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define SPVIT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

namespace spvit {
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
// The device the kernels' tensors live on.
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
}  // namespace spvit

#elif defined(SPVIT_SIMT)

#include "../simt/simt.h"

#define SPVIT_LAUNCH(grid, block, smem, stream, ...) \
  ::spvit_simt::launcher(#__VA_ARGS__, grid, block, smem, stream, __VA_ARGS__)
// Launch errors are thrown by the launch itself.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace spvit {
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
}  // namespace spvit

#else
#error "csrc/cuda sources are built by nvcc, or by the host compiler with SPVIT_SIMT defined"
#endif
