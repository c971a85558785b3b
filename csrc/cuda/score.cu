// Absolute-score reward-model loss (regression, ordinal) on CUDA.
//   forward: one block (P is a batch of scored responses: small) sums the loss and the stats
//     over the P elements in a fixed order, writing each element's d pred; for ordinal, then
//     each threshold's gradient sum, one block reduction per threshold (the elements whose
//     level borders it recompute their terms). No atomics: deterministic; no host sync.
//   The backward is an elementwise multiply (csrc/autograd/score.cpp).
// Only light ATen/c10 headers here.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf/block_reduce.cuh"
#include "rlhf/score.h"
#include "rlhf/score_op.h"

namespace rlhf {
namespace {

constexpr int kThreads = 1024;

// pred: [P] float32; target: [P] float32 or nullptr; level: [P] int32/int64 or nullptr;
// t: [K-1] float32 or nullptr. loss: [] out; stats: [kNumScoreStats] out; d_pred: [P] out;
// d_t: [K-1] out (ordinal).
template <typename L>
__global__ void __launch_bounds__(kThreads) score_fwd_kernel(ScoreArgs<L> a, ScoreOutputs out) {
  __shared__ double buf[33];
  const int64_t P = a.P, K = a.K;
  const double n = P > 0 ? static_cast<double>(P) : 1.0;
  const float inv_n = static_cast<float>(1.0 / n);
  const bool ordinal = a.kind == kScoreOrdinal;
  double l = 0, first = 0, abs_err = 0, sx = 0, sx2 = 0;
  for (int64_t i = threadIdx.x; i < P; i += kThreads) {
    const float x = a.pred[i];
    sx += x;
    sx2 += static_cast<double>(x) * x;
    if (!ordinal) {
      const float err = x - a.target[i];
      l += 0.5 * static_cast<double>(err) * err;
      first += static_cast<double>(err) * err;
      abs_err += fabsf(err);
      out.d_pred[i] = err * inv_n;
      continue;
    }
    const int64_t y = static_cast<int64_t>(a.level[i]);
    const OrdinalPrediction guess = ordinal_predict(x, a.thresholds, K);
    first += guess.level == y ? 1 : 0;
    abs_err += fabs(static_cast<double>(guess.expected) - static_cast<double>(y));
    if (y < 0 || y >= K) {  // not validated: NaN loss, no gradient, never a read outside t
      l += __longlong_as_double(0x7ff8000000000000LL);
      out.d_pred[i] = 0.f;
      continue;
    }
    const bool has_lower = y > 0, has_upper = y < K - 1;
    const float lower = has_lower ? a.thresholds[y - 1] : 0.f, upper = has_upper ? a.thresholds[y] : 0.f;
    l += ordinal_nll(x, lower, upper, has_lower, has_upper);
    out.d_pred[i] = ordinal_grad(x, lower, upper, has_lower, has_upper).d_pred * inv_n;
  }
  l = block_sum(l, buf);
  first = block_sum(first, buf);
  abs_err = block_sum(abs_err, buf);
  sx = block_sum(sx, buf);
  sx2 = block_sum(sx2, buf);
  if (threadIdx.x == 0) {
    const double mean = sx / n;
    *out.loss = static_cast<float>(l / n);
    out.stats[kScoreFirst] = static_cast<float>(first / n);
    out.stats[kScoreMae] = static_cast<float>(abs_err / n);
    out.stats[kScorePredMean] = static_cast<float>(mean);
    out.stats[kScorePredStd] = static_cast<float>(sqrt(fmax(sx2 / n - mean * mean, 0.0)));
  }
  if (!ordinal) return;
  // threshold k borders level k (as its upper bound) and level k + 1 (as its lower bound)
  for (int64_t k = 0; k < K - 1; ++k) {
    double g = 0;
    for (int64_t i = threadIdx.x; i < P; i += kThreads) {
      const int64_t y = static_cast<int64_t>(a.level[i]);
      if (y != k && y != k + 1) continue;
      const bool has_lower = y > 0, has_upper = y < K - 1;
      const float lower = has_lower ? a.thresholds[y - 1] : 0.f, upper = has_upper ? a.thresholds[y] : 0.f;
      const OrdinalGrad d = ordinal_grad(a.pred[i], lower, upper, has_lower, has_upper);
      g += y == k ? d.d_upper : d.d_lower;
    }
    g = block_sum(g, buf);
    if (threadIdx.x == 0) out.d_thresholds[k] = static_cast<float>(g / n);
  }
}

// The device launchers of rlhf/score_op.h (which checks, converts and allocates).
struct CudaScore {
  static void check_values(const at::Tensor& level, const at::Tensor& thresholds, const char* op) {
    const c10::cuda::CUDAGuard guard(level.device());
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
    detail::check_score_values(level, thresholds, op);  // one host sync
  }

  template <typename L>
  static void score_forward(const ScoreArgs<L>& a, const ScoreOutputs& out, const at::Tensor& like) {
    const c10::cuda::CUDAGuard guard(like.device());
    score_fwd_kernel<L><<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("score_fwd", &rlhf::score_forward<rlhf::CudaScore>); }
