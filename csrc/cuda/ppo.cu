// PPO policy and value losses on CUDA: the kernels and launchers behind rlhf/ppo_op.h (the host
// side, row_scale), over rlhf/ppo.h (the per-token math, the options' instantiations, the combine).
//
// Forward, one kernel launch per loss, with max(B, 1) blocks of kThreads threads:
//   1. block b reduces row b to float64 partials (fixed-order block reductions) and
//      stores them in `parts`;
//   2. it then draws a ticket from an int32 counter (last_block_to_arrive); the block that
//      draws the last ticket combines all rows in a fixed order and writes the loss, the
//      statistics and each row's weight.
// Which block comes last varies from run to run, but the combine reads every row's
// partials from `parts` in the same order whichever block runs it, so results are
// bitwise the same on every run (the only atomic is the integer ticket). The counter is
// zeroed per call (launch_forward), never a static one.
// Backward, one elementwise launch. What has run on a GPU: benchmarks/RESULTS.md.
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "rlhf/block_reduce.cuh"
#include "rlhf/ppo.h"
#include "rlhf/ppo_op.h"

namespace rlhf {
namespace {

// One block size for the row pass and the combine, since the last row block runs the combine
// (its threads each take a strided set of rows: a fixed order for a given B).
constexpr int kThreads = 256;

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

// Column k of the policy partials or totals (rlhf/ppo.h: combine_part) over the block, in every thread.
__device__ __forceinline__ double block_combine_part(int k, double v, double* buf) {
  if (k == kPartRatioMin) return block_reduce(v, INFINITY, MinOp(), buf);
  if (k == kPartRatioMax) return block_reduce(v, -INFINITY, MaxOp(), buf);
  return block_sum(v, buf);
}

// Row `row`'s float64 sums over its valid tokens of logp - old_logp, of old_logp - rollout (rollout
// read only with a row-level correction) and of 1, in s; in every thread.
template <typename O>
__device__ void row_sums(const PolicyArgs& p, const O& o, int64_t row, double* buf, double (&s)[3]) {
  s[0] = s[1] = s[2] = 0;
  for (int64_t i = row * p.T + threadIdx.x; i < (row + 1) * p.T; i += kThreads) {
    if (!p.mask[i]) continue;
    s[0] += static_cast<double>(p.logp[i]) - p.old_logp[i];
    if (has_row_is(o)) s[1] += static_cast<double>(p.old_logp[i]) - p.rollout[i];
    s[2] += 1;
  }
  for (double& x : s) x = block_sum(x, buf);
}

// out: [kPolicyParts] float64, row `row`'s partials (written by thread 0). O: DefaultOptions for
// the plain loss, PolicyOptions (p.opt) under options (rlhf/ppo.h).
template <typename O>
__device__ void policy_row(const PolicyArgs& p, int64_t row, double* buf, double* __restrict__ out) {
  const O o(p.opt);
  const int64_t base = row * p.T;
  float row_ratio = 1.f, row_log_w = 0.f;
  if (needs_row_sums(o)) {
    double s[3];
    row_sums(p, o, row, buf, s);
    if (o.seq_ratio) row_ratio = sequence_ratio(s[0], s[2]);
    if (has_row_is(o)) row_log_w = row_log_weight(s[1], s[2], o);
  }
  const bool token_is = o.is_correction != kIsNone && o.is_token;
  constexpr bool plain = std::is_same_v<O, DefaultOptions>;
  // this thread's partials (the plain loss skips the last three); the row_grad column first sums
  // d(c*l)/dlogp, row_grad_factor's grad_sum
  double acc[kPolicyParts];
  init_policy_totals(acc);
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    const int64_t i = base + t;
    if (!p.mask[i]) continue;
    const auto tok = policy_token(p.logp[i], p.old_logp[i], p.adv[i], token_is ? p.rollout[i] : 0.f, row_ratio,
                                  row_log_w, p.clip_low, p.clip_high, p.dual_clip, o);
    // in kPolicyPartNames' order: loss, count, low, high, dual, kl, ratio, ratio_min, ratio_max, row_grad, ...
    const double x[kPolicyParts] = {tok.loss,  1.0,       tok.is_low, tok.is_high, tok.is_dual,   tok.kl,
                                    tok.ratio, tok.ratio, tok.ratio,  tok.dlogp,   tok.is_weight, tok.is_capped};
    RLHF_UNROLL
    for (int k = 0; k < kPolicyParts; ++k)
      if (!plain || k < kPartRowGrad) acc[k] = combine_part(k, acc[k], x[k]);
  }
  RLHF_UNROLL
  for (int k = 0; k < kPolicyParts; ++k)
    if (!plain || k < kPartRowGrad) acc[k] = block_combine_part(k, acc[k], buf);
  if constexpr (plain) {  // g_b = 1, every applied weight 1, nothing capped
    acc[kPartRowGrad] = 1;
    acc[kPartIsWeight] = acc[kPartCount];
    acc[kPartIsCapped] = 0;
  } else {
    const float row_weight = has_row_is(o) ? is_weight(row_log_w, o.is_correction, o.is_cap).weight : 1.f;
    acc[kPartRowGrad] =
        row_grad_factor(o, acc[kPartRowGrad], acc[kPartCount], row_ratio, row_weight, p.clip_low, p.clip_high);
  }
  if (threadIdx.x == 0) {
    RLHF_UNROLL
    for (int k = 0; k < kPolicyParts; ++k) out[k] = acc[k];
  }
}

// One launch, grid max(B, 1) (B == 0: one block that only combines, writing the loss 0): block b
// stores row b's partials (Row), the last block to arrive combines them (rlhf/ppo.h: combine_rows).
// parts: [max(B, 1), kParts] float64 scratch; counter: [] int32, zero at launch
template <typename Args, int kParts, void (*Row)(const Args&, int64_t, double*, double*)>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Args p, const Normalizer norm, double* parts,
                                                       int* counter, const LossOutputs out) {
  __shared__ double buf[33];
  const int64_t row = blockIdx.x;
  if (row < p.B) Row(p, row, buf, parts + row * kParts);
  if (!last_block_to_arrive(counter)) return;
  const auto part = [&](int64_t b, int k) { return __ldcg(parts + b * kParts + k); };  // see last_block_to_arrive
  const auto reduce = [&](int k, double x) { return block_combine_part(k, x, buf); };
  combine_rows<kParts>(Rows{int64_t{threadIdx.x}, p.B, int64_t{blockDim.x}, part, reduce}, norm,
                       static_cast<double>(p.B * p.T), out);
  if (threadIdx.x == 0) *counter = 0;
}

