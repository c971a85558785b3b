// Layouts that cross the language boundary, defined once for C++ and CUDA:
//   - the loss_agg codes of the ppo ops, and the bit layout of ppo_policy_fwd's `options`,
//   - the order of the statistics each loss op returns (one packed float32 vector),
//   - the per-row float64 partials of the one-launch PPO forwards (CUDA; Triton mirrors them).
// Python holds the same facts in rlhf_kernels/_layout.py (the torch and triton backends need
// them without the extension); _C.layout() reports this file's copy and
// tests/test_layout.py checks that the two agree.
#pragma once
#include <cstddef>
#include <cstdint>

namespace rlhf {

// loss_agg codes: the ppo ops' `int loss_agg` argument (new codes are appended).
enum LossAgg : int64_t {
  kTokenMean = 0, kSeqMeanTokenMean, kSeqMeanTokenSum, kSeqMeanTokenSumNorm, kTokenSum, kNumLossAggs
};
inline constexpr const char* kLossAggNames[kNumLossAggs] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                                            "seq-mean-token-sum-norm", "token-sum"};

// ppo_policy_fwd's `int options`: the policy loss's choices beyond clipping, packed into one
// schema argument (each schema argument costs host time on every call). Field f holds its
// code in bits [kOptionBits * f, kOptionBits * (f + 1)); code 0 of every field is the default,
// so options = 0 is the plain PPO loss. The names of each field's codes follow.
enum PolicyOptionField : int { kOptRatioLevel = 0, kOptObjective, kOptIsCorrection, kOptIsLevel, kNumOptionFields };
inline constexpr int kOptionBits = 4;
inline constexpr const char* kOptionFieldNames[kNumOptionFields] = {"ratio_level", "objective", "is_correction",
                                                                    "is_level"};
// ratio_level: each token's own ratio, or its sequence's exp(mean log-ratio) (GSPO)
enum RatioLevel : int { kRatioToken = 0, kRatioSequence, kNumRatioLevels };
inline constexpr const char* kRatioLevelNames[kNumRatioLevels] = {"token", "sequence"};
// objective: the clipped PPO surrogate, or CISPO's -sg(clip(ratio)) * A * logp
enum Objective : int { kObjectivePPO = 0, kObjectiveCISPO, kNumObjectives };
inline constexpr const char* kObjectiveNames[kNumObjectives] = {"ppo", "cispo"};
// is_correction: none (Python None), truncated (min(w, cap)) or masked (w, 0 above cap)
enum IsCorrection : int { kIsNone = 0, kIsTruncate, kIsMask, kNumIsCorrections };
inline constexpr const char* kIsCorrectionNames[kNumIsCorrections] = {"none", "tis", "mis"};
// is_level: not given (Python None: token level when a correction is on), or the level of w
enum IsLevel : int { kIsLevelUnset = 0, kIsLevelToken, kIsLevelSequence, kIsLevelGeometric, kNumIsLevels };
inline constexpr const char* kIsLevelNames[kNumIsLevels] = {"none", "token", "sequence", "geometric"};

// The code of field f in `options` (no range check: see ppo_op.h).
constexpr int option_field(int64_t options, int field) {
  return static_cast<int>((options >> (kOptionBits * field)) & ((1 << kOptionBits) - 1));
}

// ppo_policy_fwd's stats [kNumPolicyStats] (new ones are appended).
enum PolicyStat : int {
  kClipfrac = 0, kClipfracLow, kClipfracHigh, kDualClipfrac, kApproxKl, kRatioMean, kRatioMin, kRatioMax,
  kSeqClipfrac, kIsWeightMean, kIsCappedFrac, kNumPolicyStats
};
inline constexpr const char* kPolicyStatNames[kNumPolicyStats] = {
    "clipfrac",  "clipfrac_low", "clipfrac_high", "dual_clipfrac",  "approx_kl",     "ratio_mean",
    "ratio_min", "ratio_max",    "seq_clipfrac",  "is_weight_mean", "is_capped_frac"};

