// The logprobs ops' host side, written once for both devices: argument checks, conversion of
// the inputs to what the kernels read (contiguous logits in their dtype; labels int32/int64;
// float32 per-position tensors: no copy when they already are), allocation of the outputs,
// dtype dispatch, then one call into the device's launchers `Dev` (csrc/cpu/logprobs.cpp,
// csrc/cuda/logprobs.cu), which see only the raw-pointer structs below.
//
// The logits may have any leading shape [..., V] (and any strides): the kernels read them
// as N = numel / V contiguous rows, and the per-position outputs come back in the leading
// shape, so the Python API passes its arguments straight through. The saved statistics are
// [N, 2] ([N, 4] for full_kl).
//
// Dev provides:
//   template <typename T, typename L>
//   static void logprobs_forward(const LogprobsFwdArgs<T, L>&, const at::Tensor& like);
//   template <typename T, typename L>
//   static void logprobs_backward(const LogprobsBwdArgs<T, L>&, const at::Tensor& like);
//   template <typename T> static void full_kl_forward(const FullKlFwdArgs<T>&, const at::Tensor& like);
//   template <typename T> static void full_kl_backward(const FullKlBwdArgs<T>&, const at::Tensor& like);
//   static void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op);
// `like` is the logits: the launcher takes its device (and stream). check_label_range is the
// `validate` check (rlhf/label_dispatch.h: one host sync on a GPU, skipped while a CUDA graph
// is captured); whatever the labels hold, the kernels write NaN logp and entropy for a label
// outside [0, V) other than ignore_index, and a zero gradient row, never reading outside the row.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "rlhf/checks.h"
#include "rlhf/label_dispatch.h"

namespace rlhf {

// token_logprobs / token_entropy forward over N rows of V logits.
template <typename T, typename L>
struct LogprobsFwdArgs {
  const T* z;        // [N, V] logits, rows contiguous
  const L* labels;   // [N], or nullptr (token_entropy)
  int64_t N, V;
  float inv_t;       // 1 / temperature
  int64_t ignore_index;
  float* logp;       // [N] out, written only with labels: 0 where ignored, NaN for a label outside [0, V)
  float* entropy;    // [N] out: likewise 0 / NaN with labels
  float* stats;      // [N, 2] out: (m, log d) of s = z / T (rlhf/logprobs.h)
};

// The gradient of sum(g_logp * logp + g_entropy * entropy) wrt the logits.
template <typename T, typename L>
struct LogprobsBwdArgs {
  const T* z;                        // [N, V] logits
  const L* labels;                   // [N], or nullptr (entropy only)
  const float *g_logp, *g_entropy;   // [N] upstream gradients, or nullptr (zero)
  const float *stats, *entropy;      // [N, 2] and [N], saved by the forward
  int64_t N, V;
  float inv_t;
  int64_t ignore_index;
  T* grad;                           // [N, V] out; may be z (in place): each entry is read before it is written
};

template <typename T>
struct FullKlFwdArgs {
  const T *z, *zr;   // [N, V] policy and reference logits
  int64_t N, V;
  float inv_t;
  float* kl;         // [N] out
  float* stats;      // [N, 4] out: (m, log d, m_r, log d_r)
};

template <typename T>
struct FullKlBwdArgs {
  const T *z, *zr;                   // [N, V]
  const float *g, *kl, *stats;       // [N], [N], [N, 4]
  int64_t N, V;
  float inv_t;
  T* grad;                           // [N, V] out
};

namespace detail {

// Calls f(T*) (a null pointer: only its type matters) with T the logits' element type.
template <typename F>
void dispatch_logits(const at::Tensor& logits, F f) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return f(static_cast<float*>(nullptr));
    case at::kHalf:
      return f(static_cast<at::Half*>(nullptr));
    case at::kBFloat16:
      return f(static_cast<at::BFloat16*>(nullptr));
    default:
      TORCH_CHECK_TYPE(false, "rlhf_kernels: logits of dtype ", logits.scalar_type(), " have no kernel");
  }
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                                double temperature, int64_t ignore_index,
                                                                bool validate, const char* op) {
  const int64_t V = check_logits(logits, "logits", op);
  const at::Tensor y = labels.defined() ? check_labels(labels, logits, "logits", "V", op) : at::Tensor();
  const float inv_t = inverse_temperature(temperature, op);
  const at::Tensor z = logits.contiguous();
  const int64_t N = z.numel() / V;
  const auto f32 = z.options().dtype(at::kFloat);
  const at::IntArrayRef lead = lead_shape(logits);
  at::Tensor logp = y.defined() ? at::empty(lead, f32) : at::Tensor();
  at::Tensor entropy = at::empty(lead, f32), stats = at::empty({N, 2}, f32);
  if (N == 0) return {logp, entropy, stats};
  if (validate && y.defined()) Dev::check_label_range(y, V, ignore_index, op);
  dispatch_logits(z, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    with_labels(y, [&](auto* lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      Dev::template logprobs_forward<T, L>(
          {z.const_data_ptr<T>(), lab, N, V, inv_t, ignore_index, y.defined() ? logp.data_ptr<float>() : nullptr,
           entropy.data_ptr<float>(), stats.data_ptr<float>()},
          z);
    });
  });
  return {logp, entropy, stats};
}

