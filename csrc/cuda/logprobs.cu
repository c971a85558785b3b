// Token log-probabilities, entropy and full-vocabulary KL on CUDA.
//
// One thread block per row. Each thread walks the row with 16-byte vector loads
// (8 bf16/fp16 or 4 fp32 entries; scalar loads when the row is not 16-byte aligned),
// keeping online-softmax statistics (rlhf/logprobs.h): per vector, one max, at most one
// rebase, one exp per entry. The threads' statistics are merged by a fixed shuffle tree
// then across warps (deterministic, no atomics). Forward: one read of the logits.
// Backward: one read and one write per entry, in the logits' dtype; the output may alias
// the logits (inplace), which is safe because every entry is read by the thread that
// writes it, before it writes it (no __restrict__ on those two pointers).
// Bad labels are rejected by the Python API before launch (one host sync); a bad label
// that gets here anyway gives NaN (forward) and a zero gradient row, never a wild read.
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "rlhf/logprobs.h"
#include "rlhf/logprobs_checks.h"
#include "rlhf/softmax.cuh"

namespace rlhf {
namespace {

// z: [N, V] logits; labels: [N] or nullptr (entropy only); logp: [N] out (with labels);
// entropy: [N] out; stats: [N, 2] out = (m, log d). K entries per load (V % K == 0 and
// 16-byte aligned rows when K > 1).
template <typename T, typename L, int K>
__global__ void __launch_bounds__(kThreads)
    logprobs_fwd_kernel(const T* __restrict__ z, const L* __restrict__ labels, int64_t V, float inv_t,
                        int64_t ignore_index, float* __restrict__ logp, float* __restrict__ entropy,
                        float* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  const T* zr = z + row * V;
  SoftmaxStats st = softmax_stats_empty();
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * K; j < V; j += static_cast<int64_t>(kThreads) * K) {
    float s[K];
    load_scaled<T, K>(zr + j, inv_t, s);
    softmax_stats_fold(st, s);
  }
  st = block_merge(st, softmax_stats_empty());
  if (threadIdx.x != 0) return;
  const float log_d = logf(st.d);
  stats[2 * row] = st.m;
  stats[2 * row + 1] = log_d;
  const float h = softmax_entropy(st);
  if (labels == nullptr) {
    entropy[row] = h;
    return;
  }
  const int64_t y = static_cast<int64_t>(labels[row]);
  if (y == ignore_index) {
    logp[row] = 0.f;
    entropy[row] = 0.f;
  } else if (y < 0 || y >= V) {
    logp[row] = NAN;
    entropy[row] = NAN;
  } else {
    logp[row] = softmax_logprob(st, static_cast<float>(zr[y]) * inv_t);
    entropy[row] = h;
  }
}

// grad: [N, V] out in T; may alias z (inplace).
template <typename T, typename L, int K>
__global__ void __launch_bounds__(kThreads)
    logprobs_bwd_kernel(const T* z, const L* __restrict__ labels, const float* __restrict__ g_logp,
                        const float* __restrict__ g_entropy, const float* __restrict__ stats,
                        const float* __restrict__ entropy, int64_t V, float inv_t, int64_t ignore_index, T* grad) {
  const int64_t row = blockIdx.x;
  const T* zr = z + row * V;
  T* gr = grad + row * V;
  int64_t y = -1;
  bool keep = true;
  if (labels != nullptr) {
    y = static_cast<int64_t>(labels[row]);
    keep = y != ignore_index && y >= 0 && y < V;
  }
  const float gl = g_logp ? g_logp[row] : 0.f, gh = g_entropy ? g_entropy[row] : 0.f;
  const float m = stats[2 * row], log_d = stats[2 * row + 1], h = entropy[row];
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * K; j < V; j += static_cast<int64_t>(kThreads) * K) {
    float s[K];
    load_scaled<T, K>(zr + j, inv_t, s);
    logprob_grad_vec(s, j, y, m, log_d, h, gl, gh, inv_t, keep);
    store<T, K>(gr + j, s);
  }
}

