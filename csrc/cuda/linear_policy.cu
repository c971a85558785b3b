// The policy head (hidden states straight to the PPO policy objective) on CUDA.
//
// The row chunks, the matmuls (cuBLAS through at::mm / at::addmm with float32 output, on the
// current stream), the gradient accumulation, the loss and its statistics are the shared host
// code of rlhf/linear_policy_op.h; this file holds the matmul wrappers and the one epilogue
// kernel launched on each chunk's [nr, V] float32 logits, one 256-thread block per row, with the
// load / merge helpers of the logprobs kernels (rlhf/softmax.cuh, rlhf/linear.cuh):
//   1. the block's online-softmax statistics of the whole row, bias added (one read of the
//      row), merged in a fixed order (block_merge: deterministic); thread 0 takes the label's
//      logit -> logp, H, the token's KL estimate and gradients (rlhf/linear_policy.h), writes
//      the per-token outputs and shares (m, log d, H, g_logp, g_H) with the block;
//   2. (with gradients) dlogits over the row in the operands' dtype (a second read of the row,
//      one write; in place for float32).
// Masked rows give 0 and a zero gradient row (their labels are never read); a label outside
// [0, V) at a valid row gives NaN logp and entropy and a zero gradient row, never a read
// outside the row, unless the `validate` check (one host sync, skipped while a CUDA graph is
// captured) raised first.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "rlhf/linear.cuh"
#include "rlhf/linear_policy.h"
#include "rlhf/linear_policy_op.h"
#include "rlhf/logprobs.h"
#include "rlhf/softmax.cuh"

namespace rlhf {
namespace {

// Per row of a chunk (one block):
//   z       [nr, V] float32 logits (no bias), rows contiguous
//   dz      [nr, V] out: dlogits in To, or nullptr (no gradient); may alias z (To = float):
//           every entry is read by the thread that writes it, before it writes it
//   bias    [V] float32, or nullptr
//   labels, mask, old_logp, adv, weight, policy_scale [nr]; ref, rollout [nr] or nullptr
//   (PolicyHeadRows)
//   logp, entropy [nr] out; kl [nr] out or nullptr
template <typename To, typename L, int K>
__global__ void __launch_bounds__(kThreads)
    policy_head_kernel(const float* z, To* dz, const float* __restrict__ bias, const L* __restrict__ labels,
                       const bool* __restrict__ mask, const float* __restrict__ old_logp,
                       const float* __restrict__ adv, const float* __restrict__ ref,
                       const float* __restrict__ rollout, const float* __restrict__ weight,
                       const float* __restrict__ policy_scale, int64_t V, float inv_t, PolicyHeadArgs a,
                       float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ kl) {
  const int64_t row = blockIdx.x;
  const float* zr = z + row * V;
  To* gr = dz != nullptr ? dz + row * V : nullptr;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * K, step = static_cast<int64_t>(kThreads) * K;
  if (!mask[row]) {  // uniform over the block
    if (threadIdx.x == 0) {
      logp[row] = entropy[row] = 0.f;
      if (kl != nullptr) kl[row] = 0.f;
    }
    if (gr != nullptr) {
      const float zero[K] = {};
      for (int64_t j = first; j < V; j += step) store<To, K>(gr + j, zero);
    }
    return;
  }
  SoftmaxStats st = softmax_stats_empty();
  for (int64_t j = first; j < V; j += step) {
    float s[K];
    load_biased<K>(zr + j, bias ? bias + j : nullptr, inv_t, s);
    softmax_stats_fold(st, s);
  }
  st = block_merge(st, softmax_stats_empty());
  __shared__ float row_consts[5];  // m, log d, H, g_logp, g_H
  const int64_t y = static_cast<int64_t>(labels[row]);
  const bool in_vocab = y >= 0 && y < V;
  if (threadIdx.x == 0) {
    const float log_d = logf(st.d);
    const float lp = in_vocab ? ((zr[y] + (bias ? bias[y] : 0.f)) * inv_t - st.m) - log_d : NAN;
    const float h = in_vocab ? log_d - st.w / st.d : NAN;
    const PolicyHeadToken tok =
        policy_head_token(lp, old_logp[row], adv[row], rollout ? rollout[row] : 0.f, ref != nullptr,
                          ref ? ref[row] : 0.f, weight[row], policy_scale[row], a);
    logp[row] = lp;
    entropy[row] = h;
    if (kl != nullptr) kl[row] = tok.kl;
    row_consts[0] = st.m;
    row_consts[1] = log_d;
    row_consts[2] = h;
    row_consts[3] = tok.g_logp;
    row_consts[4] = tok.g_entropy;
  }
  if (gr == nullptr) return;  // uniform over the block
  __syncthreads();
  const float m = row_consts[0], log_d = row_consts[1], h = row_consts[2], gl = row_consts[3], gh = row_consts[4];
  for (int64_t j = first; j < V; j += step) {
    float s[K];
    load_biased<K>(zr + j, bias ? bias + j : nullptr, inv_t, s);
    logprob_grad_vec(s, j, y, m, log_d, h, gl, gh, inv_t, in_vocab);
    store<To, K>(gr + j, s);
  }
}

struct CudaEpilogue {
  // the float32 logits of a chunk, their 16-bit dlogits copy and (when taken) the float32
  // d_weight accumulator, together: 1 GiB less 64 MiB for the per-token vectors and cuBLAS
  static constexpr int64_t kDefaultBufferBytes = (int64_t{1} << 30) - (int64_t{64} << 20);
  // a larger d_weight accumulates in its own dtype (rlhf/linear_policy_op.h)
  static constexpr int64_t kAccumulatorBytes = int64_t{512} << 20;
  // chunks of at most 2048 rows whatever N is (batch invariance, rlhf/linear_policy_op.h): wide
  // enough for cuBLAS's full rate at H >= 1024, and a short batch pads at most 2047 rows
  static constexpr int64_t kMaxRows = 2048;