// out[i] = grad * row_scale[row of i] * dx(i) where the mask is set, else 0 (elementwise backward).
template <typename Args, typename DX>
__device__ void grad_elementwise(const Args& p, const float* __restrict__ grad, const float* __restrict__ row_scale,
                                 float* __restrict__ out, DX dx) {
  const float g = *grad;  // read here: no host sync
  const int64_t n = p.B * p.T;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = p.mask[i] ? g * row_scale[i / p.T] * dx(i) : 0.f;
}

// grad: [] float32; row_scale: [B]; out: [B, T] d logprobs
template <typename O>
__global__ void policy_bwd_kernel(const PolicyArgs p, const float* __restrict__ grad,
                                  const float* __restrict__ row_scale, float* __restrict__ out) {
  const O o(p.opt);
  const bool token_is = o.is_correction != kIsNone && o.is_token;
  grad_elementwise(p, grad, row_scale, out, [&](int64_t i) {
    return policy_grad_token(p.logp[i], p.old_logp[i], p.adv[i], token_is ? p.rollout[i] : 0.f, p.clip_low,
                             p.clip_high, p.dual_clip, o);
  });
}

// out: [kValueParts] float64, row `row`'s partials (written by thread 0). Two passes over the row:
// the sums (the mean columns first sum R and R - V), then the M2 columns with the row's means.
__device__ void value_row(const ValueArgs& p, int64_t row, double* buf, double* __restrict__ out) {
  const int64_t base = row * p.T;
  double acc[kValueParts] = {};  // this thread's
  RLHF_UNROLL
  for (int pass = 0; pass < 2; ++pass) {
    const auto in_pass = [&](int k) { return (k == kVPartM2R || k == kVPartM2Err) == (pass == 1); };
    for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
      const int64_t i = base + t;
      if (!p.mask[i]) continue;
      const auto tok = ppo_value_token(p.values[i], p.old_values[i], p.returns[i], p.has_clip, p.clip);
      const double r = p.returns[i], e = r - p.values[i], dr = r - acc[kVPartMeanR], de = e - acc[kVPartMeanErr];
      const double x[kValueParts] = {tok.loss, 1.0, tok.is_clipped, r, dr * dr, e, de * de};
      RLHF_UNROLL
      for (int k = 0; k < kValueParts; ++k)
        if (in_pass(k)) acc[k] += x[k];
    }
    RLHF_UNROLL
    for (int k = 0; k < kValueParts; ++k)
      if (in_pass(k)) acc[k] = block_sum(acc[k], buf);
    if (pass == 0) {
      const double n = acc[kVPartCount] > 0 ? acc[kVPartCount] : 1.0;
      acc[kVPartMeanR] /= n;
      acc[kVPartMeanErr] /= n;
    }
  }
  if (threadIdx.x == 0) {
    RLHF_UNROLL
    for (int k = 0; k < kValueParts; ++k) out[k] = acc[k];
  }
}

