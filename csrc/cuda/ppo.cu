// PPO policy and value losses on CUDA.
//
// Forward, one kernel launch per loss, with max(B, 1) blocks of kThreads threads:
//   1. block b reduces row b to float64 partials (fixed-order block reductions) and
//      stores them in `parts`;
//   2. it then draws a ticket from an int32 counter (last_block_to_arrive); the block that
//      draws the last ticket combines all rows in a fixed order and writes the loss, the
//      statistics and each row's weight w_b (loss = sum_b w_b * sum_t l_bt).
// Which block comes last varies from run to run, but the combine reads every row's
// partials from `parts` in the same order whichever block runs it, so results are
// bitwise the same on every run (the only atomic is the integer ticket). The counter is
// zeroed per call with cudaMemsetAsync (a memset, not a kernel launch; a memset node in a
// CUDA graph), never a static counter, so calls on concurrent streams do not share it.
// Backward, one elementwise launch: d_x[b, t] = grad * w_b * dl/dx[b, t].
// Nothing is read back to the host: num_tokens and grad are read by the kernels, so the
// forward and backward can be captured in a CUDA graph.
// Status: this one-launch forward has been compiled (sm_80, sm_90) but not yet run on a
// GPU. The Triton kernels (rlhf_kernels/triton/ppo.py) follow the same scheme and pass the
// tests under the Triton interpreter, which runs programs one after another (logic, not
// memory ordering). benchmarks/gpu_check.sh runs the CUDA tests and compute-sanitizer
// (memcheck, racecheck) on ppo cases.
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

// One block size for the row pass and the combine, since the last row block runs the
// combine. For B <= kThreads the combine gives bitwise the result of the former 1024-thread
// combine kernel (the extra threads only added identities); for larger B the float64 row
// partials are summed in another (still fixed) order.
constexpr int kThreads = 256;
constexpr int kPolicyParts = 9;  // loss, count, clip_low, clip_high, dual, kl, ratio, ratio_min, ratio_max
constexpr int kValueParts = 7;   // loss, count, clipped, mean_R, M2_R, mean_err, M2_err  (err = R - V)

// Called by every thread of every block after the block stored its partials; true, in
// every thread, in the one block that draws the last ticket (the threadFenceReduction
// pattern of the CUDA samples). Memory ordering:
//   writer: the __syncthreads orders the block's partial stores before thread 0's
//     __threadfence, which orders them (cumulatively) before its atomicAdd, so a block
//     that sees this ticket counted can see the partials;
//   last block: thread 0 reads the ticket, then __threadfence (acquire side), then the
//     __syncthreads that publishes `is_last` orders the combine's loads of every thread
//     after it. The combine reads partials with __ldcg (L2, not the incoherent L1), so no
//     stale line can be hit.
// counter: [] int32, zero before the launch. The last block sets it back to zero, leaving
// it as it found it (not relied upon: every call zeroes its own counter).
__device__ bool last_block_to_arrive(int* counter) {
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int ticket = atomicAdd(counter, 1);
    is_last = ticket == static_cast<int>(gridDim.x) - 1;
    if (is_last) __threadfence();
  }
  __syncthreads();
  return is_last;
}

// Partials written by other blocks of this launch: read from L2 (see last_block_to_arrive).
__device__ __forceinline__ double part(const double* p) { return __ldcg(p); }

// logprobs, old_logprobs, advantages: [B, T] float32; mask: [B, T] bool
// out: [kPolicyParts] float64, this row's partials (written by thread 0)
__device__ void policy_row(const float* __restrict__ logp, const float* __restrict__ old_logp,
                           const float* __restrict__ adv, const bool* __restrict__ mask, int64_t row, int64_t T,
                           float clip_low, float clip_high, float dual_clip, double* buf, double* __restrict__ out) {
  const int64_t base = row * T;
  double loss = 0, count = 0, low = 0, high = 0, dual = 0, kl = 0, ratio = 0;
  double rmin = INFINITY, rmax = -INFINITY;
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
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
  const double r0 = block_sum(loss, buf), r1 = block_sum(count, buf), r2 = block_sum(low, buf);
  const double r3 = block_sum(high, buf), r4 = block_sum(dual, buf), r5 = block_sum(kl, buf);
  const double r6 = block_sum(ratio, buf);
  const double r7 = block_reduce(rmin, INFINITY, MinOp(), buf), r8 = block_reduce(rmax, -INFINITY, MaxOp(), buf);
  if (threadIdx.x == 0) {
    out[0] = r0; out[1] = r1; out[2] = r2; out[3] = r3; out[4] = r4;
    out[5] = r5; out[6] = r6; out[7] = r7; out[8] = r8;
  }
}

