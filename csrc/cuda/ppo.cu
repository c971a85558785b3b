// PPO policy and value losses on CUDA.
//
// Forward, two launches: one block per row reduces the row to float64 partials
// (fixed-order block reductions), then one block combines the rows in order and writes
// the loss, the statistics and each row's weight w_b (loss = sum_b w_b * sum_t l_bt).
// Backward, one elementwise launch: d_x[b, t] = grad * w_b * dl/dx[b, t].
// Nothing is read back to the host: num_tokens and grad are read by the kernels.
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "rlhf/block_reduce.cuh"
#include "rlhf/loss_checks.h"
#include "rlhf/ppo.h"

namespace rlhf {
namespace {

constexpr int kRowThreads = 256;
constexpr int kCombineThreads = 1024;
constexpr int kPolicyParts = 9;  // loss, count, clip_low, clip_high, dual, kl, ratio, ratio_min, ratio_max
constexpr int kValueParts = 7;   // loss, count, clipped, mean_R, M2_R, mean_err, M2_err  (err = R - V)

// logprobs, old_logprobs, advantages: [B, T] float32; mask: [B, T] bool
// parts: [B, kPolicyParts] float64 out
__global__ void __launch_bounds__(kRowThreads) policy_rows_kernel(const float* __restrict__ logp,
                                                                  const float* __restrict__ old_logp,
                                                                  const float* __restrict__ adv,
                                                                  const bool* __restrict__ mask, int64_t T,
                                                                  float clip_low, float clip_high, float dual_clip,
                                                                  double* __restrict__ parts) {
  __shared__ double buf[33];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T;
  double loss = 0, count = 0, low = 0, high = 0, dual = 0, kl = 0, ratio = 0;
  double rmin = INFINITY, rmax = -INFINITY;
  for (int64_t t = threadIdx.x; t < T; t += kRowThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    const PolicyToken tok = ppo_policy_token(logp[i], old_logp[i], adv[i], clip_low, clip_high, dual_clip);
    loss += tok.loss;
    count += 1;
    low += tok.is_low;
    high += tok.is_high;
    dual += tok.is_dual;
    kl += tok.kl;
    ratio += tok.ratio;
    rmin = fmin(rmin, static_cast<double>(tok.ratio));
    rmax = fmax(rmax, static_cast<double>(tok.ratio));
  }
  double* out = parts + static_cast<int64_t>(blockIdx.x) * kPolicyParts;
  const double r0 = block_sum(loss, buf), r1 = block_sum(count, buf), r2 = block_sum(low, buf);
  const double r3 = block_sum(high, buf), r4 = block_sum(dual, buf), r5 = block_sum(kl, buf);
  const double r6 = block_sum(ratio, buf);
  const double r7 = block_reduce(rmin, INFINITY, MinOp(), buf), r8 = block_reduce(rmax, -INFINITY, MaxOp(), buf);
  if (threadIdx.x == 0) {
    out[0] = r0; out[1] = r1; out[2] = r2; out[3] = r3; out[4] = r4;
    out[5] = r5; out[6] = r6; out[7] = r7; out[8] = r8;
  }
}

// Totals over rows that every combine kernel needs: valid tokens and rows with any.
__device__ void count_rows(const double* parts, int stride, int64_t B, double* buf, double& total,
                           double& rows_with) {
  double n = 0, r = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double c = parts[b * stride + 1];
    n += c;
    r += c > 0 ? 1 : 0;
  }
  total = block_sum(n, buf);
  rows_with = block_sum(r, buf);
}

// parts: [B, kPolicyParts] float64; num_tokens: [] float64 or nullptr
// loss: [] float32 out; stats: [8] float32 out; row_scale: [B] float32 out
__global__ void __launch_bounds__(kCombineThreads) policy_combine_kernel(const double* __restrict__ parts, int64_t B,
                                                                         double numel,
                                                                         const double* __restrict__ num_tokens,
                                                                         int64_t agg, float* __restrict__ loss_out,
                                                                         float* __restrict__ stats,
                                                                         float* __restrict__ row_scale) {
  __shared__ double buf[33];
  double total, rows_with;
  count_rows(parts, kPolicyParts, B, buf, total, rows_with);
  const double nt = num_tokens ? *num_tokens : 0.0;
  double loss = 0, low = 0, high = 0, dual = 0, kl = 0, ratio = 0, rmin = INFINITY, rmax = -INFINITY;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double* p = parts + b * kPolicyParts;
    const double w = ppo_row_weight(agg, p[1], total, rows_with, numel, nt);
    row_scale[b] = static_cast<float>(w);
    loss += w * p[0];
    low += p[2];
    high += p[3];
    dual += p[4];
    kl += p[5];
    ratio += p[6];
    rmin = fmin(rmin, p[7]);
    rmax = fmax(rmax, p[8]);
  }
  loss = block_sum(loss, buf);
  low = block_sum(low, buf);
  high = block_sum(high, buf);
  dual = block_sum(dual, buf);
  kl = block_sum(kl, buf);
  ratio = block_sum(ratio, buf);
  rmin = block_reduce(rmin, INFINITY, MinOp(), buf);
  rmax = block_reduce(rmax, -INFINITY, MaxOp(), buf);
  if (threadIdx.x == 0) {
    const double n = total > 0 ? total : 1.0;
    *loss_out = static_cast<float>(loss);
    stats[0] = static_cast<float>((low + high) / n);
    stats[1] = static_cast<float>(low / n);
    stats[2] = static_cast<float>(high / n);
    stats[3] = static_cast<float>(dual / n);
    stats[4] = static_cast<float>(kl / n);
    stats[5] = static_cast<float>(ratio / n);
    stats[6] = total > 0 ? static_cast<float>(rmin) : 0.f;
    stats[7] = total > 0 ? static_cast<float>(rmax) : 0.f;
  }
}

