// The argument checks of every native op, in one place and one idiom: functions that take
// the op's public name and the argument's name, so that every failure says which op, which
// argument, what was expected and what came in.
//
// Exception types match the Python API's own checks, so a mistake raises the same type on
// every backend: a wrong dtype is a TypeError (TORCH_CHECK_TYPE), a wrong shape, device or
// value a ValueError (TORCH_CHECK_VALUE). tests/test_bad_inputs.py holds every backend to that.
//
// Host code only (used by the host wrappers in rlhf/*_op.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace rlhf {

// ---- primitives ----

inline void check_dim(const at::Tensor& t, int64_t dim, const char* shape, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": `", name, "` must have ", dim, " dimension(s) (", shape, "), got shape ",
                    t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": `", name, "` must be a floating-point tensor, got ",
                   t.scalar_type());
}

inline void check_integer(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": `", name,
                   "` must be an integer tensor, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dt, const char* name, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, op, ": `", name, "` must be ", dt, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                              const char* op) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name,
                    "` is on ", ref.device(), "; all tensors must be on one device");
}

// Same shape and device as `ref`.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       const char* op) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": `", name, "` has shape ", t.sizes(), " but `", ref_name,
                    "` has shape ", ref.sizes(), "; they must match");
  check_same_device(t, name, ref, ref_name, op);
}

// The kernels' float32 input: `t` itself when already float32 and contiguous (no copy, and
// no dispatcher call: this runs on every op call).
inline at::Tensor as_f32(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

// A mask: bool, or integers read as "nonzero is true". Float masks are refused: reading
// whether their values are 0/1 would cost a host sync on a GPU, and a float such as 0.5 has
// no single meaning. Returns a contiguous bool tensor (no copy when already one).
inline at::Tensor as_mask(const at::Tensor& t, const char* name, const char* op) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kBool || at::isIntegralType(dt, /*includeBool=*/false), op, ": `", name,
                   "` must be a bool or integer tensor (nonzero = true), got ", dt,
                   "; for a float mask pass `", name, ".bool()` or `", name, " > 0.5`");
  if (dt == at::kBool && t.is_contiguous()) return t;
  return (dt == at::kBool ? t : t.ne(0)).contiguous();
}

// An optional float input of `ref`'s shape, as float32 contiguous (undefined when absent).
inline at::Tensor opt_f32_like(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& ref,
                               const char* ref_name, const char* op) {
  if (!t.has_value()) return at::Tensor();
  check_floating(*t, name, op);
  check_like(*t, name, ref, ref_name, op);
  return as_f32(*t);
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

inline void check_range(double x, double lo, double hi, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x >= lo && x <= hi, op, ": `", name, "` must be in [", lo, ", ", hi, "], got ", x);
}

inline void check_positive(double x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x > 0 && std::isfinite(x), op, ": `", name, "` must be a finite number > 0, got ", x);
}

// A 0-d (one element) tensor, such as the incoming gradient of a loss.
inline void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": `", name, "` must be 0-d, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but the inputs are on ",
                    ref.device());
}

// A float32 [n] (cols == 0) or [n, cols] tensor made by a forward op (saved statistics,
// per-row weights), or an upstream gradient of such a shape.
inline void check_rows_f32(const at::Tensor& t, int64_t n, int64_t cols, const char* name, const at::Tensor& ref,
                           const char* ref_name, const char* op) {
  const bool ok = cols == 0 ? (t.dim() == 1 && t.size(0) == n) : (t.dim() == 2 && t.size(0) == n && t.size(1) == cols);
  TORCH_CHECK_VALUE(ok, op, ": `", name, "` must be [N] = [", n, "]", cols ? " x " + std::to_string(cols) : "",
                    " for `", ref_name, "` ", ref.sizes(), ", got ", t.sizes());
  check_dtype(t, at::kFloat, name, op);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": `", name, "` must be contiguous");
  check_same_device(t, name, ref, ref_name, op);
}

// ---- gae ----

inline void check_discount(double gamma, double lam, const char* op) {
  check_range(gamma, 0.0, 1.0, "gamma", op);
  check_range(lam, 0.0, 1.0, "lam", op);
}

// `last_values`: absent, or a float [B] beside `ref`; returned as float32 (undefined when absent).
inline at::Tensor check_last_values(const c10::optional<at::Tensor>& last_values, int64_t B, const at::Tensor& ref,
                                    const char* op) {
  if (!last_values.has_value()) return at::Tensor();
  const at::Tensor& lv = *last_values;
  check_floating(lv, "last_values", op);
  TORCH_CHECK_VALUE(lv.dim() == 1 && lv.size(0) == B, op, ": `last_values` must have shape [B] = [", B, "], got ",
                    lv.sizes());
  check_same_device(lv, "last_values", ref, "rewards", op);
  return as_f32(lv);
}

