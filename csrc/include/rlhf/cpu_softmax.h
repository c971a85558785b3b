// Vectorized row-chunk helpers of the logprobs kernels on the CPU, shared by
// csrc/cpu/logprobs.cpp (whole rows of logits) and csrc/cpu/linear_logprobs.cpp (row
// segments of a logits tile). A chunk of at most kChunk entries is converted to float
// and scaled by 1/T into an L1-resident buffer, then reduced by explicit 8-lane vector
// loops with a polynomial exp (GCC vector extensions; no -ffast-math needed).
// Everything is in an anonymous namespace: each including file gets its own copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rlhf/cpu_vec.h"
#include "rlhf/label_dispatch.h"
#include "rlhf/logprobs.h"


namespace rlhf {
namespace {

constexpr int64_t kChunk = 2048;  // floats per chunk buffer: 8 KiB, stays in L1

// exp(x) for x <= 0 (and NaN): Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for exp(r) (relative error ~2e-7), 2^k from the exponent bits. Below -87 the
// result is 0 (exp(-inf) = 0, as a -inf logit needs); NaN stays NaN (comparisons are false).
// One body for scalars (F = float, I = int32_t) and 8-lane vectors (F = VecF, I = VecI,
// rlhf/cpu_vec.h). Explicit vectors because GCC does not vectorize float reductions without
// -ffast-math.

template <typename F>
__attribute__((always_inline)) inline F splat(float x) {
  return F{} + x;
}

template <typename F, typename I>
__attribute__((always_inline)) inline F exp_nonpos_t(F x) {
  const F lo = splat<F>(-87.f);
  const F xc = x < lo ? lo : x;
  const F kf = (xc * splat<F>(1.44269504088896341f) + splat<F>(12582912.f)) - splat<F>(12582912.f);
  const F r = (xc - kf * splat<F>(0.693359375f)) + kf * splat<F>(2.12194440e-4f);
  F p = splat<F>(1.f / 720.f);
  p = p * r + splat<F>(1.f / 120.f);
  p = p * r + splat<F>(1.f / 24.f);
  p = p * r + splat<F>(1.f / 6.f);
  p = p * r + splat<F>(0.5f);
  p = p * r + splat<F>(1.f);
  p = p * r + splat<F>(1.f);
  F scale;
  if constexpr (std::is_same_v<F, float>) {
    scale = std::bit_cast<float>((static_cast<int32_t>(kf) + 127) << 23);
  } else {
    scale = reinterpret_cast<F>((__builtin_convertvector(kf, I) + 127) << 23);
  }
  return x < lo ? splat<F>(0.f) : p * scale;
}

inline float exp_nonpos(float x) { return exp_nonpos_t<float, int32_t>(x); }
__attribute__((always_inline)) inline VecF exp_nonpos(VecF x) { return exp_nonpos_t<VecF, VecI>(x); }

__attribute__((always_inline)) inline VecF load8(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
__attribute__((always_inline)) inline float lane_sum(VecF v) {  // fixed order: deterministic
  float s = 0.f;
  for (int k = 0; k < kW; ++k) s += v[k];
  return s;
}

template <typename T>
void load_scaled(const T* z, int64_t n, float inv_t, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(z[i]) * inv_t;
}

template <typename T>
void store(const float* in, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
}

RLHF_CPU_CLONES float max_of(const float* s, int64_t n) {
  VecF m8 = splat<VecF>(-INFINITY);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF x = load8(s + i);
    m8 = x > m8 ? x : m8;
  }
  float m = -INFINITY;
  for (int k = 0; k < kW; ++k) m = m8[k] > m ? m8[k] : m;
  for (; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

// Chunk statistics relative to the chunk's max m: d = sum e, w = sum e (s - m)
// (softmax_stats_add of rlhf/logprobs.h, eight lanes at a time).
RLHF_CPU_CLONES SoftmaxStats chunk_softmax_stats(const float* s, int64_t n) {
  const float m = max_of(s, n);
  if (m == -INFINITY) return softmax_stats_empty();  // all -inf: contributes nothing
  const VecF mv = splat<VecF>(m), zero = splat<VecF>(0.f);
  VecF d = zero, w = zero;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF x = load8(s + i) - mv, e = exp_nonpos(x);
    d += e;
    w += e > zero ? e * x : zero;
  }
  SoftmaxStats st = {m, lane_sum(d), lane_sum(w)};
  for (; i < n; ++i) softmax_stats_add(st, s[i], exp_nonpos(s[i] - m));
  return st;
}


// In place: s_j -> dz_j = ds_j / T without the label's one-hot term
// (logprob_entropy_grad of rlhf/logprobs.h, eight lanes at a time).
RLHF_CPU_CLONES void chunk_logprob_grad(float* s, int64_t n, float m, float log_d, float entropy, float g_logp,
                                        float g_entropy, float inv_t) {
  const VecF mv = splat<VecF>(m), ldv = splat<VecF>(log_d), hv = splat<VecF>(entropy), zero = splat<VecF>(0.f);
  const VecF glv = splat<VecF>(g_logp), ghv = splat<VecF>(g_entropy), itv = splat<VecF>(inv_t);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF lp = (load8(s + i) - mv) - ldv, p = exp_nonpos(lp);
    const VecF g = p > zero ? -p * (glv + ghv * (lp + hv)) : zero;
    store8(s + i, g * itv);
  }
  for (; i < n; ++i) {
    const float lp = log_prob(s[i], m, log_d);
    s[i] = logprob_entropy_grad(lp, exp_nonpos(lp), g_logp, g_entropy, entropy) * inv_t;
  }
}

int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// Labels outside [0, V) other than ignore_index: the first one found is reported.
struct BadLabel {
  std::atomic<bool> found{false};
  std::atomic<int64_t> row{0}, value{0};
  void note(int64_t r, int64_t v) {
    bool expected = false;
    if (found.compare_exchange_strong(expected, true)) { row = r; value = v; }
  }
};


}  // namespace
}  // namespace rlhf