  static at::Tensor operand(const at::Tensor& t) { return t; }
  static void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { rlhf::mm_f32(out, a, b); }
  static void addmm_f32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { rlhf::addmm_f32(acc, a, b); }

  // detail::check_masked_label_range (one host sync), except while the current stream is being
  // captured into a CUDA graph: there a bad label gives NaN and a zero gradient row
  static void check_label_range(const at::Tensor& labels, const at::Tensor& mask, int64_t V, const char* op) {
    if (labels.numel() == 0) return;
    const c10::cuda::CUDAGuard guard(labels.device());
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
    detail::check_masked_label_range(labels, mask, V, op);
  }

  static void policy(const at::Tensor& logits, const at::Tensor& dlogits, const float* bias,
                     const PolicyHeadRows& t, float inv_t, const PolicyHeadArgs& a) {
    const int64_t nr = logits.size(0), V = logits.size(1);
    check_rows(nr, "linear_policy_loss");
    const c10::cuda::CUDAGuard guard(logits.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const float* z = logits.data_ptr<float>();
    const auto launch = [&](auto* g) {
      using To = std::remove_pointer_t<decltype(g)>;
      with_labels(t.labels, [&](auto* lab) {
        using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
        // K = 4: float32 loads; stores of 4 entries (8 bytes for 16-bit types) need 4-entry alignment
        with_vector_width<float>(V, {z, bias, g}, [&](auto k) {
          policy_head_kernel<To, L, decltype(k)::value><<<static_cast<unsigned>(nr), kThreads, 0, stream>>>(
              z, g, bias, lab, t.mask, t.old_logp, t.adv, t.ref, t.rollout, t.weight, t.policy_scale, V, inv_t, a,
              t.logp, t.entropy, t.kl);
        });
      });
    };
    with_dlogits(dlogits, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("linear_policy_fwd", &rlhf::linear_policy_forward<rlhf::CudaEpilogue>);
  m.impl("linear_policy_fwd_grad", &rlhf::linear_policy_forward_grad<rlhf::CudaEpilogue>);
}
