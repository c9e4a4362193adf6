// SIMT execution layer: runs CUDA C++ device code on the CPU, from the same source nvcc compiles.
//
// Why: the machines that build and test this project have no GPU. A kernel that is only compiled is an
// untested kernel, so CI executes csrc/cuda/*.cu through this header with the host compiler and compares
// the results to the float64 references, like every other backend.
//
// Model
//   * A launch runs the blocks of the grid one after another, on the calling CPU thread. Launches are
//     serialised by one mutex (static shared memory is one copy per kernel, see below).
//   * Every CUDA thread of a block is a fiber with its own stack (a hand-written context switch on x86-64,
//     ucontext elsewhere or with -DSPVIT_SIMT_UCONTEXT). A fiber runs until it reaches
//     a barrier or returns; the scheduler then runs the next one. So between two barriers the threads of
//     a block run one after another, in an order drawn from the schedule seed (set_schedule):
//         seed % 4 == 0  in order (thread 0 first)      seed % 4 == 1  reversed
//         seed % 4 == 2  one warp (drawn) runs ahead     seed % 4 == 3  random permutation every phase
//     A missing barrier therefore changes the result under some schedule instead of hiding.
//   * __syncthreads() is a block barrier. Warp shuffles, ballot/any/all and __syncwarp are warp barriers
//     over the lanes of their mask, with a double-buffered exchange slot per lane. Reading a lane that
//     did not take part gives all-ones bits (NaN, -1).
//   * Errors are C++ exceptions (std::runtime_error) naming the kernel and the block, never a hang:
//       - a __syncthreads that some threads of the block never reach because they returned,
//       - a warp operation whose mask names a lane that returned,
//       - a deadlock (every live thread waits, but not at the same kind of barrier),
//       - a bad launch configuration (empty grid, more than 1024 threads, static shared > 48 KiB).
//   * Shared memory is poisoned (every byte 0xff: float NaN, integer -1) before every block:
//       - static `__shared__` variables of the kernel function (templates included) -- found through the
//         ELF symbol table of the binary that holds the kernel (its function-local statics);
//       - dynamic shared memory, one heap buffer of exactly the launch's size (so AddressSanitizer sees
//         an access past it), reached with SPVIT_DYNAMIC_SHARED(type, name) -- the host compiler cannot
//         give `extern __shared__ T name[];` per-launch storage, so kernels spell it with that macro.
//     `__shared__` declared in a __device__ helper (not in the kernel itself) is shared but not poisoned.
//
// What it provides: dim3/uint3, threadIdx/blockIdx/blockDim/gridDim, warpSize, __global__/__device__/
// __host__/__forceinline__/__launch_bounds__ (accepted, not checked), __shared__, __syncthreads,
// __syncwarp, __shfl{,_up,_down,_xor}_sync, __ballot_sync/__any_sync/__all_sync, __activemask, atomics
// (Add/Sub/Max/Min/Exch/CAS/And/Or/Xor), __threadfence*, __ldg, bit casts (__float_as_uint & co), bit
// counts (__popc, __clz, __ffs), __half/__nv_bfloat16 with their float conversions, min/max, and
// launcher(), which SPVIT_LAUNCH in csrc/cuda/device_compat.h expands to.
//
// What it cannot show: timing, occupancy, the real memory model (threads of one block never run
// concurrently here, so a race that needs true concurrency between barriers only shows through the
// schedules) and warp-synchronous code without __syncwarp.
#pragma once

#include <dlfcn.h>
#include <elf.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SPVIT_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SPVIT_SIMT_ASAN 1
#endif
#endif
#ifdef SPVIT_SIMT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// Context switch: on x86-64 a hand-written one that saves the callee-saved registers and the stack pointer
// (ucontext's swapcontext also saves the signal mask, a system call per switch: about 6x slower).
#if defined(__x86_64__) && !defined(SPVIT_SIMT_UCONTEXT)
#define SPVIT_SIMT_FAST_SWITCH 1
// spvit_simt_switch(save, next): pushes rbp, rbx, r12-r15, stores rsp in *save, continues at stack `next`.
// A weak, hidden COMDAT symbol, so every translation unit that includes this header may define it.
asm(R"(
  .pushsection .text.spvit_simt_switch,"axG",@progbits,spvit_simt_switch,comdat
  .weak spvit_simt_switch
  .hidden spvit_simt_switch
  .type spvit_simt_switch,@function
spvit_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size spvit_simt_switch, .-spvit_simt_switch
  .popsection
)");
extern "C" void spvit_simt_switch(void** save, void* next);
#else
#define SPVIT_SIMT_FAST_SWITCH 0
#endif

