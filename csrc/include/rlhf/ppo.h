// Per-token PPO math, used by both csrc/cpu/ppo.cpp and csrc/cuda/ppo.cu.
// Per-token values are float32; the callers accumulate them (see each kernel file).
//
// Policy:  ratio = exp(logp - old_logp)
//          l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))
//          dual clip c (> 1): tokens with A < 0 take min(l, -A*c)
// Value:   l = 0.5*max((V-R)^2, (clamp(V, V_old-c, V_old+c) - R)^2)
//
// Gradients follow PyTorch's conventions on the reference (max/min/clamp), which
// agree with these branch rules everywhere except on exact ties, where both
// branches carry the same value.
//
// Every function is a template over its float type F, so that one body serves both
// kernels: F = float on the device, and a GCC vector of floats (8 lanes, one AVX2
// register) in the CPU loops. Comparisons then give a bool or a lane mask, and
// `mask ? a : b` selects per lane; nothing branches on data.
#pragma once
#include <math.h>

#include <type_traits>

#include "rlhf/common.h"
#include "rlhf/layout.h"

// The per-token functions are always inlined on the host too, so that the CPU loops
// (compiled for AVX2 and baseline, see cpu/ppo.cpp) see straight-line vector code.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define RLHF_HD_TOKEN RLHF_HD
#else
#define RLHF_HD_TOKEN inline __attribute__((always_inline))
#endif

