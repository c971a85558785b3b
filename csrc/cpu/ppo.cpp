// PPO policy and value losses on the CPU.
// Rows run in parallel (at::parallel_for); each row leaves float64 partial sums, which
// are combined in row order afterwards, so results do not depend on the thread count.
// The forward also returns each row's weight in the aggregated loss (row_scale [B]);
// the backward is then elementwise: d_x[b, t] = grad * row_scale[b] * dl/dx[b, t].
// Inner loops have no branches (masked tokens are selected away, never multiplied) and
// sums go to kLanes float64 accumulators summed in a fixed order per row. GCC vectorizes
// the backward and value loops (baseline x86-64 SSE2: the build sets no -march), not yet
// the policy forward's per-token pass (mixed 8/32-bit types), which is the slowest part.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "rlhf/loss_checks.h"

// Let the compiler turn the branch-free selects of the per-token math into vector blends
// (with trapping math on, GCC keeps FP compares inside branches). We never read FP flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "rlhf/ppo.h"

namespace rlhf {
namespace {

double read_num_tokens(const c10::optional<at::Tensor>& num_tokens, const at::Tensor& ref, const char* op) {
  check_num_tokens(num_tokens, ref, op);
  return num_tokens.has_value() ? num_tokens->data_ptr<double>()[0] : 0.0;  // a CPU tensor: no device sync
}

constexpr int kLanes = 8;

int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)); }

// Row weights from the per-row valid counts, and the loss sum_b w_b * row_sum_b.
double aggregate_rows(const std::vector<double>& row_sum, const std::vector<double>& row_count, int64_t agg,
                      double numel, double num_tokens, float* row_scale) {
  double total = 0, rows_with = 0;
  for (size_t b = 0; b < row_count.size(); ++b) {
    total += row_count[b];
    rows_with += row_count[b] > 0 ? 1 : 0;
  }
  double loss = 0;
  for (size_t b = 0; b < row_count.size(); ++b) {
    const double w = ppo_row_weight(agg, row_count[b], total, rows_with, numel, num_tokens);
    row_scale[b] = static_cast<float>(w);
    loss += w * row_sum[b];
  }
  return loss;
}

struct PolicyRow {
  double loss = 0, count = 0, low = 0, high = 0, dual = 0, kl = 0, ratio = 0;
  float rmin = std::numeric_limits<float>::infinity(), rmax = -std::numeric_limits<float>::infinity();
};

// One row of T tokens: float64 partial sums over the valid ones. Tiles of kTile tokens:
// first the per-token terms into small arrays (a plain elementwise loop, which
// vectorizes), then lane sums over the arrays, added into float64 lanes.
constexpr int kTile = 256;