// --- CUDA vocabulary ----------------------------------------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

using cudaStream_t = struct CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One copy per kernel (function-local static), shared by the fibers of the running block; see above.
#define __shared__ static

namespace spvit_simt {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber (AddressSanitizer's redzones need room)

namespace detail {

enum class State { kReady, kAtBlock, kAtWarp, kDone };

struct Fiber {
#if SPVIT_SIMT_FAST_SWITCH
  void* sp = nullptr;  // saved stack pointer (the callee-saved registers sit on the fiber's stack)
#else
  ucontext_t ctx;
#endif
  uint3 idx;
  int linear = 0;
  State state = State::kReady;
  unsigned warp_mask = 0;  // mask of the warp operation it waits at
  unsigned warp_gen = 0;   // warp barriers passed (selects the exchange buffer)
  char* stack = nullptr;
#ifdef SPVIT_SIMT_ASAN
  void* fake_stack = nullptr;
#endif
};

// Per-warp exchange buffers: two generations, so a lane that already left a shuffle can write the next
// one while slower lanes still read this one.
struct WarpSlots {
  alignas(16) unsigned char data[2][kWarpSize][16];
  unsigned gen[2][kWarpSize];
};

struct LaunchState {
  const char* kernel = "";
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  std::vector<WarpSlots> warps;
#if SPVIT_SIMT_FAST_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  Fiber* current = nullptr;
  const void* body = nullptr;  // the kernel call of this launch (type-erased)
  void (*invoke)(const void*) = nullptr;
  std::exception_ptr error;
  unsigned char* dynamic_smem = nullptr;
#ifdef SPVIT_SIMT_ASAN
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

inline LaunchState& st() {
  static LaunchState s;
  return s;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline uint64_t& schedule_seed() {
  static uint64_t seed = 0;
  return seed;
}

// Bytes of static __shared__ memory found for every kernel launched so far (by launch name).
inline std::map<std::string, int64_t>& static_shared_log() {
  static std::map<std::string, int64_t> log;
  return log;
}

}  // namespace detail

// The schedule of the following launches (see the top of this file).
inline void set_schedule(uint64_t seed) {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::schedule_seed() = seed;
}
inline uint64_t schedule() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  return detail::schedule_seed();
}
// Static __shared__ bytes the layer found (and poisons) per launched kernel, for tests of the layer itself.
inline std::map<std::string, int64_t> static_shared_bytes() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  return detail::static_shared_log();
}

namespace detail {

// --- context switches (with the AddressSanitizer fiber annotations when it is on) ---------------------

inline void enter_fiber(Fiber* f) {
  LaunchState& s = st();
  s.current = f;
#ifdef SPVIT_SIMT_ASAN
  __sanitizer_start_switch_fiber(&s.sched_fake_stack, f->stack, kStackBytes);
#endif
#if SPVIT_SIMT_FAST_SWITCH
  spvit_simt_switch(&s.sched_sp, f->sp);
#else
  swapcontext(&s.sched_ctx, &f->ctx);
#endif
#ifdef SPVIT_SIMT_ASAN
  __sanitizer_finish_switch_fiber(s.sched_fake_stack, nullptr, nullptr);
#endif
  s.current = nullptr;
}

inline void leave_fiber(bool exiting) {
  LaunchState& s = st();
  Fiber* f = s.current;
#ifdef SPVIT_SIMT_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, s.sched_stack_bottom, s.sched_stack_size);
#else
  (void)exiting;
#endif
#if SPVIT_SIMT_FAST_SWITCH
  spvit_simt_switch(&f->sp, s.sched_sp);
#else
  swapcontext(&f->ctx, &s.sched_ctx);
#endif
#ifdef SPVIT_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &s.sched_stack_bottom, &s.sched_stack_size);
#endif
}

inline void fiber_main() {
  LaunchState& s = st();
#ifdef SPVIT_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.sched_stack_bottom, &s.sched_stack_size);
#endif
  try {
    s.invoke(s.body);
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  s.current->state = State::kDone;
  leave_fiber(true);
}

// --- static shared memory: the kernel's function-local statics, from the ELF symbol table -------------

struct Region {
  unsigned char* ptr;
  size_t size;
  std::string name;
};

inline std::vector<Region> read_static_locals(const void* kernel, const char* kernel_name) {
  Dl_info info{};
  if (!dladdr(kernel, &info) || !info.dli_fname)
    throw std::runtime_error(std::string("simt: cannot find the binary holding kernel ") + kernel_name);
  FILE* file = std::fopen(info.dli_fname[0] ? info.dli_fname : "/proc/self/exe", "rb");
  if (!file) throw std::runtime_error(std::string("simt: cannot open ") + info.dli_fname);
  std::vector<unsigned char> img;
  {
    std::fseek(file, 0, SEEK_END);
    img.resize(static_cast<size_t>(std::ftell(file)));
    std::fseek(file, 0, SEEK_SET);
    const size_t got = std::fread(img.data(), 1, img.size(), file);
    std::fclose(file);
    if (got != img.size()) throw std::runtime_error(std::string("simt: cannot read ") + info.dli_fname);
  }
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
  const uintptr_t base = eh->e_type == ET_DYN ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  const uintptr_t target = reinterpret_cast<uintptr_t>(kernel) - base;
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[i].sh_offset);
    const size_t nsym = sh[i].sh_size / sizeof(Elf64_Sym);
    const char* names = reinterpret_cast<const char*>(img.data() + sh[sh[i].sh_link].sh_offset);
    std::string fn;
    for (size_t k = 0; k < nsym && fn.empty(); ++k)
      if (ELF64_ST_TYPE(sym[k].st_info) == STT_FUNC && sym[k].st_value == target) fn = names + sym[k].st_name;
    if (fn.empty()) break;
    // Function-local statics of function `_Z<enc>` are named `_ZZ<enc>E<name>`.
    const std::string enc = fn.rfind("_Z", 0) == 0 ? fn.substr(2) : std::to_string(fn.size()) + fn;
    const std::string prefix = "_ZZ" + enc + "E";
    std::vector<Region> out;
    for (size_t k = 0; k < nsym; ++k) {
      const char* name = names + sym[k].st_name;
      if (ELF64_ST_TYPE(sym[k].st_info) == STT_OBJECT && sym[k].st_size > 0 &&
          std::strncmp(name, prefix.c_str(), prefix.size()) == 0)
        out.push_back({reinterpret_cast<unsigned char*>(base + sym[k].st_value), sym[k].st_size,
                       name + prefix.size()});
    }
    return out;
  }
  throw std::runtime_error(std::string("simt: no symbol table entry for kernel ") + kernel_name + " in " +
                           info.dli_fname + " (a stripped binary?): its __shared__ memory cannot be poisoned");
}

inline const std::vector<Region>& static_shared(const void* kernel, const char* kernel_name) {
  static std::map<const void*, std::vector<Region>> cache;
  auto it = cache.find(kernel);
  if (it == cache.end()) it = cache.emplace(kernel, read_static_locals(kernel, kernel_name)).first;
  return it->second;
}

// --- the scheduler ---------------------------------------------------------------------------------------

[[noreturn]] inline void fail(const std::string& what) {
  const LaunchState& s = st();
  throw std::runtime_error("simt: kernel " + std::string(s.kernel) + ", block (" + std::to_string(s.block_idx.x) +
                           "," + std::to_string(s.block_idx.y) + "," + std::to_string(s.block_idx.z) + "): " + what);
}

inline std::string thread_list(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size() && i < 8; ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  if (ids.size() > 8) out += ",... (" + std::to_string(ids.size()) + " threads)";
  return out;
}

// Releases the barriers every participant has reached; reports the ones that can never complete.
inline bool release_barriers() {
  LaunchState& s = st();
  const int n = static_cast<int>(s.fibers.size());
  bool released = false;
  int live = 0, at_block = 0;
  std::vector<int> exited;
  for (const Fiber& f : s.fibers) {
    live += f.state != State::kDone;
    at_block += f.state == State::kAtBlock;
    if (f.state == State::kDone) exited.push_back(f.linear);
  }
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int lanes = std::min(kWarpSize, n - w0);
    unsigned waiting = 0, need = 0, done = 0;
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = s.fibers[w0 + l];
      if (f.state == State::kAtWarp) {
        waiting |= 1u << l;
        need |= f.warp_mask;
      }
      if (f.state == State::kDone) done |= 1u << l;
    }
    if (!waiting) continue;
    const unsigned exists = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
    need &= exists;
    if (need & done)
      fail("a warp operation of warp " + std::to_string(w0 / kWarpSize) + " names lanes that already returned");
    if ((need & ~waiting) == 0) {
      for (int l = 0; l < lanes; ++l)
        if (waiting >> l & 1u) s.fibers[w0 + l].state = State::kReady;
      released = true;
    }
  }
  if (live > 0 && at_block == live) {
    if (!exited.empty())
      fail("__syncthreads reached by " + std::to_string(live) + " of " + std::to_string(n) +
           " threads; threads " + thread_list(exited) + " returned without reaching it");
    for (Fiber& f : s.fibers) f.state = State::kReady;
    released = true;
  }
  return released;
}

