// The CPU kernels' explicit vectors: 8 float lanes (GCC vector extensions: one AVX2 register,
// two SSE registers in the baseline build), the AVX2 clone of the hot loops chosen at load time
// by CPU feature, and the scaffolding of loops over the rows of a [B, T] batch: loads, mask
// bytes as lane masks, a row's padded tail, float32 block sums flushed into float64 lanes.
// Used by csrc/cpu/ppo.cpp and rlhf/cpu_softmax.h (the logprobs families).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

// The helpers taking vectors are always inlined, so the -Wpsabi note about passing 32-byte
// vectors by value is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "rlhf/common.h"  // splat (after the pragma: its vector instantiations are silenced too)

// The build targets baseline x86-64; hot loops get an AVX2 clone picked at load time by CPU
// feature. Not "arch=haswell": that clone is picked by CPU model, so AMD never gets it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLHF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RLHF_CPU_CLONES
#endif

namespace rlhf {
namespace {

typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
constexpr int kW = 8;  // lanes per vector
typedef int32_t VecI4 __attribute__((vector_size(16)));
typedef int64_t VecL2 __attribute__((vector_size(16)));
typedef float VecF4 __attribute__((vector_size(16)));
typedef double VecD4 __attribute__((vector_size(32)));
typedef int64_t VecL4 __attribute__((vector_size(32)));
typedef uint8_t VecM4 __attribute__((vector_size(4)));
constexpr int kBlockVecs = 16;   // vectors per float32 block: 16 terms per lane before the float64 flush

#define RLHF_INLINE __attribute__((always_inline)) inline
#define RLHF_INLINE_LAMBDA __attribute__((always_inline))

template <typename V>
RLHF_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 8 mask bytes -> int32 lane mask (-1 where the token counts). Each lane tests its own byte
// of the two words, spread over the lanes by one permute (vmovq + vpermd with AVX2; GCC
// turns a byte -> int32 __builtin_convertvector into scalar inserts, and a vector built
// from scalars into a trip through the stack).
RLHF_INLINE VecI load_mask(const uint8_t* m) {
  const VecL2 both = {load<int64_t>(m), 0};
  const VecI4 words = reinterpret_cast<VecI4>(both);
  const VecI spread = __builtin_shufflevector(words, words, 0, 0, 0, 0, 1, 1, 1, 1);
  const VecI bytes = {0xff, 0xff00, 0xff0000, int32_t(0xff000000u), 0xff, 0xff00, 0xff0000, int32_t(0xff000000u)};
  return (spread & bytes) != 0;
}

// The row's last T % 8 tokens, padded to a full vector with masked (and finite) tokens.
template <int N>
struct Tail {
  alignas(32) float x[N][kW];
  alignas(8) uint8_t m[kW];
  Tail(const float* const* src, const uint8_t* mask, int64_t t0, int64_t n) {
    std::memset(x, 0, sizeof x);
    std::memset(m, 0, sizeof m);
    for (int k = 0; k < N; ++k) std::memcpy(x[k], src[k] + t0, n * sizeof(float));
    std::memcpy(m, mask + t0, n);
  }
};

// g(x, valid, t0, n) for each 8-token vector of a row of T tokens, in order, where x[k] holds the
// vector's floats of row src[k], valid its mask lanes, t0 its first token and n its tokens (8, or
// T % 8 for the last partial vector, which comes from a padded Tail). flush() after every
// kBlockVecs vectors and at the end: float32 block sums then hold at most kBlockVecs terms per
// lane, the partial vector included.
template <int N, typename G, typename Flush>
RLHF_INLINE void for_vectors(const float* const* src, const uint8_t* m, int64_t T, G g, Flush flush) {
  VecF x[N];
  const auto at = [&](int64_t t0) RLHF_INLINE_LAMBDA {
    for (int k = 0; k < N; ++k) x[k] = load<VecF>(src[k] + t0);
    g(x, load_mask(m + t0), t0, kW);
  };
  constexpr int64_t kBlock = kW * kBlockVecs;
  int64_t t0 = 0;
  for (; t0 + kBlock <= T; t0 += kBlock) {
    for (int64_t t = t0; t < t0 + kBlock; t += kW) at(t);
    flush();
  }
  for (; t0 + kW <= T; t0 += kW) at(t0);
  if (t0 < T) {
    const Tail<N> tail(src, m, t0, T - t0);
    for (int k = 0; k < N; ++k) x[k] = load<VecF>(tail.x[k]);
    g(x, load_mask(tail.m), t0, T - t0);
  }
  flush();
}

// out[t, t + 8) = g(x, valid) for each 8-token vector of a row (for_vectors); only the last
// partial vector's T % 8 lanes are written.
template <int N, typename G>
RLHF_INLINE void map_row(const float* const* src, const uint8_t* m, int64_t T, float* out, G g) {
  const auto store = [&](const VecF* x, VecI valid, int64_t t0, int64_t n) RLHF_INLINE_LAMBDA {
    const VecF d = g(x, valid);
    std::memcpy(out + t0, &d, n * sizeof(float));
  };
  for_vectors<N>(src, m, T, store, [] {});
}

// f(b) for every row b of a [B, T] batch, rows in parallel (about 16k tokens a task).
template <typename F>
void for_rows(int64_t B, int64_t T, F f) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// N running sums of 8 float32 lanes over a block, flushed into 8 float64 lanes each.
template <int N>
struct LaneSums {
  VecF f[N];
  double d[N][kW] = {};
  LaneSums() { clear(); }
  RLHF_INLINE void clear() {
    for (int k = 0; k < N; ++k) f[k] = splat<VecF>(0.f);
  }
  RLHF_INLINE void flush() {
    for (int k = 0; k < N; ++k)
      for (int j = 0; j < kW; ++j) d[k][j] += f[k][j];
    clear();
  }
  double total(int k) const {  // after the last flush; fixed lane order
    double s = 0;
    for (int j = 0; j < kW; ++j) s += d[k][j];
    return s;
  }
};

// Adds x's 8 lanes, widened to float64, into acc's two halves (lane j into acc[j / 4][j % 4]).
RLHF_INLINE void add_lanes_f64(VecD4 (&acc)[2], VecF x) {
  acc[0] += __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3), VecD4);
  acc[1] += __builtin_convertvector(__builtin_shufflevector(x, x, 4, 5, 6, 7), VecD4);
}

inline double lane_total(VecD4 x) {  // fixed order
  double s = 0;
  for (int j = 0; j < 4; ++j) s += x[j];
  return s;
}

inline double lane_total(const VecD4 (&x)[2]) {  // fixed order
  double s = 0;
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) s += x[h][j];
  return s;
}

}  // namespace
}  // namespace rlhf
