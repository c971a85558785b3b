// PPO policy and value losses on the CPU.
// Rows run in parallel (at::parallel_for); each row leaves float64 partial sums, which
// are combined in row order afterwards, so results do not depend on the thread count.
// The forward also returns each row's weight in the aggregated loss (row_scale [B]);
// the backward is then elementwise: d_x[b, t] = grad * row_scale[b] * dl/dx[b, t].
// The policy loss's options (rlhf/ppo.h) run in a second instantiation of the same loops
// (PolicyOptions read at run time); the plain loss (options = 0) runs DefaultOptions, whose
// constant fields leave exactly the code of the plain loss. Options that need a row's sums
// (the sequence ratio, a sequence-level IS weight) take a float64 pass over the row first.
//
// Every loop runs on 8-token vectors (GCC vector extensions; an AVX2 clone picked at load
// time, the baseline clone uses SSE pairs) through the per-token math of rlhf/ppo.h; the
// last partial vector of a row is padded with masked tokens. Masked tokens are selected
// away, never multiplied, so NaN or inf there changes nothing. Sums: each of the 8 lanes
// adds float32 terms over a block of kBlockVecs vectors (at most kBlockVecs terms per lane),
// then the block goes into float64 lanes, summed in a fixed order per row. The value
// loss's sums of R and R - V go straight into float64 lanes, and its variances take a
// second pass over the row (still in cache) with float64 deviations from those means.
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

typedef int32_t VecI4 __attribute__((vector_size(16)));
typedef int64_t VecL2 __attribute__((vector_size(16)));
typedef float VecF4 __attribute__((vector_size(16)));
typedef double VecD4 __attribute__((vector_size(32)));
typedef int64_t VecL4 __attribute__((vector_size(32)));
typedef uint8_t VecM4 __attribute__((vector_size(4)));
constexpr int kBlockVecs = 16;   // vectors per float32 block: 16 terms per lane before the float64 flush

#define RLHF_INLINE __attribute__((always_inline)) inline
#define RLHF_INLINE_LAMBDA __attribute__((always_inline))

template <typename V>
RLHF_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 8 mask bytes -> int32 lane mask (-1 where the token counts). Each lane tests its own byte
// of the two words, spread over the lanes by one permute (vmovq + vpermd with AVX2; GCC
// turns a byte -> int32 __builtin_convertvector into scalar inserts, and a vector built
// from scalars into a trip through the stack).
RLHF_INLINE VecI load_mask(const uint8_t* m) {
  const VecL2 both = {load<int64_t>(m), 0};
  const VecI4 words = reinterpret_cast<VecI4>(both);
  const VecI spread = __builtin_shufflevector(words, words, 0, 0, 0, 0, 1, 1, 1, 1);
  const VecI bytes = {0xff, 0xff00, 0xff0000, int32_t(0xff000000u), 0xff, 0xff00, 0xff0000, int32_t(0xff000000u)};
  return (spread & bytes) != 0;
}

// The row's last T % 8 tokens, padded to a full vector with masked (and finite) tokens.
template <int N>
struct Tail {
  alignas(32) float x[N][kW];
  alignas(8) uint8_t m[kW];
  Tail(const float* const* src, const uint8_t* mask, int64_t t0, int64_t n) {
    std::memset(x, 0, sizeof x);
    std::memset(m, 0, sizeof m);
    for (int k = 0; k < N; ++k) std::memcpy(x[k], src[k] + t0, n * sizeof(float));
    std::memcpy(m, mask + t0, n);
  }
};

// f(b) for every row b of a [B, T] batch, rows in parallel (about 16k tokens a task).
template <typename F>
void for_rows(int64_t B, int64_t T, F f) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// Row weights from the per-row valid counts, and the loss sum_b w_b * row_sum_b. row_scale[b] =
// w_b * row_grad[b] (row_grad: each row's factor in the gradient, rlhf/ppo.h; null: 1).
double aggregate_rows(const std::vector<double>& row_sum, const std::vector<double>& row_count, int64_t agg,
                      double numel, double num_tokens, float* row_scale, const double* row_grad = nullptr) {
  double total = 0, rows_with = 0;
  for (size_t b = 0; b < row_count.size(); ++b) {
    total += row_count[b];
    rows_with += row_count[b] > 0 ? 1 : 0;
  }
  double loss = 0;
  for (size_t b = 0; b < row_count.size(); ++b) {
    const double w = ppo_row_weight(agg, row_count[b], total, rows_with, numel, num_tokens);
    row_scale[b] = static_cast<float>(row_grad ? w * row_grad[b] : w);
    loss += w * row_sum[b];
  }
  return loss;
}