// ---- logprobs ----

// logits [..., V], V >= 1, float32/float16/bfloat16, any strides. Returns V.
inline int64_t check_logits(const at::Tensor& logits, const char* name, const char* op) {
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": `", name,
                   "` must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": `", name, "` must have shape [..., V], got a 0-d tensor");
  const int64_t V = logits.size(-1);
  TORCH_CHECK_VALUE(V > 0, op, ": `", name, "` has V = 0 (shape ", logits.sizes(),
                    "); the vocabulary dimension must be >= 1");
  return V;
}

inline float inverse_temperature(double temperature, const char* op) {
  check_positive(temperature, "temperature", op);
  return static_cast<float>(1.0 / temperature);
}

// The leading shape of `rows` ([..., X]): the shape of its per-position tensors.
inline at::IntArrayRef lead_shape(const at::Tensor& rows) { return rows.sizes().slice(0, rows.dim() - 1); }

// labels [...]: integers of the shape of `rows` (the logits [..., V], or the hidden states
// [..., H], named ref_name) without its last dimension `last`. Returned as the kernels read
// them: int32 or int64 (other integer types as int64), contiguous; no copy when already so.
inline at::Tensor check_labels(const at::Tensor& labels, const at::Tensor& rows, const char* ref_name,
                               const char* last, const char* op) {
  check_integer(labels, "labels", op);
  const at::IntArrayRef lead = lead_shape(rows);
  TORCH_CHECK_VALUE(labels.sizes() == lead, op, ": `labels` must have shape ", lead, " (", ref_name, "' shape ",
                    rows.sizes(), " without ", last, "), got ", labels.sizes());
  check_same_device(labels, "labels", rows, ref_name, op);
  const auto dt = labels.scalar_type();
  const bool native = dt == at::kLong || dt == at::kInt;
  if (native && labels.is_contiguous()) return labels;
  return (native ? labels : labels.to(at::kLong)).contiguous();
}

// The message of a label outside [0, V) that is not ignore_index (`row` indexes the labels
// flattened).
inline void fail_bad_label(int64_t row, int64_t value, int64_t V, int64_t ignore_index, const char* op) {
  TORCH_CHECK_VALUE(false, op, ": `labels` must be in [0, V) = [0, ", V, ") or equal ignore_index = ", ignore_index,
                    ", but labels[", row, "] (flat index) = ", value);
}

// A per-position float tensor of a backward ([...] = lead_shape(rows)): an upstream gradient
// or a saved forward output, as float32 contiguous (no copy when already so).
inline at::Tensor check_per_position(const at::Tensor& t, const at::Tensor& rows, const char* name,
                                     const char* ref_name, const char* op) {
  check_floating(t, name, op);
  const at::IntArrayRef lead = lead_shape(rows);
  TORCH_CHECK_VALUE(t.sizes() == lead, op, ": `", name, "` must have shape ", lead, " for `", ref_name, "` ",
                    rows.sizes(), ", got ", t.sizes());
  check_same_device(t, name, rows, ref_name, op);
  return as_f32(t);
}

inline at::Tensor opt_per_position(const c10::optional<at::Tensor>& t, const at::Tensor& rows, const char* name,
                                   const char* ref_name, const char* op) {
  return t.has_value() ? check_per_position(*t, rows, name, ref_name, op) : at::Tensor();
}

// logits and ref_logits [..., V] of one shape, dtype and device. Returns V.
inline int64_t check_kl_pair(const at::Tensor& logits, const at::Tensor& ref_logits, const char* op) {
  const int64_t V = check_logits(logits, "logits", op);
  TORCH_CHECK_TYPE(ref_logits.scalar_type() == logits.scalar_type(), op,
                   ": `ref_logits` must have the dtype of `logits` (", logits.scalar_type(), "), got ",
                   ref_logits.scalar_type());
  check_like(ref_logits, "ref_logits", logits, "logits", op);
  return V;
}