// grad: [] float32; row_scale: [B] float32; out: [B, T] float32 d logprobs
__global__ void policy_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ logp,
                                  const float* __restrict__ old_logp, const float* __restrict__ adv,
                                  const bool* __restrict__ mask, const float* __restrict__ row_scale, int64_t T,
                                  int64_t n, float clip_low, float clip_high, float dual_clip,
                                  float* __restrict__ out) {
  const float g = *grad;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] ? g * row_scale[i / T] *
                           ppo_policy_token(logp[i], old_logp[i], adv[i], clip_low, clip_high, dual_clip).dlogp
                     : 0.f;
  }
}

// values, old_values, returns: [B, T] float32; mask: [B, T] bool; parts: [B, kValueParts] float64 out
__global__ void __launch_bounds__(kRowThreads) value_rows_kernel(const float* __restrict__ v,
                                                                 const float* __restrict__ old_v,
                                                                 const float* __restrict__ ret,
                                                                 const bool* __restrict__ mask, int64_t T,
                                                                 bool has_clip, float clip,
                                                                 double* __restrict__ parts) {
  __shared__ double buf[33];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T;
  double loss = 0, count = 0, clipped = 0, sum_r = 0, sum_e = 0;
  for (int64_t t = threadIdx.x; t < T; t += kRowThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    const ValueToken tok = ppo_value_token(v[i], old_v[i], ret[i], has_clip, clip);
    loss += tok.loss;
    count += 1;
    clipped += tok.is_clipped;
    sum_r += ret[i];
    sum_e += static_cast<double>(ret[i]) - v[i];
  }
  loss = block_sum(loss, buf);
  count = block_sum(count, buf);
  clipped = block_sum(clipped, buf);
  const double n = count > 0 ? count : 1.0;
  const double mean_r = block_sum(sum_r, buf) / n, mean_e = block_sum(sum_e, buf) / n;
  double q_r = 0, q_e = 0;
  for (int64_t t = threadIdx.x; t < T; t += kRowThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    const double dr = ret[i] - mean_r, de = (static_cast<double>(ret[i]) - v[i]) - mean_e;
    q_r += dr * dr;
    q_e += de * de;
  }
  q_r = block_sum(q_r, buf);
  q_e = block_sum(q_e, buf);
  if (threadIdx.x == 0) {
    double* out = parts + static_cast<int64_t>(blockIdx.x) * kValueParts;
    out[0] = loss; out[1] = count; out[2] = clipped; out[3] = mean_r; out[4] = q_r; out[5] = mean_e; out[6] = q_e;
  }
}