inline void deadlock() {
  const LaunchState& s = st();
  std::vector<int> at_block, at_warp, exited;
  for (const Fiber& f : s.fibers) {
    if (f.state == State::kAtBlock) at_block.push_back(f.linear);
    if (f.state == State::kAtWarp) at_warp.push_back(f.linear);
    if (f.state == State::kDone) exited.push_back(f.linear);
  }
  fail("barrier deadlock: threads " + thread_list(at_block) + " wait at __syncthreads, threads " +
       thread_list(at_warp) + " at a warp operation" +
       (exited.empty() ? std::string() : ", threads " + thread_list(exited) + " returned"));
}

inline void run_block(std::mt19937_64& rng, uint64_t seed) {
  LaunchState& s = st();
  const int n = static_cast<int>(s.fibers.size());
  for (Fiber& f : s.fibers) {
    f.state = State::kReady;
    f.warp_gen = 0;
#if SPVIT_SIMT_FAST_SWITCH
    // A frame spvit_simt_switch can return into: six zeroed registers, then fiber_main as the return
    // address, placed so that fiber_main starts with the stack alignment of a called function.
    void** top = reinterpret_cast<void**>(f.stack + kStackBytes);
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(&fiber_main);
    for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
    f.sp = top - 8;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#endif
  }
  for (WarpSlots& w : s.warps) std::memset(&w, 0xff, sizeof(w));
  std::vector<int> order;
  order.reserve(n);
  for (;;) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (s.fibers[i].state == State::kReady) order.push_back(i);
    switch (seed % 4) {
      case 0:
        break;
      case 1:
        std::reverse(order.begin(), order.end());
        break;
      case 2: {  // one warp first, then the rest in order
        const int ahead = static_cast<int>(rng() % static_cast<uint64_t>((n + kWarpSize - 1) / kWarpSize));
        std::stable_partition(order.begin(), order.end(), [&](int i) { return i / kWarpSize == ahead; });
        break;
      }
      default:
        std::shuffle(order.begin(), order.end(), rng);
    }
    for (int i : order) {
      enter_fiber(&s.fibers[i]);
      if (s.error) std::rethrow_exception(s.error);
    }
    bool live = false;
    for (const Fiber& f : s.fibers) live = live || f.state != State::kDone;
    if (!live) return;
    if (!release_barriers()) deadlock();
  }
}

