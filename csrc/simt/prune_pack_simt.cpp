// prune_pack's CUDA kernels and launcher (csrc/cuda/prune_pack_cuda.cu, unchanged) executed on CPU tensors
// through the SIMT execution layer (simt.h): the `cuda_simt` backend the tests run on every machine.
// The op is exported as prune_pack_cuda_simt so that it sits beside the real CUDA build's prune_pack_cuda.
#define SPVIT_SIMT 1
#define prune_pack_cuda prune_pack_cuda_simt
#include "../cuda/prune_pack_cuda.cu"
#undef prune_pack_cuda