// linear_token_logprobs: hidden [..., H], weight [V, H] (V >= 1) and bias [V] when given, of
// one dtype (float32/float16/bfloat16) and device. Returns (H, V).
inline std::pair<int64_t, int64_t> check_linear(const at::Tensor& hidden, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const char* op) {
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": `hidden` must be float32, float16 or bfloat16, got ", dt);
  check_floating(weight, "weight", op);
  TORCH_CHECK_VALUE(hidden.dim() >= 1, op, ": `hidden` must have shape [..., H], got a 0-d tensor");
  check_dim(weight, 2, "[V, H]", "weight", op);
  const int64_t H = hidden.size(-1), V = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == H, op, ": `weight` must be [V, H] with H = ", H,
                    " (hidden's last dimension, hidden shape ", hidden.sizes(), "), got ", weight.sizes());
  TORCH_CHECK_VALUE(V > 0, op, ": `weight` has V = 0 rows (shape ", weight.sizes(),
                    "); the vocabulary must have at least one entry");
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, op, ": `weight` must have the dtype of `hidden` (", dt, "), got ",
                   weight.scalar_type(), "; cast one of them");
  check_same_device(weight, "weight", hidden, "hidden", op);
  if (bias.has_value()) {
    check_floating(*bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, op, ": `bias` must be [V] = [", V, "] (weight shape ",
                      weight.sizes(), "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, op, ": `bias` must have the dtype of `hidden` (", dt, "), got ",
                     bias->scalar_type(), "; cast one of them");
    check_same_device(*bias, "bias", hidden, "hidden", op);
  }
  return {H, V};
}

// ---- ppo ----

// The [B, T] float inputs of a ppo op and its mask, as the kernels take them: float32 and
// bool, contiguous. Names: the three float inputs, in order.
struct PPOInputs {
  at::Tensor a, b, c, mask;
};

inline PPOInputs check_ppo_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                  const at::Tensor& mask, const char* const (&names)[3], const char* op) {
  check_floating(a, names[0], op);
  check_floating(b, names[1], op);
  check_floating(c, names[2], op);
  check_dim(a, 2, "[B, T]", names[0], op);
  check_like(b, names[1], a, names[0], op);
  check_like(c, names[2], a, names[0], op);
  check_like(mask, "mask", a, names[0], op);
  return {as_f32(a), as_f32(b), as_f32(c), as_mask(mask, "mask", op)};
}

inline void check_clip(double clip, const char* name, const char* op) {
  TORCH_CHECK_VALUE(clip >= 0, op, ": `", name, "` must be >= 0, got ", clip);
}

// num_tokens: a tensor (read by the kernels, no host sync) or a number, at most one of them.
// Returns the tensor as float64 on the inputs' device (undefined when absent).
inline at::Tensor check_num_tokens(const c10::optional<at::Tensor>& num_tokens, c10::optional<double> number,
                                   const at::Tensor& ref, const char* op) {
  if (number.has_value()) {
    TORCH_CHECK_VALUE(!num_tokens.has_value(), op, ": `num_tokens` given both as a tensor and as a number");
    TORCH_CHECK_VALUE(*number > 0, op, ": `num_tokens` must be > 0, got ", *number);
    return at::Tensor();
  }
  if (!num_tokens.has_value()) return at::Tensor();
  const at::Tensor& nt = *num_tokens;
  TORCH_CHECK_VALUE(nt.numel() == 1 && nt.dim() <= 1, op, ": `num_tokens` must be a number or a 0-d tensor, got shape ",
                    nt.sizes());
  TORCH_CHECK_TYPE(!nt.is_complex() && nt.scalar_type() != at::kBool, op,
                   ": `num_tokens` must be a real number tensor, got ", nt.scalar_type());
  TORCH_CHECK_VALUE(nt.device() == ref.device(), op, ": `num_tokens` is on ", nt.device(), " but the inputs are on ",
                    ref.device());
  return nt.to(at::kDouble).reshape({});
}

// ---- bt ----

// chosen and rejected [P] float (margin too, when given), as float32 contiguous.
struct PairInputs {
  at::Tensor chosen, rejected, margin;  // margin undefined when absent
};

inline PairInputs check_pairs(const at::Tensor& chosen, const at::Tensor& rejected,
                              const c10::optional<at::Tensor>& margin, const char* op) {
  check_floating(chosen, "chosen", op);
  check_floating(rejected, "rejected", op);
  check_dim(chosen, 1, "[P]", "chosen", op);
  check_like(rejected, "rejected", chosen, "chosen", op);
  return {as_f32(chosen), as_f32(rejected), opt_f32_like(margin, "margin", chosen, "chosen", op)};
}

// rewards [P, K] float, valid [P, K] (bool or integer) when given.
struct RankingInputs {
  at::Tensor rewards, valid;  // valid undefined when absent
};

inline RankingInputs check_ranking(const at::Tensor& rewards, const c10::optional<at::Tensor>& valid, const char* op) {
  check_floating(rewards, "rewards", op);
  check_dim(rewards, 2, "[P, K]", "rewards", op);
  RankingInputs in{as_f32(rewards), at::Tensor()};
  if (valid.has_value()) {
    check_like(*valid, "valid", rewards, "rewards", op);
    in.valid = as_mask(*valid, "valid", op);
  }
  return in;
}

}  // namespace rlhf