namespace rlhf {

template <typename F>
struct PolicyTokenT {
  F loss;   // l
  F ratio;  // exp(logp - old_logp)
  F kl;     // (ratio - 1) - log(ratio), the k3 estimator
  F dlogp;  // dl/dlogp
  // 1 where the token counts towards clipfrac_low / clipfrac_high / dual_clipfrac, else 0
  // (0/1 floats: summed directly by the kernels)
  F is_low, is_high, is_dual;
};
using PolicyToken = PolicyTokenT<float>;

// x in every lane of F (F = float: x itself).
template <typename F>
RLHF_HD_TOKEN F splat(float x) {
  return F{} + x;
}

// min/max: fminf/fmaxf on the device; plain selects on the host (fminf's NaN rules
// make GCC emit calls and branches, which stop the CPU loops from vectorizing).
template <typename F>
RLHF_HD_TOKEN F min_f32(F a, F b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}

template <typename F>
RLHF_HD_TOKEN F max_f32(F a, F b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}

// The int32 type with F's lanes (F a GCC float vector: comparisons give exactly that).
template <typename F>
struct lane_int {
  using type = decltype(F{} < F{});
};
template <>
struct lane_int<float> {
  using type = int;
};

// static_cast, lane by lane (float <-> int32 truncates toward zero, like the scalar cast).
template <typename To, typename From>
RLHF_HD_TOKEN To convert_lanes(From x) {
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
  return static_cast<To>(x);
#else
  if constexpr (std::is_arithmetic_v<From>) {
    return static_cast<To>(x);
  } else {
    return __builtin_convertvector(x, To);
  }
#endif
}

// exp(x) for float32. On the device: expf. On the host: a branch-free Cephes-style
// polynomial (within 2 ulp of expf; inf above 88.72, 0 below -103.9, NaN stays NaN), so the
// CPU loops that call it vectorize; glibc's expf is a scalar call.
template <typename F>
RLHF_HD_TOKEN F exp_f32(F x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  using I = typename lane_int<F>::type;
  const F xc = min_f32(max_f32(x, splat<F>(-103.9f)), splat<F>(88.7228f));
  const F kf = xc * 1.44269504088896341f + (xc >= 0.f ? splat<F>(0.5f) : splat<F>(-0.5f));
  const I k = convert_lanes<I>(kf);  // round to nearest: truncation of x/ln2 +- 0.5
  const F fk = convert_lanes<F>(k);
  const F r = (xc - fk * 0.693359375f) - fk * -2.12194440e-4f;  // x - k*ln2 in two parts
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^k in two factors so that k in [-150, 128] never leaves the float exponent range
  const I k1 = k / 2, k2 = k - k1;
  const F y = p * __builtin_bit_cast(F, (k1 + 127) << 23) * __builtin_bit_cast(F, (k2 + 127) << 23);
  return x != x ? x : (x > 88.7228f ? splat<F>(INFINITY) : (x < -103.9f ? splat<F>(0.f) : y));
#endif
}

// dual_clip <= 0 means no dual clip.
template <typename F>
RLHF_HD_TOKEN PolicyTokenT<F> ppo_policy_token(F logp, F old_logp, F adv, float clip_low, float clip_high,
                                               float dual_clip) {
  PolicyTokenT<F> t;
  const F zero = splat<F>(0.f), one = splat<F>(1.f);
  const F log_ratio = logp - old_logp;
  const F ratio = exp_f32(log_ratio);
  const F lo = splat<F>(1.f - clip_low), hi = splat<F>(1.f + clip_high);
  const F unclipped = -adv * ratio;
  const F clipped = -adv * min_f32(max_f32(ratio, lo), hi);
  const auto clip_wins = clipped > unclipped;
  const F l = clip_wins ? clipped : unclipped;
  // d(unclipped)/dlogp = -A*ratio; the clipped branch is constant where it wins strictly
  const F dlogp = clip_wins ? zero : -adv * ratio;
  const F cap = -adv * dual_clip;
  const auto dual = (adv < zero) & (cap < l) & (dual_clip > 0.f ? -1 : 0);  // all lanes off without dual clip
  t.loss = dual ? cap : l;
  t.dlogp = dual ? zero : dlogp;
  t.ratio = ratio;
  t.kl = (ratio - 1.f) - log_ratio;
  // clipping can only win strictly outside [lo, hi], so a win is either low or high
  const F wins = clip_wins ? one : zero;
  t.is_low = ratio < lo ? wins : zero;
  t.is_high = wins - t.is_low;
  t.is_dual = dual ? one : zero;
  return t;
}

template <typename F>
struct ValueTokenT {
  F loss;        // l
  F dvalue;      // dl/dV
  F is_clipped;  // 1 where the clipped term is strictly larger, else 0
};
using ValueToken = ValueTokenT<float>;

// has_clip false: l = 0.5*(V-R)^2.
template <typename F>
RLHF_HD_TOKEN ValueTokenT<F> ppo_value_token(F v, F old_v, F ret, bool has_clip, float clip) {
  ValueTokenT<F> t;
  const F zero = splat<F>(0.f);
  const F err = v - ret;
  const F unclipped = err * err;
  const F vc = min_f32(max_f32(v, old_v - clip), old_v + clip);
  const F err_c = vc - ret;
  const F clipped = err_c * err_c;
  // where the clipped term wins, vc sits on a bound: a constant, no gradient
  const auto clip_wins = (clipped > unclipped) & (has_clip ? -1 : 0);
  t.is_clipped = clip_wins ? splat<F>(1.f) : zero;
  t.loss = 0.5f * (clip_wins ? clipped : unclipped);
  t.dvalue = clip_wins ? zero : err;
  return t;
}

// The weight of every token of a row in the aggregated loss (loss = sum_b w_b * sum_t l_bt).
//   row_count: valid tokens of the row; total: of the batch; rows_with_tokens: rows with
//   row_count > 0; numel: B*T; num_tokens: the global normalizer, or <= 0 when not given.
RLHF_HD double ppo_row_weight(int64_t agg, double row_count, double total, double rows_with_tokens, double numel,
                              double num_tokens) {
  if (row_count <= 0) return 0.0;
  switch (agg) {
    case kTokenMean: return 1.0 / (num_tokens > 0 ? num_tokens : total);
    case kSeqMeanTokenMean: return 1.0 / (row_count * rows_with_tokens);
    case kSeqMeanTokenSum: return 1.0 / rows_with_tokens;
    default: return 1.0 / numel;
  }
}

}  // namespace rlhf