// One launch: `invoke(body)` is the kernel call every thread makes.
inline void run(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes,
                const void* body, void (*invoke)(const void*)) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  LaunchState& s = st();
  s.kernel = kernel_name;
  s.block_idx = {0, 0, 0};
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (uint64_t(grid.x) * grid.y * grid.z == 0) fail("empty grid (" + std::to_string(grid.x) + "," +
                                                    std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  if (threads == 0 || threads > kMaxThreads)
    fail(std::to_string(threads) + " threads per block (CUDA allows 1 to " + std::to_string(kMaxThreads) + ")");
  const std::vector<Region>& statics = static_shared(kernel, kernel_name);
  size_t static_bytes = 0;
  for (const Region& r : statics) static_bytes += r.size;
  static_shared_log()[kernel_name] = static_cast<int64_t>(static_bytes);
  if (static_bytes > kMaxStaticShared)
    fail(std::to_string(static_bytes) + " bytes of static __shared__ memory (CUDA allows 48 KiB)");

  s.grid = grid;
  s.block = block;
  s.body = body;
  s.invoke = invoke;
  s.error = nullptr;
  const size_t old = s.fibers.size();
  s.fibers.resize(threads);
  for (size_t i = old; i < s.fibers.size(); ++i) {
    void* mem = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    mprotect(mem, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    s.fibers[i].stack = static_cast<char*>(mem) + 4096;
  }
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = static_cast<int>(i);
    f.idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }
  s.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  std::vector<unsigned char> dyn(dynamic_bytes);
  s.dynamic_smem = dynamic_bytes ? dyn.data() : nullptr;

  const uint64_t seed = schedule_seed();
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + 1);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block_idx = {x, y, z};
        for (const Region& r : statics) std::memset(r.ptr, 0xff, r.size);
        if (dynamic_bytes) std::memset(dyn.data(), 0xff, dynamic_bytes);
        run_block(rng, seed);
      }
  s.dynamic_smem = nullptr;
}

