// Critic-free advantages (group_advantages): the per-group and per-sequence math, written once
// for the CPU (csrc/cpu/group_advantages.cpp) and CUDA (csrc/cuda/group_advantages.cu) kernels.
//
// A group's statistics are float64 (count n, mean, m2 = sum of squared deviations from the
// mean; the unbiased std is sqrt(m2 / (n - 1)), as torch.std). Every mode is affine in the
// reward, adv = (r - center) * scale:
//   grpo         center = mean, scale = 1 / (std + eps)
//   dr_grpo      center = mean, scale = 1
//   rloo         center = mean, scale = n / (n - 1)     (= r - mean of the other n - 1 members)
//   reinforce++  center = mean, scale = 1, then (x - batch mean) / (batch std + eps) over the
//                members of every group that enters the batch statistics (in_batch below)
// A group of one gets scale 0 (advantage 0); a group with a NaN or infinite reward gets center
// NaN, so all of its advantages are NaN and it is left out of reinforce++'s batch statistics.
#pragma once
#include <cmath>
#include <limits>

#include "rlhf/common.h"

namespace rlhf {

// Mode codes: private to the native code (the schema takes the mode's name; group_advantages_op.h
// parses it), so no layout crosses languages.
enum AdvMode : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kReinforcePP = 3 };

struct GroupStat {
  double n, mean, m2;
};

// Chan et al.: the statistics of the union of two disjoint sets. Not associative in floating
// point, so callers merge in an order fixed by the input alone (determinism).
RLHF_HD GroupStat merge_stat(const GroupStat& x, const GroupStat& y) {
  if (y.n == 0) return x;
  if (x.n == 0) return y;
  const double n = x.n + y.n, d = y.mean - x.mean, f = y.n / n;
  return {n, x.mean + d * f, x.m2 + y.m2 + d * d * x.n * f};
}

// A group is finite when all its rewards are: the mean of finite float32 values cannot
// overflow float64, and any NaN or infinite member makes the mean NaN or infinite.
RLHF_HD bool group_finite(const GroupStat& g) { return std::isfinite(g.mean); }

// Whether the group's members enter reinforce++'s batch statistics.
RLHF_HD bool in_batch(const GroupStat& g) { return g.n >= 2 && group_finite(g); }

struct AdvAffine {
  double center, scale;  // adv = (r - center) * scale
};

RLHF_HD AdvAffine group_affine(int mode, const GroupStat& g, double eps) {
  if (!group_finite(g)) return {std::numeric_limits<double>::quiet_NaN(), 1.0};
  if (g.n < 2) return {g.mean, 0.0};
  if (mode == kGrpo) return {g.mean, 1.0 / (std::sqrt(g.m2 / (g.n - 1.0)) + eps)};
  if (mode == kRloo) return {g.mean, g.n / (g.n - 1.0)};
  return {g.mean, 1.0};  // dr_grpo; reinforce++ before the batch whitening
}

RLHF_HD double apply_affine(const AdvAffine& f, double r) { return (r - f.center) * f.scale; }

// reinforce++'s second stage, from the statistics (N, mean, M2) of x = r - group mean over the
// members of every in_batch group: x -> (x - mean) * scale. Only applied when N >= 2 (N is
// never 1: every in_batch group has two or more members).
RLHF_HD AdvAffine batch_affine(const GroupStat& b, double eps) {
  if (b.n < 2) return {0.0, 1.0};
  return {b.mean, 1.0 / (std::sqrt(b.m2 / (b.n - 1.0)) + eps)};
}

// A member's advantage from its reward, its group's statistics and (reinforce++) the batch's.
RLHF_HD double member_advantage(int mode, double r, const GroupStat& g, const AdvAffine& batch, double eps) {
  const AdvAffine f = group_affine(mode, g, eps);
  if (mode == kReinforcePP && in_batch(g)) return apply_affine(batch, r - f.center);
  return apply_affine(f, r);
}

}  // namespace rlhf
