// PPO policy and value losses on the CPU: the launchers behind rlhf/ppo_op.h (the host side,
// row_scale), over rlhf/ppo.h (the per-token math, the options' instantiations, the combine).
// Rows run in parallel (at::parallel_for); each row leaves float64 partial sums, which
// are combined in row order afterwards, so results do not depend on the thread count.
//
// Every loop runs on 8-token vectors through the per-token math of rlhf/ppo.h (rlhf/cpu_vec.h:
// the AVX2 clone, the padded tail, float32 block sums flushed into float64 lanes). Masked tokens
// are selected away, never multiplied, so NaN or inf there changes nothing. The value loss's
// variances take a second pass over the row (still in cache) with float64 deviations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "rlhf/cpu_vec.h"  // before ppo.h: silences -Wpsabi for its vector templates too
#include "rlhf/ppo.h"
#include "rlhf/ppo_op.h"

namespace rlhf {
namespace {

// The rows' float64 partials [B, kParts], rows in parallel (row(i, out) fills those of the row
// whose tokens start at i), then their combine (rlhf/ppo.h) in row order.
template <int kParts, typename Args, typename Row>
void forward_rows(const Args& p, const Normalizer& norm, const LossOutputs& out, Row row) {
  std::vector<double> parts(p.B * kParts);
  for_rows(p.B, p.T, [&](int64_t b) { row(b * p.T, parts.data() + b * kParts); });
  const auto part = [&](int64_t b, int k) { return parts[b * kParts + k]; };
  const auto reduce = [](int, double x) { return x; };  // one thread: nothing to combine
  combine_rows<kParts>(Rows{int64_t{0}, p.B, int64_t{1}, part, reduce}, norm, static_cast<double>(p.B * p.T), out);
}

// d x over every row: row(i, s) writes that of the row whose tokens start at i, s = grad * row_scale.
template <typename Args, typename Row>
void backward_rows(const Args& p, const float* grad, const float* row_scale, Row row) {
  const float g = *grad;
  for_rows(p.B, p.T, [&](int64_t b) { row(b * p.T, g * row_scale[b]); });
}

// The float32 lane sums of a policy row: the partials' first columns, loss to ratio, in their
// order, then the options' applied IS weight and capped tokens (the sequence-level PPO
// gradient's sum of dl/ds goes straight into float64 lanes: it may cancel between signs).
enum { kPolicySums = kPartRatio + 1, kIsWeight = kPolicySums, kIsCapped, kOptionSums };

template <typename O>
constexpr bool is_plain = std::is_same_v<O, DefaultOptions>;

template <typename O>
struct PolicyAcc {
  LaneSums<is_plain<O> ? static_cast<int>(kPolicySums) : static_cast<int>(kOptionSums)> s;
  VecF rmin = splat<VecF>(std::numeric_limits<float>::infinity());
  VecF rmax = splat<VecF>(-std::numeric_limits<float>::infinity());
  VecD4 grad[2] = {};  // the sequence-level PPO loss's sum of d(c*l)/ds
  // x: the vector's logp, old_logp, adv and rollout (the plain loss reads no rollout); row_ratio,
  // row_log_w: the row's s and log w in every lane (read only by the options using them)
  RLHF_INLINE void add(const VecF* x, VecI valid, VecF row_ratio, VecF row_log_w, float cl, float ch, float dc,
                       const O& o) {
    const VecF zero = splat<VecF>(0.f), inf = splat<VecF>(std::numeric_limits<float>::infinity());
    const PolicyTokenT<VecF> t = policy_token(x[0], x[1], x[2], is_plain<O> ? zero : x[is_plain<O> ? 0 : 3], row_ratio,
                                              row_log_w, cl, ch, dc, o);
    const VecF col[kOptionSums] = {t.loss, splat<VecF>(1.f), t.is_low, t.is_high, t.is_dual,
                                   t.kl,   t.ratio,          t.is_weight, t.is_capped};
    RLHF_UNROLL
    for (int k = 0; k < (is_plain<O> ? kPolicySums : kOptionSums); ++k) s.f[k] += valid ? col[k] : zero;
    rmin = min_f32(rmin, valid ? t.ratio : inf);
    rmax = max_f32(rmax, valid ? t.ratio : -inf);
    if (!is_plain<O> && o.seq_ratio && !o.cispo) add_lanes_f64(grad, valid ? t.dlogp : zero);
  }
};

// A row's float64 sums over its valid tokens of logp - old_logp, of old_logp - rollout (each
// difference exact in float64) and of 1, in s: 4 tokens a step, then the rest, in a fixed order.
RLHF_CPU_CLONES void row_sums(const float* lp, const float* olp, const float* roll, const uint8_t* m, int64_t T,
                              double (&s)[3]) {
  VecD4 acc[3] = {};
  const VecD4 zero = {}, one = {1, 1, 1, 1};
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    const VecD4 a = __builtin_convertvector(load<VecF4>(lp + t), VecD4);
    const VecD4 b = __builtin_convertvector(load<VecF4>(olp + t), VecD4);
    const VecD4 c = __builtin_convertvector(load<VecF4>(roll + t), VecD4);
    const VecL4 valid = __builtin_convertvector(load<VecM4>(m + t), VecL4) != 0;
    acc[0] += valid ? a - b : zero;
    acc[1] += valid ? b - c : zero;
    acc[2] += valid ? one : zero;
  }
  for (int k = 0; k < 3; ++k) s[k] = lane_total(acc[k]);
  for (; t < T; ++t) {
    if (!m[t]) continue;
    s[0] += static_cast<double>(lp[t]) - olp[t];
    s[1] += static_cast<double>(olp[t]) - roll[t];
    s[2] += 1;
  }
}

// One row of T tokens: its float64 partials over the valid ones, out [kPolicyParts]. roll: the
// row's rollout log-probabilities (any readable row when there is no correction: then never used).
template <typename O>
RLHF_CPU_CLONES void policy_row(const float* lp, const float* olp, const float* adv, const float* roll,
                                const uint8_t* m, int64_t T, float cl, float ch, float dc, const O& o, double* out) {
  float ratio_s = 1.f, log_w = 0.f;
  if (needs_row_sums(o)) {
    double s[3];
    row_sums(lp, olp, roll, m, T, s);
    if (o.seq_ratio) ratio_s = sequence_ratio(s[0], s[2]);
    if (has_row_is(o)) log_w = row_log_weight(s[1], s[2], o);
  }
  const VecF rr = splat<VecF>(ratio_s), rlw = splat<VecF>(log_w);
  const float* src[4] = {lp, olp, adv, roll};
  PolicyAcc<O> a;
  const auto add = [&](const VecF* x, VecI valid, int64_t, int64_t) RLHF_INLINE_LAMBDA {
    a.add(x, valid, rr, rlw, cl, ch, dc, o);
  };
  for_vectors<is_plain<O> ? 3 : 4>(src, m, T, add, [&] { a.s.flush(); });
  for (int k = 0; k < kPolicySums; ++k) out[k] = a.s.total(k);
  float rmin = std::numeric_limits<float>::infinity(), rmax = -rmin;
  for (int j = 0; j < kW; ++j) {
    rmin = min_f32(rmin, a.rmin[j]);
    rmax = max_f32(rmax, a.rmax[j]);
  }
  out[kPartRatioMin] = rmin;
  out[kPartRatioMax] = rmax;
  if constexpr (is_plain<O>) {  // g_b = 1, every applied weight 1, nothing capped
    out[kPartRowGrad] = 1;
    out[kPartIsWeight] = out[kPartCount];
    out[kPartIsCapped] = 0;
  } else {
    out[kPartIsWeight] = a.s.total(kIsWeight);
    out[kPartIsCapped] = a.s.total(kIsCapped);
    const float row_weight = has_row_is(o) ? is_weight(log_w, o.is_correction, o.is_cap).weight : 1.f;
    out[kPartRowGrad] = row_grad_factor(o, lane_total(a.grad), out[kPartCount], ratio_s, row_weight, cl, ch);
  }
}

// out = scale * dl/dlogp over a row (the plain loss reads no rollout row).
template <typename O>
RLHF_CPU_CLONES void policy_grad_row(const float* lp, const float* olp, const float* adv, const float* roll,
                                     const uint8_t* m, int64_t T, float cl, float ch, float dc, float scale,
                                     const O& o, float* out) {
  const float* src[4] = {lp, olp, adv, roll};
  const VecF zero = splat<VecF>(0.f);
  map_row<is_plain<O> ? 3 : 4>(src, m, T, out, [&](const VecF* x, VecI valid) RLHF_INLINE_LAMBDA {
    const VecF d = policy_grad_token(x[0], x[1], x[2], is_plain<O> ? zero : x[is_plain<O> ? 0 : 3], cl, ch, dc, o);
    return valid ? scale * d : zero;
  });
}

// f(DefaultOptions{}) for the plain loss, f(p.opt) under options.
template <typename F>
void with_options(const PolicyArgs& p, F f) {
  if (p.plain) {
    f(DefaultOptions{});
  } else {
    f(p.opt);
  }
}

// The float32 lane sums of a value row: the partials' first columns, loss, count and clipped.
enum { kValueSums = kVPartClipped + 1 };

// The sums of R and R - V go straight into float64 lanes: with float32 blocks their means
// would be rounded, and a constant R must give Var(R) = 0 exactly.
struct ValueAcc {
  LaneSums<kValueSums> s;
  VecD4 ret[2] = {}, err[2] = {};
  RLHF_INLINE void add(VecF v, VecF ov, VecF R, VecI valid, bool has_clip, float c) {
    const ValueTokenT<VecF> t = ppo_value_token(v, ov, R, has_clip, c);
    const VecF zero = splat<VecF>(0.f);
    s.f[kVPartLoss] += valid ? t.loss : zero;
    s.f[kVPartClipped] += valid ? t.is_clipped : zero;
    s.f[kVPartCount] += valid ? splat<VecF>(1.f) : zero;
    add_lanes_f64(ret, valid ? R : zero);
    add_lanes_f64(err, valid ? R - v : zero);
  }
};

// Sums of squared float64 deviations of R and of R - V from their means, 4 tokens a step.
struct DeviationAcc {
  VecD4 qr = {}, qe = {};
  RLHF_INLINE void add(VecF4 v4, VecF4 R4, VecM4 m4, double mean_r, double mean_e) {
    const VecD4 v = __builtin_convertvector(v4, VecD4), R = __builtin_convertvector(R4, VecD4);
    const VecL4 valid = __builtin_convertvector(m4, VecL4) != 0;
    const VecD4 dr = R - mean_r, de = (R - v) - mean_e, zero = {};
    qr += valid ? dr * dr : zero;
    qe += valid ? de * de : zero;
  }
};

// One row of T tokens: its float64 partials over the valid ones, out [kValueParts].
RLHF_CPU_CLONES void value_row(const float* v, const float* ov, const float* R, const uint8_t* m, int64_t T,
                               bool has_clip, float c, double* out) {
  ValueAcc a;
  const float* src[3] = {v, ov, R};
  const auto add = [&](const VecF* x, VecI valid, int64_t, int64_t) RLHF_INLINE_LAMBDA {
    a.add(x[0], x[1], x[2], valid, has_clip, c);
  };
  for_vectors<3>(src, m, T, add, [&] { a.s.flush(); });
  const int64_t body = T - T % kW;
  const Tail<3> tail(src, m, body, T - body);
  for (int k = 0; k < kValueSums; ++k) out[k] = a.s.total(k);
  const double n = out[kVPartCount];
  out[kVPartMeanR] = out[kVPartM2R] = out[kVPartMeanErr] = out[kVPartM2Err] = 0;
  if (n == 0) return;
  const double mean_r = lane_total(a.ret) / n, mean_e = lane_total(a.err) / n;
  DeviationAcc q;  // second pass over the row, still in cache
  for (int64_t t0 = 0; t0 < body; t0 += 4)
    q.add(load<VecF4>(v + t0), load<VecF4>(R + t0), load<VecM4>(m + t0), mean_r, mean_e);
  for (int j = 0; body + j < T; j += 4)
    q.add(load<VecF4>(tail.x[0] + j), load<VecF4>(tail.x[2] + j), load<VecM4>(tail.m + j), mean_r, mean_e);
  out[kVPartMeanR] = mean_r;
  out[kVPartM2R] = lane_total(q.qr);
  out[kVPartMeanErr] = mean_e;
  out[kVPartM2Err] = lane_total(q.qe);
}

// out = scale * dl/dV over a row.
RLHF_CPU_CLONES void value_grad_row(const float* v, const float* ov, const float* R, const uint8_t* m, int64_t T,
                                    bool has_clip, float c, float scale, float* out) {
  const float* src[3] = {v, ov, R};
  map_row<3>(src, m, T, out, [&](const VecF* x, VecI valid) RLHF_INLINE_LAMBDA {
    return valid ? scale * ppo_value_token(x[0], x[1], x[2], has_clip, c).dvalue : splat<VecF>(0.f);
  });
}

// The device launchers of rlhf/ppo_op.h (which checks, converts and allocates).
struct CpuPPO {
  static void policy_forward(const PolicyArgs& p, const Normalizer& norm, const LossOutputs& out, const at::Tensor&) {
    const auto* m = reinterpret_cast<const uint8_t*>(p.mask);
    const float* roll = p.rollout ? p.rollout : p.old_logp;
    with_options(p, [&](const auto& o) {
      forward_rows<kPolicyParts>(p, norm, out, [&](int64_t i, double* row) {
        policy_row(p.logp + i, p.old_logp + i, p.adv + i, roll + i, m + i, p.T, p.clip_low, p.clip_high, p.dual_clip,
                   o, row);
      });
    });
  }

