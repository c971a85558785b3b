// Per-token PPO math, used by both csrc/cpu/ppo.cpp and csrc/cuda/ppo.cu.
// Per-token values are float32; the callers accumulate them (see each kernel file).
//
// Policy:  ratio = exp(logp - old_logp)
//          l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))
//          dual clip c (> 1): tokens with A < 0 take min(l, -A*c)
//   the options (layout.h): policy_token and what it calls (sequence ratio, CISPO, IS weight)
// Value:   l = 0.5*max((V-R)^2, (clamp(V, V_old-c, V_old+c) - R)^2)
//
// Gradients follow PyTorch's conventions on the reference (max/min/clamp), which
// agree with these branch rules everywhere except on exact ties, where both
// branches carry the same value.
//
// Every function is a template over its float type F (rlhf/common.h: float on the device, a GCC
// vector of 8 floats in the CPU loops), so comparisons give a bool or a lane mask and
// `mask ? a : b` selects per lane; nothing branches on data.
#pragma once
#include <math.h>

#include <type_traits>

#include "rlhf/common.h"
#include "rlhf/layout.h"

namespace rlhf {

template <typename F>
struct PolicyTokenT {
  F loss;   // l (times the IS weight under a correction)
  F ratio;  // the ratio the loss uses: the token's own, or its row's (ratio_level sequence)
  F kl;     // (r - 1) - log(r) of the token's own ratio r: the k3 estimator
  F dlogp;  // dl/dlogp (see policy_token for the sequence-level ratio)
  // 1 where the token counts towards clipfrac_low / clipfrac_high / dual_clipfrac, else 0
  // (0/1 floats: summed directly by the kernels)
  F is_low, is_high, is_dual;
  F is_weight;  // the applied IS weight c (1 without correction)
  F is_capped;  // 1 where the correction truncated or masked w (w > cap), else 0
};

// The policy loss's options (layout.h), decoded once per call (rlhf/ppo_op.h). The kernels
// take them as a type: PolicyOptions, read at run time, or DefaultOptions, the same fields as
// compile-time constants of the plain PPO loss (options = 0), for which every kernel then
// compiles to the code it had before the options existed.
struct PolicyOptions {
  bool seq_ratio;     // ratio_level sequence
  bool cispo;         // objective cispo
  int is_correction;  // kIsNone, kIsTruncate or kIsMask
  bool is_token;      // the IS weight per token (else one per row: sequence or geometric)
  bool is_geometric;  // the row's log w is the mean of old_logp - rollout (else the sum)
  float is_cap;       // > 1
};

struct DefaultOptions {
  static constexpr bool seq_ratio = false, cispo = false;
  static constexpr int is_correction = kIsNone;
  static constexpr bool is_token = true, is_geometric = false;
  static constexpr float is_cap = 2.f;
  DefaultOptions() = default;
  RLHF_HD explicit DefaultOptions(const PolicyOptions&) {}  // so a kernel makes its O from any call's: unread
};

// Whether the options need each row's sums over its valid tokens before its per-token losses
// (the kernels then take one more float64 pass over the row first).
template <typename O>
RLHF_HD bool has_row_is(const O& o) {
  return o.is_correction != kIsNone && !o.is_token;
}
template <typename O>
RLHF_HD bool needs_row_sums(const O& o) {
  return o.seq_ratio || has_row_is(o);
}

// PPO's clipped loss at `ratio`, and dl/dx where dratio = d ratio / dx (the ratio itself for
// x = logp; 1 for x = the ratio). dual_clip <= 0 means no dual clip.
template <typename F>
RLHF_HD_TOKEN PolicyTokenT<F> ppo_clip(F ratio, F dratio, F adv, float clip_low, float clip_high, float dual_clip) {
  PolicyTokenT<F> t;
  const F zero = splat<F>(0.f), one = splat<F>(1.f);
  const F lo = splat<F>(1.f - clip_low), hi = splat<F>(1.f + clip_high);
  const F unclipped = -adv * ratio;
  const F clipped = -adv * min_f32(max_f32(ratio, lo), hi);
  const auto clip_wins = clipped > unclipped;
  const F l = clip_wins ? clipped : unclipped;
  // d(unclipped)/dx = -A*dratio; the clipped branch is constant where it wins strictly
  const F dx = clip_wins ? zero : -adv * dratio;
  const F cap = -adv * dual_clip;
  const auto dual = (adv < zero) & (cap < l) & (dual_clip > 0.f ? -1 : 0);  // all lanes off without dual clip
  t.loss = dual ? cap : l;
  t.dlogp = dual ? zero : dx;
  // clipping can only win strictly outside [lo, hi], so a win is either low or high
  const F wins = clip_wins ? one : zero;
  t.is_low = ratio < lo ? wins : zero;
  t.is_high = wins - t.is_low;
  t.is_dual = dual ? one : zero;
  return t;
}

// CISPO at `ratio`: l = -sg(clip(ratio, 1-clip_low, 1+clip_high)) * A * logp, so dl/dlogp =
// -clip(ratio) * A. A token counts as clipped low / high where its ratio is outside the range.
template <typename F>
RLHF_HD_TOKEN PolicyTokenT<F> cispo_clip(F logp, F ratio, F adv, float clip_low, float clip_high) {
  PolicyTokenT<F> t;
  const F zero = splat<F>(0.f), one = splat<F>(1.f);
  const F lo = splat<F>(1.f - clip_low), hi = splat<F>(1.f + clip_high);
  t.dlogp = -min_f32(max_f32(ratio, lo), hi) * adv;
  t.loss = t.dlogp * logp;
  t.is_low = ratio < lo ? one : zero;
  t.is_high = ratio > hi ? one : zero;
  t.is_dual = zero;
  return t;
}

template <typename F>
struct IsWeightT {
  F weight;  // the applied weight c
  F capped;  // 1 where w > cap, else 0
};

// The behaviour weight w = exp(log_w), applied as min(w, cap) (truncate) or as w where
// w <= cap and 0 above (mask). An overflowing w (inf) is above any cap, so c stays finite.
template <typename F>
RLHF_HD_TOKEN IsWeightT<F> is_weight(F log_w, int correction, float cap) {
  const F w = exp_f32(log_w);
  const auto over = w > cap;
  const F above = splat<F>(correction == kIsMask ? 0.f : cap);
  return {over ? above : w, over ? splat<F>(1.f) : splat<F>(0.f)};
}

// One token of the policy loss under options `o`. row_ratio (s) and row_log_w are the row's
// (sequence_ratio, row_log_weight below), read only when the options use them; rollout only
// for a token-level correction. dlogp is d(c*l)/dlogp, except for the PPO loss with the
// sequence ratio, where it is d(c*l)/ds: every valid token of the row then gets the same
// gradient, (s / n) * sum_t d(c*l_t)/ds (row_grad_factor).
template <typename F, typename O>
RLHF_HD_TOKEN PolicyTokenT<F> policy_token(F logp, F old_logp, F adv, F rollout, F row_ratio, F row_log_w,
                                           float clip_low, float clip_high, float dual_clip, const O& o) {
  const F log_ratio = logp - old_logp;
  const F own = exp_f32(log_ratio);
  const F ratio = o.seq_ratio ? row_ratio : own;
  PolicyTokenT<F> t = o.cispo ? cispo_clip(logp, ratio, adv, clip_low, clip_high)
                              : ppo_clip(ratio, o.seq_ratio ? splat<F>(1.f) : ratio, adv, clip_low, clip_high,
                                         dual_clip);
  t.ratio = ratio;
  t.kl = (own - 1.f) - log_ratio;
  t.is_weight = splat<F>(1.f);
  t.is_capped = splat<F>(0.f);
  if (o.is_correction != kIsNone) {
    const IsWeightT<F> w = is_weight(o.is_token ? old_logp - rollout : row_log_w, o.is_correction, o.is_cap);
    t.loss = w.weight * t.loss;
    t.dlogp = w.weight * t.dlogp;
    t.is_weight = w.weight;
    t.is_capped = w.capped;
  }
  return t;
}

// The row's sequence ratio s = exp(mean of logp - old_logp over its valid tokens), from the
// float64 sum; 1 for a row without valid tokens. Finite for mean log-ratios up to 88.
RLHF_HD float sequence_ratio(double sum_log_ratio, double count) {
  return exp_f32(static_cast<float>(count > 0 ? sum_log_ratio / count : 0.0));
}

// The row's log w for a sequence-level correction: the float64 sum over its valid tokens of
// old_logp - rollout (sequence), or their mean (geometric). The sum may be far beyond exp's
// range: w then overflows to inf (or 0), which is_weight caps.
template <typename O>
RLHF_HD float row_log_weight(double sum_log_w, double count, const O& o) {
  return static_cast<float>(o.is_geometric ? (count > 0 ? sum_log_w / count : 0.0) : sum_log_w);
}

// g_b, the row's factor in the gradient beside its weight w_b in the loss: the backward
// gives d loss / d logp_t = grad * (w_b * g_b) * policy_grad_token(t). grad_sum is the row's
// float64 sum of policy_token's dlogp, row_weight the row's applied IS weight (is_weight of
// row_log_w; 1 without a row-level correction).
//   PPO, sequence ratio:   (s / n) * grad_sum  (ds/dlogp_t = s / n for every valid t)
//   otherwise:             row_weight, times clip(s) for CISPO with the sequence ratio
template <typename O>
RLHF_HD double row_grad_factor(const O& o, double grad_sum, double count, float row_ratio, float row_weight,
                               float clip_low, float clip_high) {
  if (o.seq_ratio && !o.cispo) return count > 0 ? static_cast<double>(row_ratio) / count * grad_sum : 0.0;
  double g = has_row_is(o) ? static_cast<double>(row_weight) : 1.0;
  if (o.seq_ratio) g *= min_f32(max_f32(row_ratio, 1.f - clip_low), 1.f + clip_high);  // as in cispo_clip
  return g;
}

// The backward's per-token factor (see row_grad_factor): what of d(c*l_t)/dlogp_t varies
// within the row.
template <typename F, typename O>
RLHF_HD_TOKEN F policy_grad_token(F logp, F old_logp, F adv, F rollout, float clip_low, float clip_high,
                                  float dual_clip, const O& o) {
  if (o.seq_ratio && !o.cispo) return splat<F>(1.f);
  F d;
  if (!o.cispo) {
    const F ratio = exp_f32(logp - old_logp);
    d = ppo_clip(ratio, ratio, adv, clip_low, clip_high, dual_clip).dlogp;
  } else {
    d = o.seq_ratio ? -adv : cispo_clip(logp, exp_f32(logp - old_logp), adv, clip_low, clip_high).dlogp;
  }
  if (o.is_correction != kIsNone && o.is_token) d = is_weight(old_logp - rollout, o.is_correction, o.is_cap).weight * d;
  return d;
}

template <typename F>
struct ValueTokenT {
  F loss;        // l
  F dvalue;      // dl/dV
  F is_clipped;  // 1 where the clipped term is strictly larger, else 0
};

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

// How the per-token losses are aggregated: loss_agg code, and the global normalizer of
// token-mean, either a float64 on the inputs' device (num_tokens) or a number (> 0), or neither.
struct Normalizer {
  int64_t agg;
  const double* num_tokens;
  double num_tokens_value;
};

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
    case kSeqMeanTokenSumNorm: return 1.0 / numel;
    default: return 1.0;  // kTokenSum
  }
}

