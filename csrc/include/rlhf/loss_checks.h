// Argument checks for the ppo and bt ops, as functions so the op name can be a variable
// (the macros in checks.h need string literals). Host code only.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace rlhf {

inline void check_f32(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous (the Python API makes it so)");
}

inline void check_bool(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": `", name, "` must be bool, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous (the Python API makes it so)");
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       const char* op) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": `", name, "` has shape ", t.sizes(), " but `", ref_name,
              "` has shape ", ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name, "` is on ",
              ref.device());
}

// A 0-d (one element) tensor such as the incoming gradient of a loss.
inline void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.numel() == 1, op, ": `", name, "` must be 0-d, got shape ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but the inputs are on ",
              ref.device());
}

// A float32 [n] per-row weight vector produced by a forward op.
inline void check_row_scale(const at::Tensor& t, int64_t n, const at::Tensor& ref, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": `", name, "` must have shape [", n, "], got ", t.sizes());
  check_f32(t, name, op);
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but the inputs are on ",
              ref.device());
}

// The ppo ops' [B, T] inputs: three float32 tensors and a bool mask of one shape.
inline void check_ppo_inputs(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                             const at::Tensor& c, const char* c_name, const at::Tensor& mask, const char* op) {
  TORCH_CHECK(a.dim() == 2, op, ": `", a_name, "` must be [B, T], got shape ", a.sizes());
  check_f32(a, a_name, op);
  check_f32(b, b_name, op);
  check_f32(c, c_name, op);
  check_bool(mask, "mask", op);
  check_like(b, b_name, a, a_name, op);
  check_like(c, c_name, a, a_name, op);
  check_like(mask, "mask", a, a_name, op);
}

inline void check_loss_agg(int64_t agg, const char* op) {
  TORCH_CHECK(agg >= 0 && agg <= 3, op, ": loss_agg code must be 0..3, got ", agg);
}

inline void check_num_tokens(const c10::optional<at::Tensor>& num_tokens, const at::Tensor& ref, const char* op) {
  if (!num_tokens.has_value()) return;
  TORCH_CHECK(num_tokens->numel() == 1 && num_tokens->scalar_type() == at::kDouble, op,
              ": `num_tokens` must be a 0-d float64 tensor, got ", num_tokens->scalar_type(), " of shape ",
              num_tokens->sizes());
  TORCH_CHECK(num_tokens->device() == ref.device(), op, ": `num_tokens` is on ", num_tokens->device(),
              " but the inputs are on ", ref.device());
}

// bt: chosen and rejected [P] float32 (margin too, when given); returns the margin's data or nullptr.
inline const float* check_pairs(const at::Tensor& chosen, const at::Tensor& rejected,
                                const c10::optional<at::Tensor>& margin, const char* op) {
  TORCH_CHECK(chosen.dim() == 1, op, ": `chosen` must be [P], got shape ", chosen.sizes());
  check_f32(chosen, "chosen", op);
  check_f32(rejected, "rejected", op);
  check_like(rejected, "rejected", chosen, "chosen", op);
  if (!margin.has_value()) return nullptr;
  check_f32(*margin, "margin", op);
  check_like(*margin, "margin", chosen, "chosen", op);
  return margin->data_ptr<float>();
}

// ranking: rewards [P, K] float32, valid [P, K] bool when given; returns valid's data or nullptr.
inline const bool* check_ranking(const at::Tensor& rewards, const c10::optional<at::Tensor>& valid, const char* op) {
  TORCH_CHECK(rewards.dim() == 2, op, ": `rewards` must be [P, K], got shape ", rewards.sizes());
  check_f32(rewards, "rewards", op);
  if (!valid.has_value()) return nullptr;
  check_bool(*valid, "valid", op);
  check_like(*valid, "valid", rewards, "rewards", op);
  return valid->data_ptr<bool>();
}

}  // namespace rlhf