// N running sums of 8 float32 lanes over a block, flushed into 8 float64 lanes each.
template <int N>
struct LaneSums {
  VecF f[N];
  double d[N][kW] = {};
  LaneSums() { clear(); }
  RLHF_INLINE void clear() {
    for (int k = 0; k < N; ++k) f[k] = splat<VecF>(0.f);
  }
  RLHF_INLINE void flush() {
    for (int k = 0; k < N; ++k)
      for (int j = 0; j < kW; ++j) d[k][j] += f[k][j];
    clear();
  }
  double total(int k) const {  // after the last flush; fixed lane order
    double s = 0;
    for (int j = 0; j < kW; ++j) s += d[k][j];
    return s;
  }
};

// Calls add(t) for every full 8-token vector of a row, in order, with a flush of the float32
// sums after every kBlockVecs vectors (so at most kBlockVecs terms per lane, the partial last
// vector included, before the caller's final flush). Returns where the partial vector starts.
template <int N, typename Add>
RLHF_INLINE int64_t for_blocks(LaneSums<N>& s, int64_t T, Add& add) {
  constexpr int64_t kBlock = kW * kBlockVecs;
  int64_t t0 = 0;
  for (; t0 + kBlock <= T; t0 += kBlock) {
    for (int64_t t = t0; t < t0 + kBlock; t += kW) add(t);
    s.flush();
  }
  for (; t0 + kW <= T; t0 += kW) add(t0);
  return t0;
}

double lane_total(const VecD4 (&x)[2]) {  // fixed order
  double s = 0;
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) s += x[h][j];
  return s;
}

struct PolicyRow {
  double loss = 0, count = 0, low = 0, high = 0, dual = 0, kl = 0, ratio = 0;
  float rmin = std::numeric_limits<float>::infinity(), rmax = -std::numeric_limits<float>::infinity();
  double row_grad = 1, is_weight = 0, is_capped = 0;  // the plain loss: 1, count, 0
};

enum { kLoss, kCount, kLow, kHigh, kDual, kKl, kRatio, kPolicySums };
// the options' extra sums: the applied IS weight and the capped tokens (the sequence-level PPO
// gradient's sum of dl/ds goes straight into float64 lanes: it may cancel between signs)
enum { kIsWeight = kPolicySums, kIsCapped, kOptionSums };

template <typename O>
constexpr bool is_plain = std::is_same_v<O, DefaultOptions>;

template <typename O>
struct PolicyAcc {
  LaneSums<is_plain<O> ? static_cast<int>(kPolicySums) : static_cast<int>(kOptionSums)> s;
  VecF rmin = splat<VecF>(std::numeric_limits<float>::infinity());
  VecF rmax = splat<VecF>(-std::numeric_limits<float>::infinity());
  VecD4 grad[2] = {};  // the sequence-level PPO loss's sum of d(c*l)/ds
  // row_ratio, row_log_w: the row's s and log w in every lane (read only by the options using them)
  RLHF_INLINE void add(VecF lp, VecF olp, VecF adv, VecF roll, VecI valid, VecF row_ratio, VecF row_log_w, float cl,
                       float ch, float dc, const O& o) {
    const PolicyTokenT<VecF> t = policy_token(lp, olp, adv, roll, row_ratio, row_log_w, cl, ch, dc, o);
    const VecF zero = splat<VecF>(0.f), inf = splat<VecF>(std::numeric_limits<float>::infinity());
    s.f[kLoss] += valid ? t.loss : zero;
    s.f[kCount] += valid ? splat<VecF>(1.f) : zero;
    s.f[kLow] += valid ? t.is_low : zero;
    s.f[kHigh] += valid ? t.is_high : zero;
    s.f[kDual] += valid ? t.is_dual : zero;
    s.f[kKl] += valid ? t.kl : zero;
    s.f[kRatio] += valid ? t.ratio : zero;
    rmin = min_f32(rmin, valid ? t.ratio : inf);
    rmax = max_f32(rmax, valid ? t.ratio : -inf);
    if constexpr (!is_plain<O>) {
      s.f[kIsWeight] += valid ? t.is_weight : zero;
      s.f[kIsCapped] += valid ? t.is_capped : zero;
      if (o.seq_ratio && !o.cispo) {
        const VecF d = valid ? t.dlogp : zero;
        grad[0] += __builtin_convertvector(__builtin_shufflevector(d, d, 0, 1, 2, 3), VecD4);
        grad[1] += __builtin_convertvector(__builtin_shufflevector(d, d, 4, 5, 6, 7), VecD4);
      }
    }
  }
};

