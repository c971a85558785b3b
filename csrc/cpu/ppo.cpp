// PPO policy and value losses on the CPU.
// Rows run in parallel (at::parallel_for); each row leaves float64 partial sums, which
// are combined in row order afterwards, so results do not depend on the thread count.
// The forward also returns each row's weight in the aggregated loss (row_scale [B]);
// the backward is then elementwise: d_x[b, t] = grad * row_scale[b] * dl/dx[b, t].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "rlhf/loss_checks.h"
#include "rlhf/ppo.h"

namespace rlhf {
namespace {

double read_num_tokens(const c10::optional<at::Tensor>& num_tokens, const at::Tensor& ref, const char* op) {
  check_num_tokens(num_tokens, ref, op);
  return num_tokens.has_value() ? num_tokens->data_ptr<double>()[0] : 0.0;  // a CPU tensor: no device sync
}

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
  const bool* m = mask.data_ptr<bool>();
  const float cl = static_cast<float>(clip_low), ch = static_cast<float>(clip_high);
  const float dc = dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f;

  std::vector<PolicyRow> rows(B);
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      PolicyRow r;
      for (int64_t i = b * T, e = i + T; i < e; ++i) {
        if (!m[i]) continue;
        const PolicyToken t = ppo_policy_token(lp[i], olp[i], adv[i], cl, ch, dc);
        r.loss += t.loss;
        r.count += 1;
        r.low += (t.flags & kClipLow) ? 1 : 0;
        r.high += (t.flags & kClipHigh) ? 1 : 0;
        r.dual += (t.flags & kDualClip) ? 1 : 0;
        r.kl += t.kl;
        r.ratio += t.ratio;
        r.rmin = std::min(r.rmin, t.ratio);
        r.rmax = std::max(r.rmax, t.ratio);
      }
      rows[b] = r;
    }
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
  const bool* m = mask.data_ptr<bool>();
  const float* w = row_scale.data_ptr<float>();
  const float cl = static_cast<float>(clip_low), ch = static_cast<float>(clip_high);
  const float dc = dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f;
  at::Tensor d = at::empty_like(logprobs);
  float* out = d.data_ptr<float>();
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = g * w[b];
      for (int64_t i = b * T, e = i + T; i < e; ++i)
        out[i] = m[i] ? scale * ppo_policy_token(lp[i], olp[i], adv[i], cl, ch, dc).dlogp : 0.f;
    }
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
  const bool* m = mask.data_ptr<bool>();
  const bool has_clip = clip.has_value();
  const float c = has_clip ? static_cast<float>(*clip) : 0.f;

  std::vector<ValueRow> rows(B);
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      ValueRow r;
      double n = 0, sum_r = 0, sum_e = 0;
      for (int64_t i = b * T, e = i + T; i < e; ++i) {
        if (!m[i]) continue;
        const ValueToken t = ppo_value_token(v[i], ov[i], R[i], has_clip, c);
        r.loss += t.loss;
        r.clipped += t.clipped ? 1 : 0;
        n += 1;
        sum_r += R[i];
        sum_e += static_cast<double>(R[i]) - v[i];
      }
      if (n > 0) {
        const double mean_r = sum_r / n, mean_e = sum_e / n;
        double q_r = 0, q_e = 0;  // second pass over the row, still in cache
        for (int64_t i = b * T, e = i + T; i < e; ++i) {
          if (!m[i]) continue;
          const double dr = R[i] - mean_r, de = (static_cast<double>(R[i]) - v[i]) - mean_e;
          q_r += dr * dr;
          q_e += de * de;
        }
        r.ret = {n, mean_r, q_r};
        r.err = {n, mean_e, q_e};
      }
      rows[b] = r;
    }
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
  const bool* m = mask.data_ptr<bool>();
  const float* w = row_scale.data_ptr<float>();
  const bool has_clip = clip.has_value();
  const float c = has_clip ? static_cast<float>(*clip) : 0.f;
  at::Tensor d = at::empty_like(values);
  float* out = d.data_ptr<float>();
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = g * w[b];
      for (int64_t i = b * T, e = i + T; i < e; ++i)
        out[i] = m[i] ? scale * ppo_value_token(v[i], ov[i], R[i], has_clip, c).dvalue : 0.f;
    }
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