// The forwards' combine of the rows' float64 partials [B, kParts] (layout.h) into the loss, each
// row's weight and the statistics, written once for the CPU (one thread, its rows in order) and
// CUDA (the last block: each thread a strided set of rows, then one block reduction per column).
// Rows b0, b0 + step, ... < B are this thread's; part(b, k) reads row b's column k (CUDA: from
// L2); reduce(k, x) combines x over the threads as column k (combine_part; the CPU: x itself).
// The thread with b0 = 0 writes the outputs (out: LossOutputs, rlhf/loss_op.h).
template <typename Part, typename Reduce>
struct Rows {
  int64_t b0, B, step;
  Part part;
  Reduce reduce;
  RLHF_HD double sum(double x) const { return reduce(kPartLoss, x); }
};

// The policy totals [kPolicyTotals]: each column of the partials combined over rows
// (combine_part), then the rows with a valid token and the rows with a clipped one.
enum PolicyTotal : int { kTotalRowsWith = kPolicyParts, kTotalRowsClipped, kPolicyTotals };

// A column's combine: min and max for the ratio's extremes, else the sum.
RLHF_HD double combine_part(int k, double a, double b) {
  if (k == kPartRatioMin) return b < a ? b : a;
  if (k == kPartRatioMax) return a < b ? b : a;
  return a + b;
}

