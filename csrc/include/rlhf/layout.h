// Layouts that cross the language boundary, defined once for C++ and CUDA:
//   - the loss_agg codes of the ppo ops,
//   - the order of the statistics each loss op returns (one packed float32 vector),
//   - the per-row float64 partials of the one-launch PPO forwards (CUDA; Triton mirrors them).
// Python holds the same facts in rlhf_kernels/_layout.py (the torch and triton backends need
// them without the extension); _C.layout() reports this file's copy and
// tests/test_layout.py checks that the two agree.
#pragma once
#include <cstdint>

namespace rlhf {

// loss_agg codes: the ppo ops' `int loss_agg` argument.
enum LossAgg : int64_t { kTokenMean = 0, kSeqMeanTokenMean, kSeqMeanTokenSum, kSeqMeanTokenSumNorm, kNumLossAggs };
inline constexpr const char* kLossAggNames[kNumLossAggs] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                                            "seq-mean-token-sum-norm"};

// ppo_policy_fwd's stats [kNumPolicyStats].
enum PolicyStat : int {
  kClipfrac = 0, kClipfracLow, kClipfracHigh, kDualClipfrac, kApproxKl, kRatioMean, kRatioMin, kRatioMax,
  kNumPolicyStats
};
inline constexpr const char* kPolicyStatNames[kNumPolicyStats] = {
    "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"};

// ppo_value_fwd's stats [kNumValueStats].
enum ValueStat : int { kVfClipfrac = 0, kExplainedVar, kNumValueStats };
inline constexpr const char* kValueStatNames[kNumValueStats] = {"vf_clipfrac", "explained_var"};

// bt_fwd's and ranking_fwd's stats.
enum BTStat : int { kBTAccuracy = 0, kBTMarginMean, kNumBTStats };
inline constexpr const char* kBTStatNames[kNumBTStats] = {"accuracy", "margin_mean"};
enum RankingStat : int { kRankingAccuracy = 0, kNumRankingStats };
inline constexpr const char* kRankingStatNames[kNumRankingStats] = {"accuracy"};

// One row's float64 partials in the one-launch PPO forwards ([B, kPolicyParts] scratch).
enum PolicyPart : int {
  kPartLoss = 0, kPartCount, kPartLow, kPartHigh, kPartDual, kPartKl, kPartRatio, kPartRatioMin, kPartRatioMax,
  kPolicyParts
};
inline constexpr const char* kPolicyPartNames[kPolicyParts] = {"loss", "count", "low", "high", "dual", "kl", "ratio",
                                                               "ratio_min", "ratio_max"};
// Value partials: err = R - V; mean and M2 (sum of squared deviations) of R and of err.
enum ValuePart : int {
  kVPartLoss = 0, kVPartCount, kVPartClipped, kVPartMeanR, kVPartM2R, kVPartMeanErr, kVPartM2Err, kValueParts
};
inline constexpr const char* kValuePartNames[kValueParts] = {"loss", "count", "clipped", "mean_r", "m2_r",
                                                             "mean_err", "m2_err"};

}  // namespace rlhf
