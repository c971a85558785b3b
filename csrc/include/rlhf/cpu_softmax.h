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
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rlhf/common.h"  // splat
#include "rlhf/cpu_vec.h"
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
// Lane reductions as a fixed tree (halves, then pairs): deterministic, and three dependent
// steps instead of eight, which matters for short rows (V of a few dozen).
typedef float VecF4 __attribute__((vector_size(16)));
__attribute__((always_inline)) inline void halves(VecF v, VecF4& lo, VecF4& hi) {
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
}
__attribute__((always_inline)) inline float lane_sum(VecF v) {
  VecF4 lo, hi;
  halves(v, lo, hi);
  const VecF4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}
// The max of the lanes (of max_of's running maxima, which never hold a NaN).
__attribute__((always_inline)) inline float lane_max(VecF v) {
  VecF4 lo, hi;
  halves(v, lo, hi);
  const VecF4 s = hi > lo ? hi : lo;
  const float a = s[2] > s[0] ? s[2] : s[0], b = s[3] > s[1] ? s[3] : s[1];
  return b > a ? b : a;
}

template <typename T>
void load_scaled(const T* z, int64_t n, float inv_t, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(z[i]) * inv_t;
}

template <typename T>
void store(const float* in, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
}

// The helpers below read a chunk as s_j = src_j * scale. float32 logits are read in place
// (src = the logits, scale = 1/T); other dtypes are converted into the chunk buffer first
// (scaled_chunk). Reading float32 in place also avoids a store-forwarding stall: the 8-lane
// loads of a buffer written a moment before by narrower stores wait for those stores, which
// costs more than the whole chunk when rows are short (V of a few dozen).
template <typename T>
const float* scaled_chunk(const T* z, int64_t n, float inv_t, float* buf, float& scale) {
  if constexpr (std::is_same_v<T, float>) {
    scale = inv_t;
    return z;
  } else {
    load_scaled(z, n, inv_t, buf);
    scale = 1.f;
    return buf;
  }
}

RLHF_CPU_CLONES float max_of(const float* s, int64_t n) {
  VecF m8 = splat<VecF>(-INFINITY);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF x = load8(s + i);
    m8 = x > m8 ? x : m8;
  }
  float m = lane_max(m8);
  for (; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

// Chunk statistics of s = src * scale (scale > 0) relative to the chunk's max m: d = sum e,
// w = sum e (s - m) (softmax_stats_add of rlhf/logprobs.h, eight lanes at a time).
// max(src) * scale is max(s) exactly (rounding is monotonic). max_of skips NaN, so a NaN
// entry shows up as a NaN e, hence a NaN d. A chunk with no finite entry (m = -inf) is
// measured against 0 instead: its exps are 0 (d = 0, "nothing seen" to the merge), or NaN
// when it holds a NaN, which must not be lost.
RLHF_CPU_CLONES SoftmaxStats chunk_softmax_stats(const float* src, int64_t n, float scale) {
  const float m = max_of(src, n) * scale;
  const float ms = m == -INFINITY ? 0.f : m;
  const VecF mv = splat<VecF>(ms), sc = splat<VecF>(scale), zero = splat<VecF>(0.f);
  VecF d = zero, w = zero;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF x = load8(src + i) * sc - mv, e = exp_nonpos(x);
    d += e;
    w += e > zero ? e * x : zero;
  }
  SoftmaxStats st = {ms, lane_sum(d), lane_sum(w)};
  for (; i < n; ++i) {
    const float s = src[i] * scale;
    softmax_stats_add(st, s, exp_nonpos(s - ms));
  }
  st.m = m;  // d is 0 or NaN when m is -inf: nothing to rebase
  return st;
}

// out_j = dz_j = ds_j / T of s = src * scale, without the label's one-hot term
// (logprob_entropy_grad of rlhf/logprobs.h, eight lanes at a time). out may be src.
RLHF_CPU_CLONES void chunk_logprob_grad(const float* src, float* out, int64_t n, float scale, float m, float log_d,
                                        float entropy, float g_logp, float g_entropy, float inv_t) {
  const VecF mv = splat<VecF>(m), ldv = splat<VecF>(log_d), hv = splat<VecF>(entropy), zero = splat<VecF>(0.f);
  const VecF glv = splat<VecF>(g_logp), ghv = splat<VecF>(g_entropy), itv = splat<VecF>(inv_t);
  const VecF sc = splat<VecF>(scale);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF lp = (load8(src + i) * sc - mv) - ldv, p = exp_nonpos(lp);
    const VecF g = p != zero ? -p * (glv + ghv * (lp + hv)) : zero;  // p != 0: NaN stays NaN
    store8(out + i, g * itv);
  }
  for (; i < n; ++i) {
    const float lp = log_prob(src[i] * scale, m, log_d);
    out[i] = logprob_entropy_grad(lp, exp_nonpos(lp), g_logp, g_entropy, entropy) * inv_t;
  }
}

// out = (z + b) * inv_t for n float32 entries (b == nullptr: no bias): a logits tile's row
// segment, biased and scaled into a chunk buffer (the fused LM heads).
inline void load_biased(const float* z, const float* b, int64_t n, float inv_t, float* out) {
  if (b == nullptr) {
    load_scaled(z, n, inv_t, out);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (z[i] + b[i]) * inv_t;
  }
}

int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace
}  // namespace rlhf