// Totals over rows that every combine needs: valid tokens and rows with any.
__device__ void count_rows(const double* parts, int stride, int64_t B, double* buf, double& total,
                           double& rows_with) {
  double n = 0, r = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double c = part(parts + b * stride + 1);
    n += c;
    r += c > 0 ? 1 : 0;
  }
  total = block_sum(n, buf);
  rows_with = block_sum(r, buf);
}

// Run by the last block only. parts: [B, kPolicyParts] float64; num_tokens: [] float64 or nullptr
// loss: [] float32 out; stats: [8] float32 out; row_scale: [B] float32 out
__device__ void policy_combine(const double* parts, int64_t B, double numel, const double* __restrict__ num_tokens,
                               int64_t agg, double* buf, float* __restrict__ loss_out, float* __restrict__ stats,
                               float* __restrict__ row_scale) {
  double total, rows_with;
  count_rows(parts, kPolicyParts, B, buf, total, rows_with);
  const double nt = num_tokens ? *num_tokens : 0.0;
  double loss = 0, low = 0, high = 0, dual = 0, kl = 0, ratio = 0, rmin = INFINITY, rmax = -INFINITY;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double* p = parts + b * kPolicyParts;
    const double w = ppo_row_weight(agg, part(p + 1), total, rows_with, numel, nt);
    row_scale[b] = static_cast<float>(w);
    loss += w * part(p);
    low += part(p + 2);
    high += part(p + 3);
    dual += part(p + 4);
    kl += part(p + 5);
    ratio += part(p + 6);
    rmin = fmin(rmin, part(p + 7));
    rmax = fmax(rmax, part(p + 8));
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

// One launch, grid max(B, 1) (B == 0: one block that only combines, writing the loss 0).
// parts: [max(B, 1), kPolicyParts] float64 scratch; counter: [] int32, zero at launch
__global__ void __launch_bounds__(kThreads) policy_fwd_kernel(
    const float* __restrict__ logp, const float* __restrict__ old_logp, const float* __restrict__ adv,
    const bool* __restrict__ mask, int64_t B, int64_t T, float clip_low, float clip_high, float dual_clip,
    const double* __restrict__ num_tokens, int64_t agg, double* parts, int* counter, float* __restrict__ loss_out,
    float* __restrict__ stats, float* __restrict__ row_scale) {
  __shared__ double buf[33];
  const int64_t row = blockIdx.x;
  if (row < B) {
    policy_row(logp, old_logp, adv, mask, row, T, clip_low, clip_high, dual_clip, buf, parts + row * kPolicyParts);
  }
  if (!last_block_to_arrive(counter)) return;
  policy_combine(parts, B, static_cast<double>(B * T), num_tokens, agg, buf, loss_out, stats, row_scale);
  if (threadIdx.x == 0) *counter = 0;
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

// values, old_values, returns: [B, T] float32; mask: [B, T] bool
// out: [kValueParts] float64, this row's partials (written by thread 0)
__device__ void value_row(const float* __restrict__ v, const float* __restrict__ old_v, const float* __restrict__ ret,
                          const bool* __restrict__ mask, int64_t row, int64_t T, bool has_clip, float clip,
                          double* buf, double* __restrict__ out) {
  const int64_t base = row * T;
  double loss = 0, count = 0, clipped = 0, sum_r = 0, sum_e = 0;
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
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
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    const double dr = ret[i] - mean_r, de = (static_cast<double>(ret[i]) - v[i]) - mean_e;
    q_r += dr * dr;
    q_e += de * de;
  }
  q_r = block_sum(q_r, buf);
  q_e = block_sum(q_e, buf);
  if (threadIdx.x == 0) {
    out[0] = loss; out[1] = count; out[2] = clipped; out[3] = mean_r; out[4] = q_r; out[5] = mean_e; out[6] = q_e;
  }
}

// Run by the last block only. parts: [B, kValueParts]; stats: [2] float32 out (vf_clipfrac, explained_var)
__device__ void value_combine(const double* parts, int64_t B, double numel, const double* __restrict__ num_tokens,
                              int64_t agg, double* buf, float* __restrict__ loss_out, float* __restrict__ stats,
                              float* __restrict__ row_scale) {
  double total, rows_with;
  count_rows(parts, kValueParts, B, buf, total, rows_with);
  const double n = total > 0 ? total : 1.0;
  double sr = 0, se = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double* p = parts + b * kValueParts;
    const double c = part(p + 1);
    sr += c * part(p + 3);
    se += c * part(p + 5);
  }
  const double mean_r = block_sum(sr, buf) / n, mean_e = block_sum(se, buf) / n;
  const double nt = num_tokens ? *num_tokens : 0.0;
  double loss = 0, clipped = 0, m2_r = 0, m2_e = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double* p = parts + b * kValueParts;
    const double c = part(p + 1);
    const double w = ppo_row_weight(agg, c, total, rows_with, numel, nt);
    row_scale[b] = static_cast<float>(w);
    loss += w * part(p);
    clipped += part(p + 2);
    // total sum of squares = within rows + between rows
    const double dr = part(p + 3) - mean_r, de = part(p + 5) - mean_e;
    m2_r += part(p + 4) + c * dr * dr;
    m2_e += part(p + 6) + c * de * de;
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

// One launch, grid max(B, 1), as policy_fwd_kernel.
// parts: [max(B, 1), kValueParts] float64 scratch; counter: [] int32, zero at launch
__global__ void __launch_bounds__(kThreads) value_fwd_kernel(
    const float* __restrict__ v, const float* __restrict__ old_v, const float* __restrict__ ret,
    const bool* __restrict__ mask, int64_t B, int64_t T, bool has_clip, float clip,
    const double* __restrict__ num_tokens, int64_t agg, double* parts, int* counter, float* __restrict__ loss_out,
    float* __restrict__ stats, float* __restrict__ row_scale) {
  __shared__ double buf[33];
  const int64_t row = blockIdx.x;
  if (row < B) value_row(v, old_v, ret, mask, row, T, has_clip, clip, buf, parts + row * kValueParts);
  if (!last_block_to_arrive(counter)) return;
  value_combine(parts, B, static_cast<double>(B * T), num_tokens, agg, buf, loss_out, stats, row_scale);
  if (threadIdx.x == 0) *counter = 0;
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

// The ticket counter of one forward call: [] int32 zeroed with cudaMemsetAsync on `stream`
// (a memset, not a kernel launch; at::zeros would launch a fill kernel). One per call, so
// forwards running concurrently on other streams never share a counter.
at::Tensor zeroed_counter(const at::Tensor& ref, cudaStream_t stream) {
  at::Tensor counter = at::empty({}, ref.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(counter.data_ptr<int>(), 0, sizeof(int), stream));
  return counter;
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
  at::Tensor counter = zeroed_counter(logprobs, stream);
  policy_fwd_kernel<<<static_cast<unsigned>(std::max<int64_t>(B, 1)), kThreads, 0, stream>>>(
      logprobs.data_ptr<float>(), old_logprobs.data_ptr<float>(), advantages.data_ptr<float>(), mask.data_ptr<bool>(),
      B, T, static_cast<float>(clip_low), static_cast<float>(clip_high),
      dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f, nt, loss_agg, parts.data_ptr<double>(),
      counter.data_ptr<int>(), loss.data_ptr<float>(), stats.data_ptr<float>(), row_scale.data_ptr<float>());
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
  at::Tensor counter = zeroed_counter(values, stream);
  value_fwd_kernel<<<static_cast<unsigned>(std::max<int64_t>(B, 1)), kThreads, 0, stream>>>(
      values.data_ptr<float>(), old_values.data_ptr<float>(), returns.data_ptr<float>(), mask.data_ptr<bool>(), B, T,
      clip.has_value(), clip.has_value() ? static_cast<float>(*clip) : 0.f, nt, loss_agg, parts.data_ptr<double>(),
      counter.data_ptr<int>(), loss.data_ptr<float>(), stats.data_ptr<float>(), row_scale.data_ptr<float>());
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
