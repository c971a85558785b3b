// Absolute-score reward-model loss math, used by both csrc/cpu/score.cpp and csrc/cuda/score.cu.
//   regression, e = pred - score:  l = 0.5 e^2,  dl/dpred = e
//   ordinal (cumulative-link), level y, x = pred, lower = t_{y-1} (none for y = 0), upper = t_y
//   (none for y = K-1), gap = upper - lower:
//     l = -logsigmoid(upper - x) - logsigmoid(x - lower) - log(-expm1(-gap))
//     (= -log(sigmoid(upper - x) - sigmoid(lower - x)), never as that difference)
//     dl/dx     = sigmoid(x - upper) - sigmoid(lower - x)
//     dl/dupper = -sigmoid(x - upper) - 1 / expm1(gap)
//     dl/dlower =  sigmoid(lower - x) + 1 / expm1(gap)
//   A missing bound drops its terms (and the gap's). gap = 0 gives l = +inf, gap < 0 NaN.
#pragma once
#include <math.h>
#include <stdint.h>

#include "rlhf/bt.h"  // log_sigmoid, sigmoid
#include "rlhf/common.h"

namespace rlhf {

// -log P(level | x) for a level with the given bounds (has_lower: level > 0; has_upper: level < K-1).
RLHF_HD float ordinal_nll(float x, float lower, float upper, bool has_lower, bool has_upper) {
  float l = 0.f;
  if (has_upper) l -= log_sigmoid(upper - x);
  if (has_lower) l -= log_sigmoid(x - lower);
  if (has_lower && has_upper) l -= logf(-expm1f(lower - upper));
  return l;
}

struct OrdinalGrad {
  float d_pred, d_lower, d_upper;  // d_lower / d_upper: 0 for a missing bound
};

RLHF_HD OrdinalGrad ordinal_grad(float x, float lower, float upper, bool has_lower, bool has_upper) {
  const float inv_gap = has_lower && has_upper ? 1.f / expm1f(upper - lower) : 0.f;
  OrdinalGrad g{0.f, 0.f, 0.f};
  if (has_upper) {
    const float s = sigmoid(x - upper);
    g.d_pred += s;
    g.d_upper = -s - inv_gap;
  }
  if (has_lower) {
    const float s = sigmoid(lower - x);
    g.d_pred -= s;
    g.d_lower = s + inv_gap;
  }
  return g;
}

// The most likely level (the lowest on a tie) and E[level] = sum_k sigmoid(x - t_k) under
// thresholds t [K-1].
struct OrdinalPrediction {
  int64_t level;
  float expected;
};

RLHF_HD OrdinalPrediction ordinal_predict(float x, const float* t, int64_t K) {
  OrdinalPrediction p{0, 0.f};
  float best = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float lower = k > 0 ? t[k - 1] : 0.f, upper = k < K - 1 ? t[k] : 0.f;
    const float logp = -ordinal_nll(x, lower, upper, k > 0, k < K - 1);
    if (k == 0 || logp > best) {
      best = logp;
      p.level = k;
    }
    if (k < K - 1) p.expected += sigmoid(x - upper);
  }
  return p;
}

}  // namespace rlhf