PolicyRow policy_row(const float* lp, const float* olp, const float* adv, const uint8_t* m, int64_t T, float cl,
                     float ch, float dc) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  alignas(64) float loss[kTile], count[kTile], low[kTile], high[kTile], dual[kTile], kl[kTile], ratio[kTile],
      rmin[kTile], rmax[kTile];
  double a_loss[kLanes] = {}, a_count[kLanes] = {}, a_low[kLanes] = {}, a_high[kLanes] = {}, a_dual[kLanes] = {};
  double a_kl[kLanes] = {}, a_ratio[kLanes] = {};
  float a_min[kLanes], a_max[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    a_min[j] = kInf;
    a_max[j] = -kInf;
  }
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, T - t0));
    for (int i = 0; i < n; ++i) {
      const int32_t v = m[t0 + i];
      const PolicyToken t = ppo_policy_token(lp[t0 + i], olp[t0 + i], adv[t0 + i], cl, ch, dc);
      loss[i] = v ? t.loss : 0.f;
      count[i] = v ? 1.f : 0.f;
      low[i] = v ? t.is_low : 0.f;
      high[i] = v ? t.is_high : 0.f;
      dual[i] = v ? t.is_dual : 0.f;
      kl[i] = v ? t.kl : 0.f;
      ratio[i] = v ? t.ratio : 0.f;
      rmin[i] = v ? t.ratio : kInf;
      rmax[i] = v ? t.ratio : -kInf;
    }
    for (int i = n; i < kTile; ++i) {
      loss[i] = count[i] = low[i] = high[i] = dual[i] = kl[i] = ratio[i] = 0.f;
      rmin[i] = kInf;
      rmax[i] = -kInf;
    }
    for (int i = 0; i < kTile; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        a_loss[j] += loss[i + j];
        a_count[j] += count[i + j];
        a_low[j] += low[i + j];
        a_high[j] += high[i + j];
        a_dual[j] += dual[i + j];
        a_kl[j] += kl[i + j];
        a_ratio[j] += ratio[i + j];
        a_min[j] = min_f32(a_min[j], rmin[i + j]);
        a_max[j] = max_f32(a_max[j], rmax[i + j]);
      }
    }
  }
  PolicyRow r;
  for (int j = 0; j < kLanes; ++j) {
    r.loss += a_loss[j];
    r.count += a_count[j];
    r.low += a_low[j];
    r.high += a_high[j];
    r.dual += a_dual[j];
    r.kl += a_kl[j];
    r.ratio += a_ratio[j];
    r.rmin = std::min(r.rmin, a_min[j]);
    r.rmax = std::max(r.rmax, a_max[j]);
  }
  return r;
}

void policy_grad_row(const float* lp, const float* olp, const float* adv, const uint8_t* m,
                                     int64_t T, float cl, float ch, float dc, float scale, float* out) {
  for (int64_t i = 0; i < T; ++i) {
    const int32_t v = m[i];
    const float d = ppo_policy_token(lp[i], olp[i], adv[i], cl, ch, dc).dlogp;
    out[i] = v ? scale * d : 0.f;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const c10::optional<at::Tensor>& num_tokens, double clip_low, double clip_high,
    c10::optional<double> dual_clip, int64_t loss_agg) {
  const char* op = "ppo_policy_fwd";
  check_ppo_inputs(logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages", mask, op);
  check_loss_agg(loss_agg, op);
  const double nt = read_num_tokens(num_tokens, logprobs, op);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const float* lp = logprobs.data_ptr<float>();
  const float* olp = old_logprobs.data_ptr<float>();
  const float* adv = advantages.data_ptr<float>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const float cl = static_cast<float>(clip_low), ch = static_cast<float>(clip_high);
  const float dc = dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f;

  std::vector<PolicyRow> rows(B);
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      rows[b] = policy_row(lp + b * T, olp + b * T, adv + b * T, m + b * T, T, cl, ch, dc);
  });

  at::Tensor row_scale = at::empty({B}, logprobs.options());
  std::vector<double> row_sum(B), row_count(B);
  PolicyRow all;
  for (int64_t b = 0; b < B; ++b) {
    const PolicyRow& r = rows[b];
    row_sum[b] = r.loss;
    row_count[b] = r.count;
    all.count += r.count;
    all.low += r.low;
    all.high += r.high;
    all.dual += r.dual;
    all.kl += r.kl;
    all.ratio += r.ratio;
    all.rmin = std::min(all.rmin, r.rmin);
    all.rmax = std::max(all.rmax, r.rmax);
  }
  const double loss = aggregate_rows(row_sum, row_count, loss_agg, static_cast<double>(B * T), nt,
                                     row_scale.data_ptr<float>());
  const double n = std::max(all.count, 1.0);
  const bool any = all.count > 0;
  at::Tensor stats = at::empty({8}, logprobs.options());
  float* s = stats.data_ptr<float>();
  s[0] = static_cast<float>((all.low + all.high) / n);  // clipfrac
  s[1] = static_cast<float>(all.low / n);
  s[2] = static_cast<float>(all.high / n);
  s[3] = static_cast<float>(all.dual / n);
  s[4] = static_cast<float>(all.kl / n);
  s[5] = static_cast<float>(all.ratio / n);
  s[6] = any ? all.rmin : 0.f;
  s[7] = any ? all.rmax : 0.f;
  at::Tensor out = at::empty({}, logprobs.options());
  out.data_ptr<float>()[0] = static_cast<float>(loss);
  return {out, stats, row_scale};
}