// A row's float64 sums over its valid tokens of logp - old_logp and of old_logp - rollout
// (each difference exact in float64), 4 tokens a step, then the rest, in a fixed order.
struct RowSums {
  double log_ratio = 0, log_w = 0, count = 0;
};

RLHF_CPU_CLONES RowSums row_sums(const float* lp, const float* olp, const float* roll, const uint8_t* m, int64_t T) {
  VecD4 lr = {}, lw = {}, n = {};
  const VecD4 zero = {}, one = {1, 1, 1, 1};
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    const VecD4 a = __builtin_convertvector(load<VecF4>(lp + t), VecD4);
    const VecD4 b = __builtin_convertvector(load<VecF4>(olp + t), VecD4);
    const VecD4 c = __builtin_convertvector(load<VecF4>(roll + t), VecD4);
    const VecL4 valid = __builtin_convertvector(load<VecM4>(m + t), VecL4) != 0;
    lr += valid ? a - b : zero;
    lw += valid ? b - c : zero;
    n += valid ? one : zero;
  }
  RowSums r;
  for (int j = 0; j < 4; ++j) {
    r.log_ratio += lr[j];
    r.log_w += lw[j];
    r.count += n[j];
  }
  for (; t < T; ++t) {
    if (!m[t]) continue;
    r.log_ratio += static_cast<double>(lp[t]) - olp[t];
    r.log_w += static_cast<double>(olp[t]) - roll[t];
    r.count += 1;
  }
  return r;
}

// One row of T tokens: float64 partial sums over the valid ones. roll: the row's rollout
// log-probabilities (any readable row when there is no correction: then never used).
template <typename O>
RLHF_CPU_CLONES PolicyRow policy_row(const float* lp, const float* olp, const float* adv, const float* roll,
                                     const uint8_t* m, int64_t T, float cl, float ch, float dc, const O& o) {
  float ratio_s = 1.f, log_w = 0.f;
  if (needs_row_sums(o)) {
    const RowSums pre = row_sums(lp, olp, roll, m, T);
    if (o.seq_ratio) ratio_s = sequence_ratio(pre.log_ratio, pre.count);
    if (has_row_is(o)) log_w = row_log_weight(pre.log_w, pre.count, o);
  }
  const VecF rr = splat<VecF>(ratio_s), rlw = splat<VecF>(log_w), zero = splat<VecF>(0.f);
  PolicyAcc<O> a;
  auto add = [&](int64_t t) RLHF_INLINE_LAMBDA {
    a.add(load<VecF>(lp + t), load<VecF>(olp + t), load<VecF>(adv + t), is_plain<O> ? zero : load<VecF>(roll + t),
          load_mask(m + t), rr, rlw, cl, ch, dc, o);
  };
  const int64_t t0 = for_blocks(a.s, T, add);
  if (t0 < T) {
    const float* src[4] = {lp, olp, adv, roll};
    const Tail<is_plain<O> ? 3 : 4> tail(src, m, t0, T - t0);
    a.add(load<VecF>(tail.x[0]), load<VecF>(tail.x[1]), load<VecF>(tail.x[2]),
          is_plain<O> ? zero : load<VecF>(tail.x[is_plain<O> ? 0 : 3]), load_mask(tail.m), rr, rlw, cl, ch, dc, o);
  }
  a.s.flush();
  PolicyRow r;
  r.loss = a.s.total(kLoss);
  r.count = a.s.total(kCount);
  r.low = a.s.total(kLow);
  r.high = a.s.total(kHigh);
  r.dual = a.s.total(kDual);
  r.kl = a.s.total(kKl);
  r.ratio = a.s.total(kRatio);
  for (int j = 0; j < kW; ++j) {
    r.rmin = min_f32(r.rmin, a.rmin[j]);
    r.rmax = max_f32(r.rmax, a.rmax[j]);
  }
  if constexpr (is_plain<O>) {
    r.is_weight = r.count;
  } else {
    r.is_weight = a.s.total(kIsWeight);
    r.is_capped = a.s.total(kIsCapped);
    const float row_weight = has_row_is(o) ? is_weight(log_w, o.is_correction, o.is_cap).weight : 1.f;
    r.row_grad = row_grad_factor(o, lane_total(a.grad), r.count, ratio_s, row_weight, cl, ch);
  }
  return r;
}

