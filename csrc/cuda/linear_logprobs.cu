// Fused LM head + token log-probabilities + entropy on CUDA.
//
// The tiling, the matmuls (cuBLAS through at::mm, float32 output, on the current stream) and
// the gradient accumulation are the shared host code of rlhf/linear_logprobs_op.h; this file
// holds the matmul wrappers and the two epilogue kernels launched on each [nr, n] float32
// tile of logits, one 256-thread block per row, with the load / merge helpers of the
// logprobs kernels (rlhf/softmax.cuh, rlhf/linear.cuh):
//   fold: the block's online-softmax statistics of the row segment, bias added (one read of
//         the tile), merged by thread 0 into the row's running (m, d, w), plus the label's logit;
//   grad: dlogits written in the operands' dtype (one read, one write; in place for float32),
//         zero on ignored rows and rows whose label is outside [0, V).
// A label outside [0, V) never matches a column (no wild read): the host code turns it into
// NaN logp and entropy, unless the `validate` check (one host sync, skipped while a CUDA graph
// is captured) raised first.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "rlhf/linear.cuh"
#include "rlhf/linear_logprobs_op.h"
#include "rlhf/logprobs.h"
#include "rlhf/softmax.cuh"

namespace rlhf {
namespace {

// z: [nr, n] float32 logits tile; bias: [n] or nullptr; running: [nr, 4] float32
// (m, d, w, s_y), updated in place.
template <typename L, int K>
__global__ void __launch_bounds__(kThreads)
    linear_fold_kernel(const float* __restrict__ z, const float* __restrict__ bias, const L* __restrict__ labels,
                       int64_t n, int64_t c0, float inv_t, float* __restrict__ running) {
  const int64_t row = blockIdx.x;
  const float* zr = z + row * n;
  SoftmaxStats st = softmax_stats_empty();
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * K; j < n; j += static_cast<int64_t>(kThreads) * K) {
    float s[K];
    load_biased<K>(zr + j, bias ? bias + j : nullptr, inv_t, s);
    softmax_stats_fold(st, s);
  }
  st = block_merge(st, softmax_stats_empty());
  if (threadIdx.x != 0) return;
  float* run = running + 4 * row;
  st = softmax_stats_merge(SoftmaxStats{run[0], run[1], run[2]}, st);
  run[0] = st.m;
  run[1] = st.d;
  run[2] = st.w;
  const int64_t y = static_cast<int64_t>(labels[row]) - c0;
  if (y >= 0 && y < n) run[3] = (zr[y] + (bias ? bias[y] : 0.f)) * inv_t;
}

// z: [nr, n] float32 logits tile; dz: [nr, n] out in To, may alias z (To = float): every
// entry is read by the thread that writes it, before it writes it. stats [nr, 2] = (m, log d).
template <typename To, typename L, int K>
__global__ void __launch_bounds__(kThreads)
    linear_grad_kernel(const float* z, To* dz, const float* __restrict__ bias, const L* __restrict__ labels,
                       int64_t n, int64_t c0, int64_t V, float inv_t, int64_t ignore_index,
                       const float* __restrict__ stats, const float* __restrict__ entropy,
                       const float* __restrict__ g_logp, const float* __restrict__ g_entropy) {
  const int64_t row = blockIdx.x;
  const float* zr = z + row * n;
  To* gr = dz + row * n;
  const int64_t label = static_cast<int64_t>(labels[row]);
  const bool keep = label != ignore_index && label >= 0 && label < V;
  const int64_t y = label - c0;
  const float gl = g_logp ? g_logp[row] : 0.f, gh = g_entropy ? g_entropy[row] : 0.f;
  const float m = stats[2 * row], log_d = stats[2 * row + 1], h = entropy[row];
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * K; j < n; j += static_cast<int64_t>(kThreads) * K) {
    float s[K];
    load_biased<K>(zr + j, bias ? bias + j : nullptr, inv_t, s);
    logprob_grad_vec(s, j, y, m, log_d, h, gl, gh, inv_t, keep);
    store<To, K>(gr + j, s);
  }
}

struct CudaEpilogue {
  static constexpr int64_t kDefaultTileBytes = int64_t{256} << 20;  // 256 MiB of float32 logits per tile
  // token blocks of 2048 rows whatever N is (batch invariance, rlhf/linear_logprobs_op.h)
  static constexpr int64_t kMaxRows = 2048;

  static at::Tensor operand(const at::Tensor& t) { return t; }
  static at::Tensor log(const at::Tensor& d) { return at::log(d); }
  static void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { rlhf::mm_f32(out, a, b); }
  static void addmm_f32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { rlhf::addmm_f32(acc, a, b); }
  static void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
    checked_label_range(labels, V, ignore_index, op);  // rlhf/softmax.cuh: skipped while capturing
  }

  static void fold(const at::Tensor& logits, const float* bias, const at::Tensor& labels, int64_t c0, float inv_t,
                   const at::Tensor& running) {
    const int64_t nr = logits.size(0), n = logits.size(1);
    check_rows(nr, "linear_token_logprobs");
    const c10::cuda::CUDAGuard guard(logits.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const float* z = logits.data_ptr<float>();
    with_labels(labels, [&](auto* lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      with_vector_width<float>(n, {z, bias}, [&](auto k) {
        linear_fold_kernel<L, decltype(k)::value><<<static_cast<unsigned>(nr), kThreads, 0, stream>>>(
            z, bias, lab, n, c0, inv_t, running.data_ptr<float>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void grad(const at::Tensor& logits, at::Tensor& dlogits, const float* bias, const at::Tensor& labels,
                   int64_t c0, int64_t V, float inv_t, int64_t ignore_index, const at::Tensor& stats,
                   const at::Tensor& entropy, const at::Tensor& g_logp, const at::Tensor& g_entropy) {
    const int64_t nr = logits.size(0), n = logits.size(1);
    check_rows(nr, "linear_token_logprobs backward");
    const c10::cuda::CUDAGuard guard(logits.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const float* z = logits.data_ptr<float>();
    const auto launch = [&](auto* g) {
      using To = std::remove_pointer_t<decltype(g)>;
      with_labels(labels, [&](auto* lab) {
        using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
        // K = 4: float32 loads; stores of 4 entries (8 bytes for 16-bit types) need 4-entry alignment
        with_vector_width<float>(n, {z, bias, g}, [&](auto k) {
          linear_grad_kernel<To, L, decltype(k)::value><<<static_cast<unsigned>(nr), kThreads, 0, stream>>>(
              z, g, bias, lab, n, c0, V, inv_t, ignore_index, stats.data_ptr<float>(), entropy.data_ptr<float>(),
              ptr_or_null(g_logp), ptr_or_null(g_entropy));
        });
      });
    };
    with_dlogits(dlogits, launch);   // defined here: the backward always writes dlogits
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("linear_logprobs_fwd", &rlhf::linear_logprobs_forward<rlhf::CudaEpilogue>);
  m.impl("linear_logprobs_bwd", &rlhf::linear_logprobs_backward<rlhf::CudaEpilogue>);
}