// parts: [B, kValueParts]; stats: [2] float32 out (vf_clipfrac, explained_var)
__global__ void __launch_bounds__(kCombineThreads) value_combine_kernel(const double* __restrict__ parts, int64_t B,
                                                                        double numel,
                                                                        const double* __restrict__ num_tokens,
                                                                        int64_t agg, float* __restrict__ loss_out,
                                                                        float* __restrict__ stats,
                                                                        float* __restrict__ row_scale) {
  __shared__ double buf[33];
  double total, rows_with;
  count_rows(parts, kValueParts, B, buf, total, rows_with);
  const double n = total > 0 ? total : 1.0;
  double sr = 0, se = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double* p = parts + b * kValueParts;
    sr += p[1] * p[3];
    se += p[1] * p[5];
  }
  const double mean_r = block_sum(sr, buf) / n, mean_e = block_sum(se, buf) / n;
  const double nt = num_tokens ? *num_tokens : 0.0;
  double loss = 0, clipped = 0, m2_r = 0, m2_e = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double* p = parts + b * kValueParts;
    const double w = ppo_row_weight(agg, p[1], total, rows_with, numel, nt);
    row_scale[b] = static_cast<float>(w);
    loss += w * p[0];
    clipped += p[2];
    // total sum of squares = within rows + between rows
    const double dr = p[3] - mean_r, de = p[5] - mean_e;
    m2_r += p[4] + p[1] * dr * dr;
    m2_e += p[6] + p[1] * de * de;
  }
  loss = block_sum(loss, buf);
  clipped = block_sum(clipped, buf);
  m2_r = block_sum(m2_r, buf);
  m2_e = block_sum(m2_e, buf);
  if (threadIdx.x == 0) {
    *loss_out = static_cast<float>(loss);
    stats[0] = static_cast<float>(clipped / n);
    stats[1] = m2_r > 0 ? static_cast<float>(1.0 - m2_e / m2_r) : 0.f;
  }
}

__global__ void value_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ v,
                                 const float* __restrict__ old_v, const float* __restrict__ ret,
                                 const bool* __restrict__ mask, const float* __restrict__ row_scale, int64_t T,
                                 int64_t n, bool has_clip, float clip, float* __restrict__ out) {
  const float g = *grad;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] ? g * row_scale[i / T] * ppo_value_token(v[i], old_v[i], ret[i], has_clip, clip).dvalue : 0.f;
  }
}

unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 65535)));
}

const double* num_tokens_ptr(const c10::optional<at::Tensor>& num_tokens, const at::Tensor& ref, const char* op) {
  check_num_tokens(num_tokens, ref, op);
  return num_tokens.has_value() ? num_tokens->data_ptr<double>() : nullptr;
}