// The gradient into `grad` (contiguous, the logits' shape and dtype; may be `z` itself).
template <typename Dev>
void logprobs_backward_into(at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                            const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& stats, const at::Tensor& entropy, int64_t V, float inv_t,
                            int64_t ignore_index, const char* op) {
  const at::Tensor gl = opt_per_position(grad_logp, z, "grad_logp", "logits", op);
  const at::Tensor gh = opt_per_position(grad_entropy, z, "grad_entropy", "logits", op);
  const at::Tensor h = check_per_position(entropy, z, "entropy", "logits", op);
  const int64_t N = z.numel() / V;
  check_rows_f32(stats, N, 2, "stats", z, "logits", op);
  // grad_logp without labels gives its -g_l p term only, no one-hot: the vocabulary-parallel ops
  // add the one-hot on the rank that owns the label (rlhf_kernels/ops/_vocab_parallel.py)
  if (N == 0) return;
  dispatch_logits(z, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    with_labels(labels, [&](auto* lab) {
      using L = std::remove_cv_t<std::remove_pointer_t<decltype(lab)>>;
      Dev::template logprobs_backward<T, L>(
          {z.const_data_ptr<T>(), lab, ptr_or_null(gl), ptr_or_null(gh), stats.const_data_ptr<float>(),
           h.const_data_ptr<float>(), N, V, inv_t, ignore_index, grad.data_ptr<T>()},
          z);
    });
  });
}

struct BackwardInputs {
  at::Tensor z, labels;
  int64_t V;
  float inv_t;
  const char* op;
};

inline BackwardInputs backward_inputs(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                                      double temperature) {
  const char* op = labels.has_value() ? "token_logprobs backward" : "token_entropy backward";
  const int64_t V = check_logits(logits, "logits", op);
  at::Tensor y = labels.has_value() ? check_labels(*labels, logits, "logits", "V", op) : at::Tensor();
  return {logits.contiguous(), y, V, inverse_temperature(temperature, op), op};
}

}  // namespace detail

// -> (logp [...], entropy [...], stats [N, 2]) float32. `inplace_backward` is read by the
// autograd wrapper (csrc/autograd/logprobs.cpp) only.
template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(const at::Tensor& logits,
                                                                      const at::Tensor& labels, double temperature,
                                                                      int64_t ignore_index, bool validate,
                                                                      bool /*inplace_backward*/) {
  return detail::logprobs_forward<Dev>(logits, labels, temperature, ignore_index, validate, "token_logprobs");
}

// -> (entropy [...], stats [N, 2]) float32.
template <typename Dev>
std::tuple<at::Tensor, at::Tensor> token_entropy_forward(const at::Tensor& logits, double temperature) {
  auto [logp, entropy, stats] =
      detail::logprobs_forward<Dev>(logits, at::Tensor(), temperature, 0, false, "token_entropy");
  return {entropy, stats};
}

// -> d logits [..., V] in the logits' dtype (contiguous).
template <typename Dev>
at::Tensor logprobs_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                             const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& stats, const at::Tensor& entropy, double temperature,
                             int64_t ignore_index) {
  const detail::BackwardInputs in = detail::backward_inputs(logits, labels, temperature);
  at::Tensor grad = at::empty_like(in.z);
  detail::logprobs_backward_into<Dev>(grad, in.z, in.labels, grad_logp, grad_entropy, stats, entropy, in.V, in.inv_t,
                                      ignore_index, in.op);
  return grad;
}

// The same gradient written over the logits.
template <typename Dev>
void logprobs_backward_inplace(at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                               const c10::optional<at::Tensor>& grad_logp,
                               const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                               const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  detail::BackwardInputs in = detail::backward_inputs(logits, labels, temperature);
  detail::logprobs_backward_into<Dev>(in.z, in.z, in.labels, grad_logp, grad_entropy, stats, entropy, in.V, in.inv_t,
                                      ignore_index, in.op);
  if (!logits.is_same(in.z)) logits.copy_(in.z);  // non-contiguous logits: computed in a copy
}

// -> (kl [...], stats [N, 4]) float32.
template <typename Dev>
std::tuple<at::Tensor, at::Tensor> full_kl_forward(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                   double temperature) {
  const char* op = "full_kl";
  const int64_t V = check_kl_pair(logits, ref_logits, op);
  const float inv_t = inverse_temperature(temperature, op);
  const at::Tensor z = logits.contiguous(), zr = ref_logits.contiguous();
  const int64_t N = z.numel() / V;
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor kl = at::empty(lead_shape(logits), f32), stats = at::empty({N, 4}, f32);
  if (N == 0) return {kl, stats};
  detail::dispatch_logits(z, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    Dev::template full_kl_forward<T>(
        {z.const_data_ptr<T>(), zr.const_data_ptr<T>(), N, V, inv_t, kl.data_ptr<float>(), stats.data_ptr<float>()},
        z);
  });
  return {kl, stats};
}

// -> d logits [..., V] in the logits' dtype (contiguous); the reference gets no gradient.
template <typename Dev>
at::Tensor full_kl_backward(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                            const at::Tensor& kl, const at::Tensor& stats, double temperature) {
  const char* op = "full_kl backward";
  const int64_t V = check_kl_pair(logits, ref_logits, op);
  const float inv_t = inverse_temperature(temperature, op);
  const at::Tensor z = logits.contiguous(), zr = ref_logits.contiguous();
  const at::Tensor g = check_per_position(grad_kl, z, "grad_kl", "logits", op);
  const at::Tensor k = check_per_position(kl, z, "kl", "logits", op);
  const int64_t N = z.numel() / V;
  check_rows_f32(stats, N, 4, "stats", z, "logits", op);
  at::Tensor grad = at::empty_like(z);
  if (N == 0) return grad;
  detail::dispatch_logits(z, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    Dev::template full_kl_backward<T>({z.const_data_ptr<T>(), zr.const_data_ptr<T>(), g.const_data_ptr<float>(),
                                       k.const_data_ptr<float>(), stats.const_data_ptr<float>(), N, V, inv_t,
                                       grad.data_ptr<T>()},
                                      z);
  });
  return grad;
}

}  // namespace rlhf
