// Argument checks of the logprobs native ops, shared by the CPU and CUDA launchers.
// Each failure names the op, the argument, what was expected and what came in.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>

namespace rlhf {

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": `logits` must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, op, ": `logits` has V = 0 columns (shape ", logits.sizes(), "); V must be >= 1");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": `logits` must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(logits.is_contiguous(), op, ": `logits` must be contiguous (the Python API makes it so)");
}

inline float inverse_temperature(double temperature, const char* op) {
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": `temperature` must be a finite number > 0, got ",
              temperature);
  return static_cast<float>(1.0 / temperature);
}

// labels [N] int64/int32 for the N rows of `rows` (the logits, or the hidden states), named ref_name.
inline void check_labels(const at::Tensor& labels, const at::Tensor& rows, const char* op,
                         const char* ref_name = "logits") {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows.size(0), op, ": `labels` must be [N] = [", rows.size(0),
              "] for ", ref_name, " ", rows.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": `labels` must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.is_contiguous(), op, ": `labels` must be contiguous (the Python API makes it so)");
  TORCH_CHECK(labels.device() == rows.device(), op, ": `labels` is on ", labels.device(), " but `", ref_name,
              "` is on ", rows.device());
}

// A per-row float32 tensor: [N] (cols == 0) or [N, cols], N = rows.size(0).
inline void check_row_stat(const c10::optional<at::Tensor>& t, const at::Tensor& rows, const char* name,
                           const char* op, int64_t cols = 0, const char* ref_name = "logits") {
  if (!t.has_value()) return;
  const int64_t N = rows.size(0);
  const bool ok = cols == 0 ? (t->dim() == 1 && t->size(0) == N)
                            : (t->dim() == 2 && t->size(0) == N && t->size(1) == cols);
  TORCH_CHECK(ok, op, ": `", name, "` must be [N] = [", N, "]", cols ? " x " + std::to_string(cols) : std::string(),
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), op, ": `", name, "` must be contiguous");
  TORCH_CHECK(t->device() == rows.device(), op, ": `", name, "` is on ", t->device(), " but `", ref_name, "` is on ",
              rows.device());
}

// The saved tensors and upstream gradients of a token_logprobs / token_entropy backward
// (`rows` is the logits, or the hidden states for linear_token_logprobs); returns 1 / T.
inline float check_logprobs_bwd_args(const at::Tensor& rows, const c10::optional<at::Tensor>& labels,
                                     const c10::optional<at::Tensor>& grad_logp,
                                     const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                                     const at::Tensor& entropy, double temperature, const char* op,
                                     const char* ref_name = "logits") {
  if (labels.has_value()) check_labels(*labels, rows, op, ref_name);
  check_row_stat(grad_logp, rows, "grad_logp", op, 0, ref_name);
  check_row_stat(grad_entropy, rows, "grad_entropy", op, 0, ref_name);
  check_row_stat(stats, rows, "stats", op, 2, ref_name);
  check_row_stat(entropy, rows, "entropy", op, 0, ref_name);
  TORCH_CHECK(!grad_logp.has_value() || labels.has_value(), op, ": `grad_logp` needs `labels`");
  return inverse_temperature(temperature, op);
}

inline void check_kl_pair(const at::Tensor& logits, const at::Tensor& ref_logits, const char* op) {
  check_logits(logits, op);
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), op, ": `ref_logits` has shape ", ref_logits.sizes(),
              " but `logits` has shape ", logits.sizes());
  TORCH_CHECK(ref_logits.device() == logits.device(), op, ": `ref_logits` is on ", ref_logits.device(),
              " but `logits` is on ", logits.device());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type(), op,
              ": `ref_logits` must have the dtype of `logits` (", logits.scalar_type(), "), got ",
              ref_logits.scalar_type());
  TORCH_CHECK(ref_logits.is_contiguous(), op, ": `ref_logits` must be contiguous (the Python API makes it so)");
}

// The inputs of a full_kl backward; returns 1 / T.
inline float check_full_kl_bwd_args(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                                    const at::Tensor& kl, const at::Tensor& stats, double temperature,
                                    const char* op) {
  check_kl_pair(logits, ref_logits, op);
  check_row_stat(grad_kl, logits, "grad_kl", op);
  check_row_stat(kl, logits, "kl", op);
  check_row_stat(stats, logits, "stats", op, 4);
  return inverse_temperature(temperature, op);
}

}  // namespace rlhf
