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
// Checks, allocation and dtype dispatch are the shared host code of rlhf/logprobs_op.h; this
// file holds the kernels and their launchers (struct CudaLogprobs). A label outside [0, V)
// other than ignore_index gives NaN (forward) and a zero gradient row, never a wild read;
// the `validate` check that raises instead costs one host sync and is skipped while a CUDA
// graph is being captured.
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "rlhf/logprobs.h"
#include "rlhf/logprobs_op.h"
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
  } else if (y < 0 || y >= V) {  // not validated (validate=False, or a CUDA graph): NaN, no read
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

// The launchers of rlhf/logprobs_op.h: one block per row on the current stream of the
// logits' device, 16-byte vector loads when every row of every pointer allows them.
struct CudaLogprobs {
  template <typename T, typename L>
  static void logprobs_forward(const LogprobsFwdArgs<T, L>& a, const at::Tensor& like) {
    check_rows(a.N, "token_logprobs");
    const c10::cuda::CUDAGuard guard(like.device());
    with_vector_width<T>(a.V, {a.z}, [&](auto k) {
      logprobs_fwd_kernel<T, L, decltype(k)::value>
          <<<static_cast<unsigned>(a.N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              a.z, a.labels, a.V, a.inv_t, a.ignore_index, a.logp, a.entropy, a.stats);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, typename L>
  static void logprobs_backward(const LogprobsBwdArgs<T, L>& a, const at::Tensor& like) {
    check_rows(a.N, "token_logprobs backward");
    const c10::cuda::CUDAGuard guard(like.device());
    with_vector_width<T>(a.V, {a.z, a.grad}, [&](auto k) {
      logprobs_bwd_kernel<T, L, decltype(k)::value>
          <<<static_cast<unsigned>(a.N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              a.z, a.labels, a.g_logp, a.g_entropy, a.stats, a.entropy, a.V, a.inv_t, a.ignore_index, a.grad);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  static void full_kl_forward(const FullKlFwdArgs<T>& a, const at::Tensor& like) {
    check_rows(a.N, "full_kl");
    const c10::cuda::CUDAGuard guard(like.device());
    with_vector_width<T>(a.V, {a.z, a.zr}, [&](auto k) {
      full_kl_fwd_kernel<T, decltype(k)::value>
          <<<static_cast<unsigned>(a.N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a.z, a.zr, a.V, a.inv_t,
                                                                                            a.kl, a.stats);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  static void full_kl_backward(const FullKlBwdArgs<T>& a, const at::Tensor& like) {
    check_rows(a.N, "full_kl backward");
    const c10::cuda::CUDAGuard guard(like.device());
    with_vector_width<T>(a.V, {a.z, a.zr, a.grad}, [&](auto k) {
      full_kl_bwd_kernel<T, decltype(k)::value>
          <<<static_cast<unsigned>(a.N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              a.z, a.zr, a.g, a.kl, a.stats, a.V, a.inv_t, a.grad);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
    checked_label_range(labels, V, ignore_index, op);  // rlhf/softmax.cuh: skipped while capturing
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("token_logprobs_fwd", &rlhf::token_logprobs_forward<rlhf::CudaLogprobs>);
  m.impl("token_entropy_fwd", &rlhf::token_entropy_forward<rlhf::CudaLogprobs>);
  m.impl("logprobs_bwd", &rlhf::logprobs_backward<rlhf::CudaLogprobs>);
  m.impl("logprobs_bwd_inplace", &rlhf::logprobs_backward_inplace<rlhf::CudaLogprobs>);
  m.impl("full_kl_fwd", &rlhf::full_kl_forward<rlhf::CudaLogprobs>);
  m.impl("full_kl_bwd", &rlhf::full_kl_backward<rlhf::CudaLogprobs>);
}