  static void policy_backward(const PolicyArgs& p, const float* grad, const float* row_scale, float* out,
                              const at::Tensor&) {
    const float* roll = p.rollout ? p.rollout : p.old_logp;
    with_options(p, [&](const auto& o) {
      backward_rows(p, grad, row_scale, [&](int64_t i, float s) {
        policy_grad_row(p.logp + i, p.old_logp + i, p.adv + i, roll + i, reinterpret_cast<const uint8_t*>(p.mask) + i,
                        p.T, p.clip_low, p.clip_high, p.dual_clip, s, o, out + i);
      });
    });
  }

  static void value_forward(const ValueArgs& p, const Normalizer& norm, const LossOutputs& out, const at::Tensor&) {
    forward_rows<kValueParts>(p, norm, out, [&](int64_t i, double* row) {
      value_row(p.values + i, p.old_values + i, p.returns + i, reinterpret_cast<const uint8_t*>(p.mask) + i, p.T,
                p.has_clip, p.clip, row);
    });
  }

  static void value_backward(const ValueArgs& p, const float* grad, const float* row_scale, float* out,
                             const at::Tensor&) {
    backward_rows(p, grad, row_scale, [&](int64_t i, float s) {
      value_grad_row(p.values + i, p.old_values + i, p.returns + i, reinterpret_cast<const uint8_t*>(p.mask) + i,
                     p.T, p.has_clip, p.clip, s, out + i);
    });
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_fwd", &rlhf::ppo_policy_forward_plain<rlhf::CpuPPO>);
  m.impl("ppo_policy_options_fwd", &rlhf::ppo_policy_forward<rlhf::CpuPPO>);
  m.impl("ppo_policy_bwd", &rlhf::ppo_policy_backward<rlhf::CpuPPO>);
  m.impl("ppo_value_fwd", &rlhf::ppo_value_forward<rlhf::CpuPPO>);
  m.impl("ppo_value_bwd", &rlhf::ppo_value_backward<rlhf::CpuPPO>);
}