template <typename O>
RLHF_INLINE VecF policy_grad(VecF lp, VecF olp, VecF adv, VecF roll, VecI valid, float cl, float ch, float dc,
                             float scale, const O& o) {
  const VecF d = policy_grad_token(lp, olp, adv, roll, cl, ch, dc, o);
  return valid ? scale * d : splat<VecF>(0.f);
}

template <typename O>
RLHF_CPU_CLONES void policy_grad_row(const float* lp, const float* olp, const float* adv, const float* roll,
                                     const uint8_t* m, int64_t T, float cl, float ch, float dc, float scale,
                                     const O& o, float* out) {
  const VecF zero = splat<VecF>(0.f);
  int64_t t0 = 0;
  for (; t0 + kW <= T; t0 += kW) {
    const VecF d = policy_grad(load<VecF>(lp + t0), load<VecF>(olp + t0), load<VecF>(adv + t0),
                               is_plain<O> ? zero : load<VecF>(roll + t0), load_mask(m + t0), cl, ch, dc, scale, o);
    std::memcpy(out + t0, &d, sizeof d);
  }
  if (t0 < T) {
    const float* src[4] = {lp, olp, adv, roll};
    const Tail<is_plain<O> ? 3 : 4> tail(src, m, t0, T - t0);
    const VecF d = policy_grad(load<VecF>(tail.x[0]), load<VecF>(tail.x[1]), load<VecF>(tail.x[2]),
                               is_plain<O> ? zero : load<VecF>(tail.x[is_plain<O> ? 0 : 3]), load_mask(tail.m), cl,
                               ch, dc, scale, o);
    std::memcpy(out + t0, &d, (T - t0) * sizeof(float));
  }
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

// Count, mean and sum of squared deviations of a set; merged with Chan's formula.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  Moments r;
  r.n = a.n + b.n;
  const double delta = b.mean - a.mean;
  r.mean = a.mean + delta * (b.n / r.n);
  r.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / r.n);
  return r;
}

struct ValueRow {
  double loss = 0, clipped = 0;
  Moments ret, err;  // of R and of R - V
};

enum { kVLoss, kVClipped, kVCount, kValueSums };

