// Per-token PPO math, used by both csrc/cpu/ppo.cpp and csrc/cuda/ppo.cu.
// Per-token values are float32; the callers accumulate them in float64.
//
// Policy:  ratio = exp(logp - old_logp)
//          l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))
//          dual clip c (> 1): tokens with A < 0 take min(l, -A*c)
// Value:   l = 0.5*max((V-R)^2, (clamp(V, V_old-c, V_old+c) - R)^2)
//
// Gradients follow PyTorch's conventions on the reference (max/min/clamp), which
// agree with these branch rules everywhere except on exact ties, where both
// branches carry the same value.
#pragma once
#include <math.h>

#include "rlhf/common.h"

// The per-token functions are always inlined on the host too, so that the CPU loops
// (compiled for AVX2 and baseline, see cpu/ppo.cpp) see straight-line code to vectorize.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define RLHF_HD_TOKEN RLHF_HD
#else
#define RLHF_HD_TOKEN inline __attribute__((always_inline))
#endif

namespace rlhf {

struct PolicyToken {
  float loss;   // l
  float ratio;  // exp(logp - old_logp)
  float kl;     // (ratio - 1) - log(ratio), the k3 estimator
  float dlogp;  // dl/dlogp
  // 1 where the token counts towards clipfrac_low / clipfrac_high / dual_clipfrac, else 0
  // (0/1 floats: summed directly by the kernels)
  float is_low, is_high, is_dual;
};

// min/max: fminf/fmaxf on the device; plain selects on the host (fminf's NaN rules
// make GCC emit calls and branches, which stop the CPU loops from vectorizing).
RLHF_HD_TOKEN float min_f32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}

RLHF_HD_TOKEN float max_f32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}

// exp(x) for float32. On the device: expf. On the host: a branch-free Cephes-style
// polynomial (within 2 ulp of expf; inf above 88.72, 0 below -103.9, NaN stays NaN), so the
// CPU loops that call it vectorize; glibc's expf is a scalar call.
RLHF_HD_TOKEN float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = min_f32(max_f32(x, -103.9f), 88.7228f);
  const float kf = xc * 1.44269504088896341f + (xc >= 0.f ? 0.5f : -0.5f);
  const int k = static_cast<int>(kf);  // round to nearest: truncation of x/ln2 +- 0.5
  const float fk = static_cast<float>(k);
  const float r = (xc - fk * 0.693359375f) - fk * -2.12194440e-4f;  // x - k*ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^k in two factors so that k in [-150, 128] never leaves the float exponent range
  const int k1 = k / 2, k2 = k - k1;
  const float y = p * __builtin_bit_cast(float, (k1 + 127) << 23) * __builtin_bit_cast(float, (k2 + 127) << 23);
  return x != x ? x : (x > 88.7228f ? INFINITY : (x < -103.9f ? 0.f : y));
#endif
}

// dual_clip <= 0 means no dual clip. Written without branches so that the CPU loops
// over tokens vectorize.
RLHF_HD_TOKEN PolicyToken ppo_policy_token(float logp, float old_logp, float adv, float clip_low, float clip_high,
                                     float dual_clip) {
  PolicyToken t;
  const float log_ratio = logp - old_logp;
  const float ratio = exp_f32(log_ratio);
  const float lo = 1.f - clip_low, hi = 1.f + clip_high;
  const float unclipped = -adv * ratio;
  const float clipped = -adv * min_f32(max_f32(ratio, lo), hi);
  const bool clip_wins = clipped > unclipped;
  const float l = clip_wins ? clipped : unclipped;
  // d(unclipped)/dlogp = -A*ratio; the clipped branch is constant where it wins strictly
  const float dlogp = clip_wins ? 0.f : -adv * ratio;
  const float cap = -adv * dual_clip;
  const bool dual = dual_clip > 0.f && adv < 0.f && cap < l;
  t.loss = dual ? cap : l;
  t.dlogp = dual ? 0.f : dlogp;
  t.ratio = ratio;
  t.kl = (ratio - 1.f) - log_ratio;
  // clipping can only win strictly outside [lo, hi], so a win is either low or high
  const float wins = clip_wins ? 1.f : 0.f;
  t.is_low = ratio < lo ? wins : 0.f;
  t.is_high = wins - t.is_low;
  t.is_dual = dual ? 1.f : 0.f;
  return t;
}

struct ValueToken {
  float loss;        // l
  float dvalue;      // dl/dV
  float is_clipped;  // 1 where the clipped term is strictly larger, else 0
};

// has_clip false: l = 0.5*(V-R)^2.
RLHF_HD_TOKEN ValueToken ppo_value_token(float v, float old_v, float ret, bool has_clip, float clip) {
  ValueToken t;
  const float err = v - ret;
  const float unclipped = err * err;
  const float vc = min_f32(max_f32(v, old_v - clip), old_v + clip);
  const float err_c = vc - ret;
  const float clipped = err_c * err_c;
  // where the clipped term wins, vc sits on a bound: a constant, no gradient
  const bool clip_wins = has_clip && clipped > unclipped;
  t.is_clipped = clip_wins ? 1.f : 0.f;
  t.loss = 0.5f * (clip_wins ? clipped : unclipped);
  t.dvalue = clip_wins ? 0.f : err;
  return t;
}

// loss_agg codes shared with rlhf_kernels/ops/ppo.py.
enum LossAgg : int64_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

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
