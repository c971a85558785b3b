// Bradley-Terry and all-pairs ranking losses on CUDA.
//   bt forward: one block sums the P pairs in a fixed order (P is a batch of preference
//     pairs: small), backward elementwise.
//   ranking forward: one block per prompt reduces its K x K pairs, one block combines the
//     prompts in order; backward: one block per prompt, a thread per response.
// Deterministic (no atomics); no host sync. Only light ATen/c10 headers here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf/block_reduce.cuh"
#include "rlhf/bt.h"
#include "rlhf/bt_op.h"

namespace rlhf {
namespace {

constexpr int kThreads = 1024;
constexpr int kPromptThreads = 128;

// chosen, rejected: [P] float32; margin: [P] float32 or nullptr
// loss: [] float32 out; stats: [2] float32 out (accuracy, margin_mean)
__global__ void __launch_bounds__(kThreads) bt_fwd_kernel(const float* __restrict__ chosen,
                                                          const float* __restrict__ rejected,
                                                          const float* __restrict__ margin, int64_t P, float eps,
                                                          double center_coef, float* __restrict__ loss_out,
                                                          float* __restrict__ stats) {
  __shared__ double buf[33];
  double l = 0, sq = 0, acc = 0, mar = 0;
  for (int64_t i = threadIdx.x; i < P; i += kThreads) {
    const float diff = chosen[i] - rejected[i];
    l += bt_pair_loss(margin ? diff - margin[i] : diff, eps);
    const double s = static_cast<double>(chosen[i]) + rejected[i];
    sq += s * s;
    acc += chosen[i] > rejected[i] ? 1 : 0;
    mar += diff;
  }
  l = block_sum(l, buf);
  sq = block_sum(sq, buf);
  acc = block_sum(acc, buf);
  mar = block_sum(mar, buf);
  if (threadIdx.x == 0) {
    const double n = P > 0 ? static_cast<double>(P) : 1.0;
    *loss_out = static_cast<float>((l + center_coef * sq) / n);
    stats[kBTAccuracy] = static_cast<float>(acc / n);
    stats[kBTMarginMean] = static_cast<float>(mar / n);
  }
}

__global__ void bt_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ chosen,
                              const float* __restrict__ rejected, const float* __restrict__ margin, int64_t P,
                              float eps, float center_coef2, float* __restrict__ d_chosen,
                              float* __restrict__ d_rejected) {
  const float scale = static_cast<float>(static_cast<double>(*grad) / (P > 0 ? static_cast<double>(P) : 1.0));
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < P;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float diff = chosen[i] - rejected[i];
    const float gd = bt_pair_grad(margin ? diff - margin[i] : diff, eps);
    const float gs = center_coef2 * (chosen[i] + rejected[i]);
    d_chosen[i] = scale * (gd + gs);
    d_rejected[i] = scale * (gs - gd);
  }
}

// rewards: [P, K] float32; valid: [P, K] bool or nullptr; parts: [P, 3] float64 out
// (loss sum, pairs, correct pairs)
__global__ void __launch_bounds__(kPromptThreads) ranking_rows_kernel(const float* __restrict__ rewards,
                                                                      const bool* __restrict__ valid, int64_t K,
                                                                      double* __restrict__ parts) {
  __shared__ double buf[33];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * K;
  double l = 0, n = 0, correct = 0;
  for (int64_t q = threadIdx.x; q < K * K; q += kPromptThreads) {
    const int64_t i = q / K, j = q % K;
    if (j <= i || (valid && (!valid[base + i] || !valid[base + j]))) continue;
    const float d = rewards[base + i] - rewards[base + j];
    l -= log_sigmoid(d);
    n += 1;
    correct += d > 0.f ? 1 : 0;
  }
  l = block_sum(l, buf);
  n = block_sum(n, buf);
  correct = block_sum(correct, buf);
  if (threadIdx.x == 0) {
    double* out = parts + static_cast<int64_t>(blockIdx.x) * 3;
    out[0] = l;
    out[1] = n;
    out[2] = correct;
  }
}

