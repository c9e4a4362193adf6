// The SIMT layer's settings, bound in csrc/ops.cpp (one copy for every kernel the layer runs).
#include "../spvit.h"
#include "simt.h"

namespace spvit {

void simt_set_schedule(int64_t seed) {
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  spvit_simt::set_schedule(static_cast<uint64_t>(seed));
}

int64_t simt_schedule() { return static_cast<int64_t>(spvit_simt::schedule()); }

std::map<std::string, int64_t> simt_static_shared_bytes() { return spvit_simt::static_shared_bytes(); }

}  // namespace spvit