__global__ void value_bwd_kernel(const ValueArgs p, const float* __restrict__ grad, const float* __restrict__ row_scale,
                                 float* __restrict__ out) {
  grad_elementwise(p, grad, row_scale, out, [&](int64_t i) {
    return ppo_value_token(p.values[i], p.old_values[i], p.returns[i], p.has_clip, p.clip).dvalue;
  });
}

// One forward launch (fwd_kernel) with grid max(B, 1). Its scratch is one allocation: the rows'
// float64 partials [blocks, n_parts], then the int32 ticket counter, zeroed by cudaMemsetAsync on
// the current stream (a memset, not a kernel; a memset node in a CUDA graph). Per call, so
// forwards on concurrent streams never share a counter.
template <typename Args, typename Kernel>
void launch_forward(Kernel kernel, const Args& p, const Normalizer& norm, const LossOutputs& out,
                    const at::Tensor& like, int n_parts, const char* op) {
  TORCH_CHECK_VALUE(p.B <= 2147483647LL, op, ": too many rows for one launch: ", p.B);
  const c10::cuda::CUDAGuard guard(like.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::max<int64_t>(p.B, 1);
  at::Tensor scratch = at::empty({blocks * n_parts + 1}, like.options().dtype(at::kDouble));
  double* parts = scratch.data_ptr<double>();
  int* counter = reinterpret_cast<int*>(parts + blocks * n_parts);
  C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(int), stream));
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, norm, parts, counter, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One elementwise backward launch (policy_bwd_kernel or value_bwd_kernel).
template <typename Args, typename Kernel>
void launch_backward(Kernel kernel, const Args& p, const float* grad, const float* row_scale, float* out,
                     const at::Tensor& like) {
  const c10::cuda::CUDAGuard guard(like.device());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((p.B * p.T + 255) / 256, 65535));
  kernel<<<static_cast<unsigned>(blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(p, grad, row_scale, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The device launchers of rlhf/ppo_op.h (which checks, converts and allocates).
struct CudaPPO {
  // the plain loss (options = 0) runs the DefaultOptions instantiation of each kernel
  static void policy_forward(const PolicyArgs& p, const Normalizer& norm, const LossOutputs& out,
                             const at::Tensor& like) {
    launch_forward(p.plain ? fwd_kernel<PolicyArgs, kPolicyParts, policy_row<DefaultOptions>>
                           : fwd_kernel<PolicyArgs, kPolicyParts, policy_row<PolicyOptions>>,
                   p, norm, out, like, kPolicyParts, "ppo_policy_loss");
  }
  static void policy_backward(const PolicyArgs& p, const float* grad, const float* row_scale, float* out,
                              const at::Tensor& like) {
    launch_backward(p.plain ? policy_bwd_kernel<DefaultOptions> : policy_bwd_kernel<PolicyOptions>, p, grad,
                    row_scale, out, like);
  }
  static void value_forward(const ValueArgs& p, const Normalizer& norm, const LossOutputs& out,
                            const at::Tensor& like) {
    launch_forward(fwd_kernel<ValueArgs, kValueParts, value_row>, p, norm, out, like, kValueParts,
                   "ppo_value_loss");
  }
  static void value_backward(const ValueArgs& p, const float* grad, const float* row_scale, float* out,
                             const at::Tensor& like) {
    launch_backward(value_bwd_kernel, p, grad, row_scale, out, like);
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_policy_fwd", &rlhf::ppo_policy_forward_plain<rlhf::CudaPPO>);
  m.impl("ppo_policy_options_fwd", &rlhf::ppo_policy_forward<rlhf::CudaPPO>);
  m.impl("ppo_policy_bwd", &rlhf::ppo_policy_backward<rlhf::CudaPPO>);
  m.impl("ppo_value_fwd", &rlhf::ppo_value_forward<rlhf::CudaPPO>);
  m.impl("ppo_value_bwd", &rlhf::ppo_value_backward<rlhf::CudaPPO>);
}