template <class Kernel, class Args>
struct Call {
  Kernel kernel;
  Args args;
  static void invoke(const void* self) {
    const Call& c = *static_cast<const Call*>(self);
    std::apply(c.kernel, c.args);  // every thread gets its own copy of the parameters, as on the GPU
  }
};

// --- warp-level exchange ----------------------------------------------------------------------------------

inline Fiber& me() { return *st().current; }

inline int lane_of(const Fiber& f) { return f.linear % kWarpSize; }

inline WarpSlots& warp_of(const Fiber& f) { return st().warps[f.linear / kWarpSize]; }

// Publishes `v` for this warp barrier, waits for the lanes of `mask`, and returns the buffer index.
template <class T>
unsigned warp_barrier(unsigned mask, const T& v) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "warp exchange of this type");
  Fiber& f = me();
  WarpSlots& w = warp_of(f);
  const unsigned g = f.warp_gen & 1u;
  std::memset(w.data[g][lane_of(f)], 0xff, 16);
  std::memcpy(w.data[g][lane_of(f)], &v, sizeof(T));
  w.gen[g][lane_of(f)] = f.warp_gen;
  f.warp_mask = mask | (1u << lane_of(f));
  f.state = State::kAtWarp;
  leave_fiber(false);
  return g;
}

// The value lane `src` published at this barrier; all-ones bits when it did not take part.
template <class T>
T warp_read(unsigned g, int src) {
  Fiber& f = me();
  WarpSlots& w = warp_of(f);
  T out;
  if (src >= 0 && src < kWarpSize && w.gen[g][src] == f.warp_gen) {
    std::memcpy(&out, w.data[g][src], sizeof(T));
  } else {
    std::memset(&out, 0xff, sizeof(T));
  }
  return out;
}

inline void warp_done() { ++me().warp_gen; }

template <class T>
T shuffle(unsigned mask, T v, int src_in_segment, int width, bool keep_own) {
  Fiber& f = me();
  const int lane = lane_of(f);
  const int seg = lane & ~(width - 1);
  const unsigned g = warp_barrier(mask, v);
  T out = keep_own ? v : warp_read<T>(g, seg + src_in_segment);
  warp_done();
  return out;
}

inline unsigned vote(unsigned mask, bool pred) {
  const unsigned g = warp_barrier(mask, static_cast<int>(pred));
  unsigned bits = 0;
  for (int l = 0; l < kWarpSize; ++l)
    if ((mask >> l & 1u) && warp_read<int>(g, l) == 1) bits |= 1u << l;
  warp_done();
  return bits;
}

// --- launch ----------------------------------------------------------------------------------------------

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;

  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    using Args = std::tuple<std::decay_t<P>...>;
    const Call<void (*)(P...), Args> call{kernel, Args(std::forward<A>(a)...)};
    run(name, reinterpret_cast<const void*>(kernel), grid, block, smem, &call, &Call<void (*)(P...), Args>::invoke);
  }
};

}  // namespace detail

// `name<<<grid, block, smem, stream>>>(args...)` is `launcher("name", grid, block, smem, stream, name)(args...)`.
template <class... P>
detail::Launcher<P...> launcher(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                                void (*kernel)(P...)) {
  return {kernel, name, grid, block, smem};
}

// Dynamic shared memory of the running block (SPVIT_DYNAMIC_SHARED).
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::st().dynamic_smem);
}

}  // namespace spvit_simt

// --- built-in variables ------------------------------------------------------------------------------------

#define threadIdx (::spvit_simt::detail::st().current->idx)
#define blockIdx (::spvit_simt::detail::st().block_idx)
#define blockDim (::spvit_simt::detail::st().block)
#define gridDim (::spvit_simt::detail::st().grid)
#define warpSize 32
#define SPVIT_DYNAMIC_SHARED(type, name) type* name = ::spvit_simt::dynamic_shared<type>()

// --- barriers and warp operations --------------------------------------------------------------------------

