// The SIMT build of prune_pack's CUDA kernels as a small op library in one translation unit, compiled with
// AddressSanitizer by tests/simt/asan_driver.py (torch.ops.spvit_simt_asan.*): an out-of-bounds access in the
// CUDA kernels fails tests/test_simt.py.
#include <torch/library.h>

#include "simt/prune_pack_simt.cpp"
#include "simt/simt_control.cpp"

TORCH_LIBRARY(spvit_simt_asan, m) {
  m.def("prune_pack", &spvit::prune_pack_cuda_simt);
  m.def("set_schedule", &spvit::simt_set_schedule);
}