// ppo_value_fwd's stats [kNumValueStats].
enum ValueStat : int { kVfClipfrac = 0, kExplainedVar, kNumValueStats };
inline constexpr const char* kValueStatNames[kNumValueStats] = {"vf_clipfrac", "explained_var"};

// bt_fwd's and ranking_fwd's stats.
enum BTStat : int { kBTAccuracy = 0, kBTMarginMean, kNumBTStats };
inline constexpr const char* kBTStatNames[kNumBTStats] = {"accuracy", "margin_mean"};
enum RankingStat : int { kRankingAccuracy = 0, kNumRankingStats };
inline constexpr const char* kRankingStatNames[kNumRankingStats] = {"accuracy"};

// score_fwd's `int kind` (its code), and its stats [kNumScoreStats] per kind: both kinds pack four.
enum ScoreKind : int64_t { kScoreRegression = 0, kScoreOrdinal, kNumScoreKinds };
inline constexpr const char* kScoreKindNames[kNumScoreKinds] = {"regression", "ordinal"};
enum ScoreStat : int { kScoreFirst = 0, kScoreMae, kScorePredMean, kScorePredStd, kNumScoreStats };
// kScoreFirst is mse (regression) or accuracy (ordinal)
inline constexpr const char* kScoreRegressionStatNames[kNumScoreStats] = {"mse", "mae", "pred_mean", "pred_std"};
inline constexpr const char* kScoreOrdinalStatNames[kNumScoreStats] = {"accuracy", "mae", "pred_mean", "pred_std"};

// One row's float64 partials in the one-launch PPO forwards ([B, kPolicyParts] scratch).
// row_grad: g_b, the row's factor in the gradient beside its weight w_b (row_scale = w_b * g_b;
// 1 for the plain loss); is_weight, is_capped: sums of the applied IS weight and of the
// tokens it capped.
enum PolicyPart : int {
  kPartLoss = 0, kPartCount, kPartLow, kPartHigh, kPartDual, kPartKl, kPartRatio, kPartRatioMin, kPartRatioMax,
  kPartRowGrad, kPartIsWeight, kPartIsCapped, kPolicyParts
};
inline constexpr const char* kPolicyPartNames[kPolicyParts] = {
    "loss",  "count",     "low",       "high",     "dual",      "kl",
    "ratio", "ratio_min", "ratio_max", "row_grad", "is_weight", "is_capped"};
// Value partials: err = R - V; mean and M2 (sum of squared deviations) of R and of err.
enum ValuePart : int {
  kVPartLoss = 0, kVPartCount, kVPartClipped, kVPartMeanR, kVPartM2R, kVPartMeanErr, kVPartM2Err, kValueParts
};
inline constexpr const char* kValuePartNames[kValueParts] = {"loss", "count", "clipped", "mean_r", "m2_r",
                                                             "mean_err", "m2_err"};

// linear_policy_fwd's stats [kNumLinearPolicyStats]: ppo_policy_fwd's (kPolicyStatNames, in their
// order, whatever is appended there), then the means over valid tokens of the entropy and of the
// KL estimator (rlhf/linear_policy.h).
enum LinearPolicyStat : int { kLinearPolicyEntropy = kNumPolicyStats, kLinearPolicyKl, kNumLinearPolicyStats };
inline constexpr const char* kLinearPolicyStatNames[] = {"entropy", "kl"};
static_assert(sizeof(kLinearPolicyStatNames) / sizeof(kLinearPolicyStatNames[0]) ==
              static_cast<size_t>(kNumLinearPolicyStats) - static_cast<size_t>(kNumPolicyStats));

// linear_policy_fwd's `kl_kind`: the estimators of kl_penalty, by name (the op takes the name;
// the kernels the code).
enum KlKind : int { kKlK1 = 0, kKlK2, kKlK3, kKlAbs, kNumKlKinds };
inline constexpr const char* kKlKindNames[kNumKlKinds] = {"k1", "k2", "k3", "abs"};

}  // namespace rlhf