inline void __syncthreads() {
  ::spvit_simt::detail::me().state = ::spvit_simt::detail::State::kAtBlock;
  ::spvit_simt::detail::leave_fiber(false);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)::spvit_simt::detail::vote(mask, true); }

inline unsigned __activemask() { return 0xffffffffu; }  // lanes run converged between warp operations

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  return ::spvit_simt::detail::shuffle(mask, v, ((src % width) + width) % width, width, false);
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int pos = ::spvit_simt::detail::lane_of(::spvit_simt::detail::me()) % width;
  const bool own = pos < static_cast<int>(delta);
  return ::spvit_simt::detail::shuffle(mask, v, own ? pos : pos - static_cast<int>(delta), width, own);
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int pos = ::spvit_simt::detail::lane_of(::spvit_simt::detail::me()) % width;
  const bool own = pos + static_cast<int>(delta) >= width;
  return ::spvit_simt::detail::shuffle(mask, v, own ? pos : pos + static_cast<int>(delta), width, own);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  const int pos = ::spvit_simt::detail::lane_of(::spvit_simt::detail::me()) % width;
  const int src = pos ^ lane_mask;
  const bool own = src >= width;  // outside this lane's segment: CUDA returns the lane's own value
  return ::spvit_simt::detail::shuffle(mask, v, own ? pos : src, width, own);
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return ::spvit_simt::detail::vote(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return ::spvit_simt::detail::vote(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return ::spvit_simt::detail::vote(mask, pred != 0) == (mask & ::spvit_simt::detail::vote(mask, true));
}

inline void __threadfence() {}
inline void __threadfence_block() {}

// --- memory access, bit casts, bit counts ------------------------------------------------------------------

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

namespace spvit_simt {
template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
}  // namespace spvit_simt

inline unsigned __float_as_uint(float v) { return spvit_simt::bit_cast<unsigned>(v); }
inline int __float_as_int(float v) { return spvit_simt::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return spvit_simt::bit_cast<float>(v); }
inline float __int_as_float(int v) { return spvit_simt::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return spvit_simt::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return spvit_simt::bit_cast<double>(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }

// CUDA's min/max overloads for mixed integer and floating types (the host has only std::min/std::max).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// --- atomics (the threads of a launch never run at the same time, so plain read-modify-write is atomic) ----

// Every atomic is one read-modify-write that returns the old value; `f` maps the old value to the new one.
template <class T, class F>
inline T atomic_rmw(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
template <class T>
inline T atomicAdd(T* p, T v) { return atomic_rmw(p, [v](T o) { return o + v; }); }
template <class T>
inline T atomicSub(T* p, T v) { return atomic_rmw(p, [v](T o) { return o - v; }); }
template <class T>
inline T atomicMax(T* p, T v) { return atomic_rmw(p, [v](T o) { return o < v ? v : o; }); }
template <class T>
inline T atomicMin(T* p, T v) { return atomic_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <class T>
inline T atomicExch(T* p, T v) { return atomic_rmw(p, [v](T) { return v; }); }
template <class T>
inline T atomicCAS(T* p, T expected, T v) { return atomic_rmw(p, [=](T o) { return o == expected ? v : o; }); }
template <class T>
inline T atomicAnd(T* p, T v) { return atomic_rmw(p, [v](T o) { return static_cast<T>(o & v); }); }
template <class T>
inline T atomicOr(T* p, T v) { return atomic_rmw(p, [v](T o) { return static_cast<T>(o | v); }); }
template <class T>
inline T atomicXor(T* p, T v) { return atomic_rmw(p, [v](T o) { return static_cast<T>(o ^ v); }); }

// --- half and bfloat16 (round to nearest even, as the CUDA intrinsics) --------------------------------------

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, mant = h.x & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal
    return sign ? -v : v;
  }
  if (exp == 31) return spvit_simt::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return spvit_simt::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline __half __float2half(float f) {
  const uint32_t x = spvit_simt::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to infinity
  if (ax < 0x38800000u) {  // below the smallest normal half: a subnormal, rounded to nearest even
    const float scaled = spvit_simt::bit_cast<float>(ax) * 16777216.0f;  // exact: a power of two
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
  return {static_cast<uint16_t>(sign | h)};
}

inline __half __float2half_rn(float f) { return __float2half(f); }

inline float __bfloat162float(__nv_bfloat16 h) { return spvit_simt::bit_cast<float>(uint32_t(h.x) << 16); }

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t x = spvit_simt::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};  // quiet NaN
  return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