// loss: [] float32 out; stats: [1] float32 out; prompt_scale: [P] float32 out
__global__ void __launch_bounds__(kThreads) ranking_combine_kernel(const double* __restrict__ parts, int64_t P,
                                                                   float* __restrict__ loss_out,
                                                                   float* __restrict__ stats,
                                                                   float* __restrict__ prompt_scale) {
  __shared__ double buf[33];
  double prompts = 0, pairs = 0, correct = 0;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) {
    prompts += parts[p * 3 + 1] > 0 ? 1 : 0;
    pairs += parts[p * 3 + 1];
    correct += parts[p * 3 + 2];
  }
  prompts = block_sum(prompts, buf);
  pairs = block_sum(pairs, buf);
  correct = block_sum(correct, buf);
  double loss = 0;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) {
    const double n = parts[p * 3 + 1];
    const double w = n > 0 ? 1.0 / (n * prompts) : 0.0;
    prompt_scale[p] = static_cast<float>(w);
    loss += w * parts[p * 3];
  }
  loss = block_sum(loss, buf);
  if (threadIdx.x == 0) {
    *loss_out = static_cast<float>(loss);
    stats[kRankingAccuracy] = static_cast<float>(pairs > 0 ? correct / pairs : 0.0);
  }
}

// out: [P, K] float32 d rewards
__global__ void ranking_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ rewards,
                                   const bool* __restrict__ valid, const float* __restrict__ prompt_scale, int64_t K,
                                   float* __restrict__ out) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * K;
  const float s = *grad * prompt_scale[blockIdx.x];
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    float acc = 0.f;
    if (!valid || valid[base + i]) {
      const float ri = rewards[base + i];
      for (int64_t j = 0; j < K; ++j) {
        if (j == i || (valid && !valid[base + j])) continue;
        const float rj = rewards[base + j];
        acc += j > i ? -sigmoid(rj - ri) : sigmoid(ri - rj);
      }
    }
    out[base + i] = s * acc;
  }
}

// The device launchers of rlhf/bt_op.h (which checks, converts and allocates).
struct CudaBT {
  static void bt_forward(const PairArgs& a, const LossOutputs& out, const at::Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    bt_fwd_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.chosen, a.rejected, a.margin, a.P, a.label_smoothing, a.center_coef, out.loss, out.stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void bt_backward(const PairArgs& a, const float* grad, float* dc, float* dr, const at::Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((a.P + 255) / 256, 65535));
    bt_bwd_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad, a.chosen, a.rejected, a.margin, a.P, a.label_smoothing, static_cast<float>(2 * a.center_coef), dc, dr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void ranking_forward(const RankingArgs& a, const LossOutputs& out, const at::Tensor& like) {
    TORCH_CHECK_VALUE(a.P <= 2147483647LL, "ranking_loss: too many prompts for one launch: ", a.P);
    const c10::cuda::CUDAGuard guard(like.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor parts = at::empty({std::max<int64_t>(a.P, 1), 3}, like.options().dtype(at::kDouble));
    if (a.P > 0) {
      ranking_rows_kernel<<<static_cast<unsigned>(a.P), kPromptThreads, 0, stream>>>(a.rewards, a.valid, a.K,
                                                                                    parts.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ranking_combine_kernel<<<1, kThreads, 0, stream>>>(parts.data_ptr<double>(), a.P, out.loss, out.stats,
                                                       out.row_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void ranking_backward(const RankingArgs& a, const float* grad, const float* prompt_scale, float* out,
                               const at::Tensor& like) {
    TORCH_CHECK_VALUE(a.P <= 2147483647LL, "ranking_loss backward: too many prompts for one launch: ", a.P);
    const c10::cuda::CUDAGuard guard(like.device());
    ranking_bwd_kernel<<<static_cast<unsigned>(a.P), kPromptThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad, a.rewards, a.valid, prompt_scale, a.K, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("bt_fwd", &rlhf::bt_forward<rlhf::CudaBT>);
  m.impl("bt_bwd", &rlhf::bt_backward<rlhf::CudaBT>);
  m.impl("ranking_fwd", &rlhf::ranking_forward<rlhf::CudaBT>);
  m.impl("ranking_bwd", &rlhf::ranking_backward<rlhf::CudaBT>);
}
