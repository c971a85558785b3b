// Reward-model loss math, used by both csrc/cpu/bt.cpp and csrc/cuda/bt.cu.
//   Bradley-Terry with label smoothing eps, d = chosen - rejected - margin:
//     l(d) = -(1-eps)*logsigmoid(d) - eps*logsigmoid(-d),   dl/dd = sigmoid(d) - (1-eps)
//   Ranking pair (i better than j): l = -logsigmoid(r_i - r_j), dl/dr_i = -sigmoid(r_j - r_i)
#pragma once
#include <math.h>

#include "rlhf/common.h"

namespace rlhf {

// log(sigmoid(x)) without overflow: min(x, 0) - log1p(exp(-|x|)).
RLHF_HD float log_sigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }

// sigmoid(x) without overflow for either sign.
RLHF_HD float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

RLHF_HD float bt_pair_loss(float d, float eps) { return -(1.f - eps) * log_sigmoid(d) - eps * log_sigmoid(-d); }

RLHF_HD float bt_pair_grad(float d, float eps) { return sigmoid(d) - (1.f - eps); }

}  // namespace rlhf