// The sums of R and R - V go straight into float64 lanes: with float32 blocks their means
// would be rounded, and a constant R must give Var(R) = 0 exactly.
struct ValueAcc {
  LaneSums<kValueSums> s;
  VecD4 ret[2] = {}, err[2] = {};
  RLHF_INLINE void add(VecF v, VecF ov, VecF R, VecI valid, bool has_clip, float c) {
    const ValueTokenT<VecF> t = ppo_value_token(v, ov, R, has_clip, c);
    const VecF zero = splat<VecF>(0.f);
    s.f[kVLoss] += valid ? t.loss : zero;
    s.f[kVClipped] += valid ? t.is_clipped : zero;
    s.f[kVCount] += valid ? splat<VecF>(1.f) : zero;
    const VecF r = valid ? R : zero, e = valid ? R - v : zero;
    ret[0] += __builtin_convertvector(__builtin_shufflevector(r, r, 0, 1, 2, 3), VecD4);
    ret[1] += __builtin_convertvector(__builtin_shufflevector(r, r, 4, 5, 6, 7), VecD4);
    err[0] += __builtin_convertvector(__builtin_shufflevector(e, e, 0, 1, 2, 3), VecD4);
    err[1] += __builtin_convertvector(__builtin_shufflevector(e, e, 4, 5, 6, 7), VecD4);
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

RLHF_CPU_CLONES ValueRow value_row(const float* v, const float* ov, const float* R, const uint8_t* m, int64_t T,
                                   bool has_clip, float c) {
  ValueAcc a;
  auto add = [&](int64_t t) RLHF_INLINE_LAMBDA {
    a.add(load<VecF>(v + t), load<VecF>(ov + t), load<VecF>(R + t), load_mask(m + t), has_clip, c);
  };
  const int64_t body = for_blocks(a.s, T, add);
  const float* src[3] = {v, ov, R};
  const Tail<3> tail(src, m, body, T - body);
  if (body < T)
    a.add(load<VecF>(tail.x[0]), load<VecF>(tail.x[1]), load<VecF>(tail.x[2]), load_mask(tail.m), has_clip, c);
  a.s.flush();
  ValueRow r;
  r.loss = a.s.total(kVLoss);
  r.clipped = a.s.total(kVClipped);
  const double n = a.s.total(kVCount);
  if (n == 0) return r;
  const double mean_r = lane_total(a.ret) / n, mean_e = lane_total(a.err) / n;
  DeviationAcc q;  // second pass over the row, still in cache
  for (int64_t t0 = 0; t0 < body; t0 += 4)
    q.add(load<VecF4>(v + t0), load<VecF4>(R + t0), load<VecM4>(m + t0), mean_r, mean_e);
  for (int j = 0; body + j < T; j += 4)
    q.add(load<VecF4>(tail.x[0] + j), load<VecF4>(tail.x[2] + j), load<VecM4>(tail.m + j), mean_r, mean_e);
  double qr = 0, qe = 0;
  for (int j = 0; j < 4; ++j) {
    qr += q.qr[j];
    qe += q.qe[j];
  }
  r.ret = {n, mean_r, qr};
  r.err = {n, mean_e, qe};
  return r;
}

RLHF_INLINE VecF value_grad(VecF v, VecF ov, VecF R, VecI valid, bool has_clip, float c, float scale) {
  const VecF d = ppo_value_token(v, ov, R, has_clip, c).dvalue;
  return valid ? scale * d : splat<VecF>(0.f);
}

RLHF_CPU_CLONES void value_grad_row(const float* v, const float* ov, const float* R, const uint8_t* m, int64_t T,
                                    bool has_clip, float c, float scale, float* out) {
  int64_t t0 = 0;
  for (; t0 + kW <= T; t0 += kW) {
    const VecF d = value_grad(load<VecF>(v + t0), load<VecF>(ov + t0), load<VecF>(R + t0), load_mask(m + t0),
                              has_clip, c, scale);
    std::memcpy(out + t0, &d, sizeof d);
  }
  if (t0 < T) {
    const float* src[3] = {v, ov, R};
    const Tail<3> tail(src, m, t0, T - t0);
    const VecF d = value_grad(load<VecF>(tail.x[0]), load<VecF>(tail.x[1]), load<VecF>(tail.x[2]),
                              load_mask(tail.m), has_clip, c, scale);
    std::memcpy(out + t0, &d, (T - t0) * sizeof(float));
  }
}

// The device launchers of rlhf/ppo_op.h (which checks, converts and allocates).
struct CpuPPO {
  static double num_tokens(const Normalizer& norm) {  // a CPU tensor: reading it is no device sync
    return norm.num_tokens ? *norm.num_tokens : norm.num_tokens_value;
  }

  static void policy_forward(const PolicyArgs& p, const Normalizer& norm, const LossOutputs& out, const at::Tensor&) {
    const int64_t B = p.B, T = p.T;
    std::vector<PolicyRow> rows(B);
    with_options(p, [&](const auto& o) {
      for_rows(B, T, [&](int64_t b) {
        const int64_t i = b * T;
        rows[b] = policy_row(p.logp + i, p.old_logp + i, p.adv + i, (p.rollout ? p.rollout : p.old_logp) + i,
                             reinterpret_cast<const uint8_t*>(p.mask) + i, T, p.clip_low, p.clip_high, p.dual_clip,
                             o);
      });
    });
    std::vector<double> row_sum(B), row_count(B), row_grad(p.plain ? 0 : B);  // plain: every g_b = 1
    PolicyRow all;
    double rows_with = 0, rows_clipped = 0;
    for (int64_t b = 0; b < B; ++b) {
      const PolicyRow& r = rows[b];
      row_sum[b] = r.loss;
      row_count[b] = r.count;
      if (!p.plain) row_grad[b] = r.row_grad;
      all.count += r.count;
      all.low += r.low;
      all.high += r.high;
      all.dual += r.dual;
      all.kl += r.kl;
      all.ratio += r.ratio;
      all.rmin = std::min(all.rmin, r.rmin);
      all.rmax = std::max(all.rmax, r.rmax);
      all.is_weight += r.is_weight;
      all.is_capped += r.is_capped;
      rows_with += r.count > 0 ? 1 : 0;
      rows_clipped += r.low + r.high > 0 ? 1 : 0;
    }
    *out.loss = static_cast<float>(aggregate_rows(row_sum, row_count, norm.agg, static_cast<double>(B * T),
                                                  num_tokens(norm), out.row_scale,
                                                  p.plain ? nullptr : row_grad.data()));
    const double n = std::max(all.count, 1.0);
    const bool any = all.count > 0;
    float* s = out.stats;
    s[kClipfrac] = static_cast<float>((all.low + all.high) / n);
    s[kClipfracLow] = static_cast<float>(all.low / n);
    s[kClipfracHigh] = static_cast<float>(all.high / n);
    s[kDualClipfrac] = static_cast<float>(all.dual / n);
    s[kApproxKl] = static_cast<float>(all.kl / n);
    s[kRatioMean] = static_cast<float>(all.ratio / n);
    s[kRatioMin] = any ? all.rmin : 0.f;
    s[kRatioMax] = any ? all.rmax : 0.f;
    s[kSeqClipfrac] = static_cast<float>(rows_clipped / std::max(rows_with, 1.0));
    s[kIsWeightMean] = static_cast<float>(all.is_weight / n);
    s[kIsCappedFrac] = static_cast<float>(all.is_capped / n);
  }

  static void policy_backward(const PolicyArgs& p, const float* grad, const float* row_scale, float* out,
                              const at::Tensor&) {
    const int64_t T = p.T;
    const float g = *grad;
    with_options(p, [&](const auto& o) {
      for_rows(p.B, T, [&](int64_t b) {
        const int64_t i = b * T;
        policy_grad_row(p.logp + i, p.old_logp + i, p.adv + i, (p.rollout ? p.rollout : p.old_logp) + i,
                        reinterpret_cast<const uint8_t*>(p.mask) + i, T, p.clip_low, p.clip_high, p.dual_clip,
                        g * row_scale[b], o, out + i);
      });
    });
  }

  static void value_forward(const ValueArgs& p, const Normalizer& norm, const LossOutputs& out, const at::Tensor&) {
    const int64_t B = p.B, T = p.T;
    std::vector<ValueRow> rows(B);
    for_rows(B, T, [&](int64_t b) {
      rows[b] = value_row(p.values + b * T, p.old_values + b * T, p.returns + b * T,
                          reinterpret_cast<const uint8_t*>(p.mask) + b * T, T, p.has_clip, p.clip);
    });
    std::vector<double> row_sum(B), row_count(B);
    double clipped = 0;
    Moments ret, err;
    for (int64_t b = 0; b < B; ++b) {
      row_sum[b] = rows[b].loss;
      row_count[b] = rows[b].ret.n;
      clipped += rows[b].clipped;
      ret = merge(ret, rows[b].ret);
      err = merge(err, rows[b].err);
    }
    *out.loss = static_cast<float>(
        aggregate_rows(row_sum, row_count, norm.agg, static_cast<double>(B * T), num_tokens(norm), out.row_scale));
    out.stats[kVfClipfrac] = static_cast<float>(clipped / std::max(ret.n, 1.0));
    out.stats[kExplainedVar] = ret.m2 > 0 ? static_cast<float>(1.0 - err.m2 / ret.m2) : 0.f;  // the 1/n cancels
  }

  static void value_backward(const ValueArgs& p, const float* grad, const float* row_scale, float* out,
                             const at::Tensor&) {
    const int64_t T = p.T;
    const float g = *grad;
    for_rows(p.B, T, [&](int64_t b) {
      value_grad_row(p.values + b * T, p.old_values + b * T, p.returns + b * T,
                     reinterpret_cast<const uint8_t*>(p.mask) + b * T, T, p.has_clip, p.clip, g * row_scale[b],
                     out + b * T);
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