// z, zr: [N, V]; kl: [N] out; stats: [N, 4] out = (m, log d, m_r, log d_r).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    full_kl_fwd_kernel(const T* __restrict__ z, const T* __restrict__ zr, int64_t V, float inv_t,
                       float* __restrict__ kl, float* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  const T* a = z + row * V;
  const T* b = zr + row * V;
  KlStats st = kl_stats_empty();
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * K; j < V; j += static_cast<int64_t>(kThreads) * K) {
    float s[K], r[K];
    load_scaled<T, K>(a + j, inv_t, s);
    load_scaled<T, K>(b + j, inv_t, r);
    const float vm = max_nan(s), vmr = max_nan(r);
    if (!(vm <= st.m) || !(vmr <= st.mr))
      kl_stats_rebase(st, vm <= st.m ? st.m : vm, vmr <= st.mr ? st.mr : vmr);
    // a part whose max is still -inf has only seen -inf: measure it against 0 so its exps are 0
    const float ms = st.m == -INFINITY ? 0.f : st.m, mrs = st.mr == -INFINITY ? 0.f : st.mr;
#pragma unroll
    for (int k = 0; k < K; ++k) kl_stats_add(st, s[k], r[k], __expf(s[k] - ms), __expf(r[k] - mrs));
  }
  st = block_merge(st, kl_stats_empty());
  if (threadIdx.x != 0) return;
  kl[row] = kl_value(st);
  stats[4 * row] = st.m;
  stats[4 * row + 1] = logf(st.d);
  stats[4 * row + 2] = st.mr;
  stats[4 * row + 3] = logf(st.dr);
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
    full_kl_bwd_kernel(const T* __restrict__ z, const T* __restrict__ zr, const float* __restrict__ g,
                       const float* __restrict__ kl, const float* __restrict__ stats, int64_t V, float inv_t,
                       T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const T* a = z + row * V;
  const T* b = zr + row * V;
  T* gr = grad + row * V;
  const float gk = g[row], k_row = kl[row];
  const float m = stats[4 * row], log_d = stats[4 * row + 1], mr = stats[4 * row + 2], log_dr = stats[4 * row + 3];
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * K; j < V; j += static_cast<int64_t>(kThreads) * K) {
    float s[K], r[K];
    load_scaled<T, K>(a + j, inv_t, s);
    load_scaled<T, K>(b + j, inv_t, r);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float lp = log_prob(s[k], m, log_d);
      s[k] = full_kl_grad(lp, log_prob(r[k], mr, log_dr), __expf(lp), gk, k_row) * inv_t;
    }
    store<T, K>(gr + j, s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const c10::optional<at::Tensor>& labels,
                                                                double temperature, int64_t ignore_index,
                                                                const char* op) {
  check_logits(logits, op);
  if (labels.has_value()) check_labels(*labels, logits, op);
  const float inv_t = inverse_temperature(temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_rows(N, op);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({labels.has_value() ? N : 0}, f32);
  at::Tensor entropy = at::empty({N}, f32), stats = at::empty({N, 2}, f32);
  if (N == 0) return {logp, entropy, stats};
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_forward", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    with_labels(labels, [&](auto* lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      with_vector_width<scalar_t>(V, {z}, [&](auto k) {
        logprobs_fwd_kernel<scalar_t, L, decltype(k)::value><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
            z, lab, V, inv_t, ignore_index, labels.has_value() ? logp.data_ptr<float>() : nullptr,
            entropy.data_ptr<float>(), stats.data_ptr<float>());
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, entropy, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& labels, double temperature,
                                                                       int64_t ignore_index) {
  return logprobs_forward(logits, labels, temperature, ignore_index, "token_logprobs");
}

std::tuple<at::Tensor, at::Tensor> token_entropy_fwd_cuda(const at::Tensor& logits, double temperature) {
  auto [logp, entropy, stats] = logprobs_forward(logits, c10::nullopt, temperature, 0, "token_entropy");
  return {entropy, stats};
}

void logprobs_backward_into(at::Tensor& grad, const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                            const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& stats, const at::Tensor& entropy, double temperature,
                            int64_t ignore_index) {
  const char* op = "token_logprobs backward";
  check_logits(logits, op);
  const float inv_t = check_logprobs_bwd_args(logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_rows(N, op);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_backward", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    with_labels(labels, [&](auto* lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      with_vector_width<scalar_t>(V, {z, g}, [&](auto k) {
        logprobs_bwd_kernel<scalar_t, L, decltype(k)::value><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
            z, lab, opt_ptr(grad_logp), opt_ptr(grad_entropy), stats.data_ptr<float>(), entropy.data_ptr<float>(),
            V, inv_t, ignore_index, g);
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                             const c10::optional<at::Tensor>& grad_logp,
                             const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                             const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  logprobs_backward_into(grad, logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, ignore_index);
  return grad;
}

void logprobs_bwd_inplace_cuda(at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                               const c10::optional<at::Tensor>& grad_logp,
                               const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                               const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  logprobs_backward_into(logits, logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> full_kl_fwd_cuda(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                    double temperature) {
  const char* op = "full_kl";
  check_kl_pair(logits, ref_logits, op);
  const float inv_t = inverse_temperature(temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_rows(N, op);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, f32), stats = at::empty({N, 4}, f32);
  if (N == 0) return {kl, stats};
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "full_kl_forward", [&] {
    const scalar_t* a = logits.data_ptr<scalar_t>();
    const scalar_t* b = ref_logits.data_ptr<scalar_t>();
    with_vector_width<scalar_t>(V, {a, b}, [&](auto k) {
      full_kl_fwd_kernel<scalar_t, decltype(k)::value><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          a, b, V, inv_t, kl.data_ptr<float>(), stats.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kl, stats};
}

at::Tensor full_kl_bwd_cuda(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                            const at::Tensor& kl, const at::Tensor& stats, double temperature) {
  const char* op = "full_kl backward";
  const float inv_t = check_full_kl_bwd_args(grad_kl, logits, ref_logits, kl, stats, temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_rows(N, op);
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (N == 0) return grad;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "full_kl_backward", [&] {
    const scalar_t* a = logits.data_ptr<scalar_t>();
    const scalar_t* b = ref_logits.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    with_vector_width<scalar_t>(V, {a, b, g}, [&](auto k) {
      full_kl_bwd_kernel<scalar_t, decltype(k)::value><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          a, b, grad_kl.data_ptr<float>(), kl.data_ptr<float>(), stats.data_ptr<float>(), V, inv_t, g);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("token_logprobs_fwd", &rlhf::token_logprobs_fwd_cuda);
  m.impl("token_entropy_fwd", &rlhf::token_entropy_fwd_cuda);
  m.impl("logprobs_bwd", &rlhf::logprobs_bwd_cuda);
  m.impl("logprobs_bwd_inplace", &rlhf::logprobs_bwd_inplace_cuda);
  m.impl("full_kl_fwd", &rlhf::full_kl_fwd_cuda);
  m.impl("full_kl_bwd", &rlhf::full_kl_bwd_cuda);
}