RLHF_HD void init_policy_totals(double* totals) {
  RLHF_UNROLL
  for (int k = 0; k < kPolicyTotals; ++k)
    totals[k] = k == kPartRatioMin ? INFINITY : (k == kPartRatioMax ? -INFINITY : 0.0);
}

// stats [kNumPolicyStats] from the totals of every row (means over valid tokens, 0 without any).
RLHF_HD void policy_stats(const double* a, float* s) {
  const double total = a[kPartCount], n = total > 0 ? total : 1.0;
  const double rows_with = a[kTotalRowsWith] > 0 ? a[kTotalRowsWith] : 1.0;
  s[kClipfrac] = static_cast<float>((a[kPartLow] + a[kPartHigh]) / n);
  s[kClipfracLow] = static_cast<float>(a[kPartLow] / n);
  s[kClipfracHigh] = static_cast<float>(a[kPartHigh] / n);
  s[kDualClipfrac] = static_cast<float>(a[kPartDual] / n);
  s[kApproxKl] = static_cast<float>(a[kPartKl] / n);
  s[kRatioMean] = static_cast<float>(a[kPartRatio] / n);
  s[kRatioMin] = total > 0 ? static_cast<float>(a[kPartRatioMin]) : 0.f;
  s[kRatioMax] = total > 0 ? static_cast<float>(a[kPartRatioMax]) : 0.f;
  s[kSeqClipfrac] = static_cast<float>(a[kTotalRowsClipped] / rows_with);
  s[kIsWeightMean] = static_cast<float>(a[kPartIsWeight] / n);
  s[kIsCappedFrac] = static_cast<float>(a[kPartIsCapped] / n);
}

