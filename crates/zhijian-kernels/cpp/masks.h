// The counter-based random stream behind zhijian's dropout masks, shared by
// `dropout_mask` (kernels.cpp) and the fused residual LayerNorm
// (residual_norm.cpp), so both draw the same mask from the same seed.
#pragma once

#include <ATen/CPUGeneratorImpl.h>

#include <cstdint>
#include <mutex>

namespace zhijian {
#define ZHIJIAN_INLINE inline __attribute__((always_inline))

// MurmurHash3's 32-bit finaliser: a bijection of 32-bit words with full avalanche.
ZHIJIAN_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6BU;
  h ^= h >> 13;
  h *= 0xC2B2AE35U;
  return h ^ (h >> 16);
}

// The 32-bit draw that decides element i of the mask seeded at `seed`: two
// finaliser rounds keyed by the seed's halves over the element's index. A
// counter-based stream, so any thread can make any stretch of it and the mask
// does not depend on the thread count; 32-bit arithmetic only, so the loop
// below vectorises (eight elements per instruction with AVX2). For i < 2^32
// each seed permutes the 32-bit words, so no two elements of a mask share a draw.
ZHIJIAN_INLINE uint32_t mask_draw(uint64_t seed, uint64_t i) {
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i >> 32);
  return fmix32(fmix32(lo * 0x9E3779B9U + static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(seed >> 32) ^
                (hi * 0x7FEB352DU));
}

// An element is kept when its draw is at most this: (1 - p) * 2^32 - 1, so
// p = 0 keeps every element.
inline uint32_t keep_max(double p) {
  const double max = (1.0 - p) * 4294967296.0 - 1.0;
  return max <= 0.0 ? 0 : static_cast<uint32_t>(max);
}

// Writes keep[i - begin] = 1 if element i of the mask seeded at `seed` is
// kept, else 0, for i in [begin, end).
ZHIJIAN_INLINE void keep_flags(uint8_t *__restrict keep, int64_t begin, int64_t end, uint64_t seed, uint32_t max) {
  for (int64_t i = begin; i < end; ++i) keep[i - begin] = mask_draw(seed, static_cast<uint64_t>(i)) <= max;
}

// Whether this CPU runs the kernels' AVX2 + FMA builds: each hot loop is
// compiled twice, once for these and once for the baseline x86-64 the rest
// of the shim targets, and picked at run time.
#if defined(__x86_64__) || defined(__i386__)
#define ZHIJIAN_AVX2 __attribute__((target("avx2,fma")))
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define ZHIJIAN_AVX2
inline bool has_avx2() { return false; }
#endif

// Defines `name##_fast(args...)`, which runs the inline template `name` from
// its AVX2 + FMA build where the CPU has those, else from its baseline build.
#define ZHIJIAN_BUILT_TWICE(name)                                        \
  template <typename... A>                                               \
  ZHIJIAN_AVX2 void name##_avx2(const A &...a) {                         \
    name(a...);                                                          \
  }                                                                      \
  template <typename... A>                                               \
  void name##_generic(const A &...a) {                                   \
    name(a...);                                                          \
  }                                                                      \
  template <typename... A>                                               \
  void name##_fast(const A &...a) {                                      \
    ::zhijian::has_avx2() ? name##_avx2(a...) : name##_generic(a...);    \
  }

// A seed for one mask, drawn from LibTorch's default CPU generator so that
// `manual_seed` repeats the masks.
inline uint64_t dropout_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}
}  // namespace zhijian