at::Tensor ppo_policy_bwd_cpu(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                              const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& row_scale,
                              double clip_low, double clip_high, c10::optional<double> dual_clip) {
  const char* op = "ppo_policy_bwd";
  check_ppo_inputs(logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages", mask, op);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  check_scalar(grad, "grad", logprobs, op);
  check_row_scale(row_scale, B, grad, "row_scale", op);
  const float g = grad.to(at::kFloat).item<float>();
  const float* lp = logprobs.data_ptr<float>();
  const float* olp = old_logprobs.data_ptr<float>();
  const float* adv = advantages.data_ptr<float>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const float* w = row_scale.data_ptr<float>();
  const float cl = static_cast<float>(clip_low), ch = static_cast<float>(clip_high);
  const float dc = dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f;
  at::Tensor d = at::empty_like(logprobs);
  float* out = d.data_ptr<float>();
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      policy_grad_row(lp + b * T, olp + b * T, adv + b * T, m + b * T, T, cl, ch, dc, g * w[b], out + b * T);
  });
  return d;
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

ValueRow value_row(const float* v, const float* ov, const float* R, const uint8_t* m, int64_t T, bool has_clip,
                   float c) {
  alignas(64) float loss[kTile], clipped[kTile], count[kTile], ret[kTile], err[kTile];
  double a_loss[kLanes] = {}, a_clipped[kLanes] = {}, a_count[kLanes] = {}, a_ret[kLanes] = {}, a_err[kLanes] = {};
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, T - t0));
    for (int i = 0; i < n; ++i) {
      const int32_t ok = m[t0 + i];
      const float vi = v[t0 + i], ri = R[t0 + i];
      const ValueToken t = ppo_value_token(vi, ov[t0 + i], ri, has_clip, c);
      loss[i] = ok ? t.loss : 0.f;
      clipped[i] = ok ? t.is_clipped : 0.f;
      count[i] = ok ? 1.f : 0.f;
      ret[i] = ok ? ri : 0.f;
      err[i] = ok ? ri - vi : 0.f;  // float64 deviations from this mean in the second pass
    }
    for (int i = n; i < kTile; ++i) loss[i] = clipped[i] = count[i] = ret[i] = err[i] = 0.f;
    for (int i = 0; i < kTile; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        a_loss[j] += loss[i + j];
        a_clipped[j] += clipped[i + j];
        a_count[j] += count[i + j];
        a_ret[j] += ret[i + j];
        a_err[j] += err[i + j];
      }
    }
  }
  ValueRow r;
  double n = 0, sr = 0, se = 0;
  for (int j = 0; j < kLanes; ++j) {
    r.loss += a_loss[j];
    r.clipped += a_clipped[j];
    n += a_count[j];
    sr += a_ret[j];
    se += a_err[j];
  }
  if (n == 0) return r;
  const double mean_r = sr / n, mean_e = se / n;
  double q_r[kLanes] = {}, q_e[kLanes] = {};  // second pass over the row, still in cache
  auto step2 = [&](int j, int64_t i) {
    const int32_t ok = m[i];
    const double dr = R[i] - mean_r, de = (static_cast<double>(R[i]) - v[i]) - mean_e;
    q_r[j] += ok ? dr * dr : 0.0;
    q_e[j] += ok ? de * de : 0.0;
  };
  int64_t t0 = 0;
  for (; t0 + kLanes <= T; t0 += kLanes)
    for (int j = 0; j < kLanes; ++j) step2(j, t0 + j);
  for (int j = 0; t0 + j < T; ++j) step2(j, t0 + j);
  double qr = 0, qe = 0;
  for (int j = 0; j < kLanes; ++j) {
    qr += q_r[j];
    qe += q_e[j];
  }
  r.ret = {n, mean_r, qr};
  r.err = {n, mean_e, qe};
  return r;
}

