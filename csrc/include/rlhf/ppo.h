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

namespace rlhf {

// Which statistic a token counts towards.
enum PolicyFlags : int { kClipLow = 1, kClipHigh = 2, kDualClip = 4 };

struct PolicyToken {
  float loss;   // l
  float ratio;  // exp(logp - old_logp)
  float kl;     // (ratio - 1) - log(ratio), the k3 estimator
  float dlogp;  // dl/dlogp
  int flags;    // PolicyFlags
};

// dual_clip <= 0 means no dual clip.
RLHF_HD PolicyToken ppo_policy_token(float logp, float old_logp, float adv, float clip_low, float clip_high,
                                     float dual_clip) {
  PolicyToken t;
  const float log_ratio = logp - old_logp;
  const float ratio = expf(log_ratio);
  const float lo = 1.f - clip_low, hi = 1.f + clip_high;
  const float unclipped = -adv * ratio;
  const float clipped = -adv * fminf(fmaxf(ratio, lo), hi);
  float l = fmaxf(unclipped, clipped);
  // d(unclipped)/dlogp = -A*ratio; the clipped branch is constant where it wins strictly
  float dlogp = unclipped >= clipped ? -adv * ratio : 0.f;
  int flags = 0;
  if (clipped > unclipped) flags |= ratio < lo ? kClipLow : (ratio > hi ? kClipHigh : 0);
  if (dual_clip > 0.f && adv < 0.f) {
    const float cap = -adv * dual_clip;
    if (cap < l) {
      l = cap;
      dlogp = 0.f;
      flags |= kDualClip;
    }
  }
  t.loss = l;
  t.ratio = ratio;
  t.kl = (ratio - 1.f) - log_ratio;
  t.dlogp = dlogp;
  t.flags = flags;
  return t;
}

struct ValueToken {
  float loss;     // l
  float dvalue;   // dl/dV
  bool clipped;   // the clipped term is strictly larger
};

// has_clip false: l = 0.5*(V-R)^2.
RLHF_HD ValueToken ppo_value_token(float v, float old_v, float ret, bool has_clip, float clip) {
  ValueToken t;
  const float err = v - ret;
  const float unclipped = err * err;
  t.loss = 0.5f * unclipped;
  t.dvalue = err;
  t.clipped = false;
  if (has_clip) {
    const float vc = fminf(fmaxf(v, old_v - clip), old_v + clip);
    const float err_c = vc - ret;
    const float clipped = err_c * err_c;
    if (clipped > unclipped) {  // then vc sits on a bound: a constant, no gradient
      t.loss = 0.5f * clipped;
      t.dvalue = 0.f;
      t.clipped = true;
    }
  }
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