void check_grad(const at::Tensor& grad, const at::Tensor& ref, const char* op) {
  check_scalar(grad, "grad", ref, op);
  check_f32(grad, "grad", op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_fwd_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const c10::optional<at::Tensor>& num_tokens, double clip_low, double clip_high,
    c10::optional<double> dual_clip, int64_t loss_agg) {
  const char* op = "ppo_policy_fwd";
  check_ppo_inputs(logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages", mask, op);
  check_loss_agg(loss_agg, op);
  const double* nt = num_tokens_ptr(num_tokens, logprobs, op);
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  TORCH_CHECK(B <= 2147483647LL, op, ": too many rows for one launch: ", B);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss = at::empty({}, logprobs.options());
  at::Tensor stats = at::empty({8}, logprobs.options());
  at::Tensor row_scale = at::empty({B}, logprobs.options());
  at::Tensor parts = at::empty({std::max<int64_t>(B, 1), kPolicyParts}, logprobs.options().dtype(at::kDouble));
  if (B > 0) {
    policy_rows_kernel<<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
        logprobs.data_ptr<float>(), old_logprobs.data_ptr<float>(), advantages.data_ptr<float>(),
        mask.data_ptr<bool>(), T, static_cast<float>(clip_low), static_cast<float>(clip_high),
        dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f, parts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  policy_combine_kernel<<<1, kCombineThreads, 0, stream>>>(parts.data_ptr<double>(), B, static_cast<double>(B * T),
                                                           nt, loss_agg, loss.data_ptr<float>(),
                                                           stats.data_ptr<float>(), row_scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats, row_scale};
}

at::Tensor ppo_policy_bwd_cuda(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& row_scale,
                               double clip_low, double clip_high, c10::optional<double> dual_clip) {
  const char* op = "ppo_policy_bwd";
  check_ppo_inputs(logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages", mask, op);
  check_grad(grad, logprobs, op);
  check_row_scale(row_scale, logprobs.size(0), logprobs, "row_scale", op);
  at::Tensor d = at::empty_like(logprobs);
  const int64_t n = logprobs.numel();
  if (n == 0) return d;
  const c10::cuda::CUDAGuard guard(logprobs.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  policy_bwd_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(
      grad.data_ptr<float>(), logprobs.data_ptr<float>(), old_logprobs.data_ptr<float>(), advantages.data_ptr<float>(),
      mask.data_ptr<bool>(), row_scale.data_ptr<float>(), logprobs.size(1), n, static_cast<float>(clip_low),
      static_cast<float>(clip_high), dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f,
      d.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_fwd_cuda(const at::Tensor& values,
                                                                  const at::Tensor& old_values,
                                                                  const at::Tensor& returns, const at::Tensor& mask,
                                                                  const c10::optional<at::Tensor>& num_tokens,
                                                                  c10::optional<double> clip, int64_t loss_agg) {
  const char* op = "ppo_value_fwd";
  check_ppo_inputs(values, "values", old_values, "old_values", returns, "returns", mask, op);
  check_loss_agg(loss_agg, op);
  const double* nt = num_tokens_ptr(num_tokens, values, op);
  const int64_t B = values.size(0), T = values.size(1);
  TORCH_CHECK(B <= 2147483647LL, op, ": too many rows for one launch: ", B);
  const c10::cuda::CUDAGuard guard(values.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss = at::empty({}, values.options());
  at::Tensor stats = at::empty({2}, values.options());
  at::Tensor row_scale = at::empty({B}, values.options());
  at::Tensor parts = at::empty({std::max<int64_t>(B, 1), kValueParts}, values.options().dtype(at::kDouble));
  if (B > 0) {
    value_rows_kernel<<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
        values.data_ptr<float>(), old_values.data_ptr<float>(), returns.data_ptr<float>(), mask.data_ptr<bool>(), T,
        clip.has_value(), clip.has_value() ? static_cast<float>(*clip) : 0.f, parts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  value_combine_kernel<<<1, kCombineThreads, 0, stream>>>(parts.data_ptr<double>(), B, static_cast<double>(B * T), nt,
                                                          loss_agg, loss.data_ptr<float>(), stats.data_ptr<float>(),
                                                          row_scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats, row_scale};
}

at::Tensor ppo_value_bwd_cuda(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& old_values,
                              const at::Tensor& returns, const at::Tensor& mask, const at::Tensor& row_scale,
                              c10::optional<double> clip) {
  const char* op = "ppo_value_bwd";
  check_ppo_inputs(values, "values", old_values, "old_values", returns, "returns", mask, op);
  check_grad(grad, values, op);
  check_row_scale(row_scale, values.size(0), values, "row_scale", op);
  at::Tensor d = at::empty_like(values);
  const int64_t n = values.numel();
  if (n == 0) return d;
  const c10::cuda::CUDAGuard guard(values.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  value_bwd_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(
      grad.data_ptr<float>(), values.data_ptr<float>(), old_values.data_ptr<float>(), returns.data_ptr<float>(),
      mask.data_ptr<bool>(), row_scale.data_ptr<float>(), values.size(1), n, clip.has_value(),
      clip.has_value() ? static_cast<float>(*clip) : 0.f, d.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_policy_fwd", &rlhf::ppo_policy_fwd_cuda);
  m.impl("ppo_policy_bwd", &rlhf::ppo_policy_bwd_cuda);
  m.impl("ppo_value_fwd", &rlhf::ppo_value_fwd_cuda);
  m.impl("ppo_value_bwd", &rlhf::ppo_value_bwd_cuda);
}