void value_grad_row(const float* v, const float* ov, const float* R, const uint8_t* m,
                                    int64_t T, bool has_clip, float c, float scale, float* out) {
  for (int64_t i = 0; i < T; ++i) {
    const int32_t ok = m[i];
    const float d = ppo_value_token(v[i], ov[i], R[i], has_clip, c).dvalue;
    out[i] = ok ? scale * d : 0.f;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_fwd_cpu(const at::Tensor& values,
                                                                 const at::Tensor& old_values,
                                                                 const at::Tensor& returns, const at::Tensor& mask,
                                                                 const c10::optional<at::Tensor>& num_tokens,
                                                                 c10::optional<double> clip, int64_t loss_agg) {
  const char* op = "ppo_value_fwd";
  check_ppo_inputs(values, "values", old_values, "old_values", returns, "returns", mask, op);
  check_loss_agg(loss_agg, op);
  const double nt = read_num_tokens(num_tokens, values, op);
  const int64_t B = values.size(0), T = values.size(1);
  const float* v = values.data_ptr<float>();
  const float* ov = old_values.data_ptr<float>();
  const float* R = returns.data_ptr<float>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const bool has_clip = clip.has_value();
  const float c = has_clip ? static_cast<float>(*clip) : 0.f;

  std::vector<ValueRow> rows(B);
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      rows[b] = value_row(v + b * T, ov + b * T, R + b * T, m + b * T, T, has_clip, c);
  });

  at::Tensor row_scale = at::empty({B}, values.options());
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
  const double loss = aggregate_rows(row_sum, row_count, loss_agg, static_cast<double>(B * T), nt,
                                     row_scale.data_ptr<float>());
  at::Tensor stats = at::empty({2}, values.options());
  float* s = stats.data_ptr<float>();
  s[0] = static_cast<float>(clipped / std::max(ret.n, 1.0));
  s[1] = ret.m2 > 0 ? static_cast<float>(1.0 - err.m2 / ret.m2) : 0.f;  // the 1/n cancels
  at::Tensor out = at::empty({}, values.options());
  out.data_ptr<float>()[0] = static_cast<float>(loss);
  return {out, stats, row_scale};
}

at::Tensor ppo_value_bwd_cpu(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& old_values,
                             const at::Tensor& returns, const at::Tensor& mask, const at::Tensor& row_scale,
                             c10::optional<double> clip) {
  const char* op = "ppo_value_bwd";
  check_ppo_inputs(values, "values", old_values, "old_values", returns, "returns", mask, op);
  const int64_t B = values.size(0), T = values.size(1);
  check_scalar(grad, "grad", values, op);
  check_row_scale(row_scale, B, grad, "row_scale", op);
  const float g = grad.to(at::kFloat).item<float>();
  const float* v = values.data_ptr<float>();
  const float* ov = old_values.data_ptr<float>();
  const float* R = returns.data_ptr<float>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const float* w = row_scale.data_ptr<float>();
  const bool has_clip = clip.has_value();
  const float c = has_clip ? static_cast<float>(*clip) : 0.f;
  at::Tensor d = at::empty_like(values);
  float* out = d.data_ptr<float>();
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      value_grad_row(v + b * T, ov + b * T, R + b * T, m + b * T, T, has_clip, c, g * w[b], out + b * T);
  });
  return d;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_fwd", &rlhf::ppo_policy_fwd_cpu);
  m.impl("ppo_policy_bwd", &rlhf::ppo_policy_bwd_cpu);
  m.impl("ppo_value_fwd", &rlhf::ppo_value_fwd_cpu);
  m.impl("ppo_value_bwd", &rlhf::ppo_value_bwd_cpu);
}