// The row weights w_b (ppo_row_weight), row_scale[b] = w_b * part(b, grad_col) (the row's factor
// in the gradient; w_b alone for grad_col < 0) and the loss sum_b w_b * loss_b. Returns the
// batch's valid tokens.
template <typename R, typename Out>
RLHF_HD double weigh_rows(const R& r, const Normalizer& norm, double numel, int grad_col, const Out& out) {
  static_assert(static_cast<int>(kPartLoss) == static_cast<int>(kVPartLoss) &&
                    static_cast<int>(kPartCount) == static_cast<int>(kVPartCount),
                "one loss and count column for both losses");
  double n = 0, with = 0;
  for (int64_t b = r.b0; b < r.B; b += r.step) {
    const double c = r.part(b, kPartCount);
    n += c;
    with += c > 0 ? 1 : 0;
  }
  const double total = r.sum(n), rows_with = r.sum(with);
  // num_tokens is read here, by the kernel: no host sync on a GPU (on the CPU, a CPU tensor)
  const double nt = norm.num_tokens ? *norm.num_tokens : norm.num_tokens_value;
  double loss = 0;
  for (int64_t b = r.b0; b < r.B; b += r.step) {
    const double w = ppo_row_weight(norm.agg, r.part(b, kPartCount), total, rows_with, numel, nt);
    out.row_scale[b] = static_cast<float>(grad_col >= 0 ? w * r.part(b, grad_col) : w);
    loss += w * r.part(b, kPartLoss);
  }
  loss = r.sum(loss);
  if (r.b0 == 0) *out.loss = static_cast<float>(loss);
  return total;
}

// The combine of the loss whose partials have kParts columns: kPolicyParts (row_scale = w_b * g_b,
// the statistics from the totals) or kValueParts (row_scale = w_b; vf_clipfrac, and explained_var
// = 1 - M2(R - V) / M2(R), each M2 over the batch = the rows' M2 (within) plus count * (row mean -
// batch mean)^2 (between rows, a second pass with the batch means)).
template <int kParts, typename R, typename Out>
RLHF_HD void combine_rows(const R& r, const Normalizer& norm, double numel, const Out& out) {
  if constexpr (kParts == kPolicyParts) {
    weigh_rows(r, norm, numel, kPartRowGrad, out);
    double a[kPolicyTotals];
    init_policy_totals(a);
    for (int64_t b = r.b0; b < r.B; b += r.step) {
      RLHF_UNROLL
      for (int k = 0; k < kPolicyParts; ++k) a[k] = combine_part(k, a[k], r.part(b, k));
      a[kTotalRowsWith] += r.part(b, kPartCount) > 0 ? 1 : 0;
      a[kTotalRowsClipped] += r.part(b, kPartLow) + r.part(b, kPartHigh) > 0 ? 1 : 0;
    }
    RLHF_UNROLL
    for (int k = 0; k < kPolicyTotals; ++k) a[k] = r.reduce(k, a[k]);
    if (r.b0 == 0) policy_stats(a, out.stats);
  } else {
    const double total = weigh_rows(r, norm, numel, -1, out), n = total > 0 ? total : 1.0;
    double mean_r = 0, mean_e = 0, clipped = 0;
    for (int64_t b = r.b0; b < r.B; b += r.step) {
      mean_r += r.part(b, kVPartCount) * r.part(b, kVPartMeanR);
      mean_e += r.part(b, kVPartCount) * r.part(b, kVPartMeanErr);
      clipped += r.part(b, kVPartClipped);
    }
    mean_r = r.sum(mean_r) / n;
    mean_e = r.sum(mean_e) / n;
    clipped = r.sum(clipped);
    double m2_r = 0, m2_e = 0;
    for (int64_t b = r.b0; b < r.B; b += r.step) {
      const double c = r.part(b, kVPartCount);
      const double dr = r.part(b, kVPartMeanR) - mean_r, de = r.part(b, kVPartMeanErr) - mean_e;
      m2_r += r.part(b, kVPartM2R) + c * dr * dr;
      m2_e += r.part(b, kVPartM2Err) + c * de * de;
    }
    m2_r = r.sum(m2_r);
    m2_e = r.sum(m2_e);
    if (r.b0 != 0) return;
    out.stats[kVfClipfrac] = static_cast<float>(clipped / n);
    out.stats[kExplainedVar] = m2_r > 0 ? static_cast<float>(1.0 - m2_e / m2_r) : 0.f;  // the 1/n cancels
  }
}

}  // namespace rlhf
