// The ppo ops' host side, written once for both devices: argument checks, conversion of the
// inputs to what the kernels read (float32 and bool, contiguous: no copy when they already
// are), allocation of the outputs, then one call into the device's launchers `Dev`
// (csrc/cpu/ppo.cpp, csrc/cuda/ppo.cu), which see only the raw-pointer structs below: Dev's
// static policy_forward, value_forward, policy_backward and value_backward, as called by
// detail::forward and detail::backward. `like` is a float32 input: the launcher takes its
// device (and stream) and allocates any scratch it needs beside it. Pointers to device data
// (grad, num_tokens) are read by the kernels, never by the host on a GPU, so no call syncs
// (and a forward and backward can be captured in a CUDA graph).
//
// The forward returns (loss [], stats [n_stats], row_scale [B]) where row_scale[b] is the
// weight of every token of row b in the aggregated loss (loss = sum_b w_b sum_t l_bt); the
// backward is then elementwise, d_x[b, t] = grad * w_b * dl/dx[b, t], in one pass. Under the
// policy loss's options row_scale[b] = w_b * g_b, where g_b holds what of the gradient is the
// row's (its sequence ratio, its IS weight: row_grad_factor in rlhf/ppo.h), and the backward
// multiplies by the rest, per token (policy_grad_token).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "rlhf/checks.h"
#include "rlhf/layout.h"
#include "rlhf/loss_op.h"
#include "rlhf/ppo.h"

namespace rlhf {

struct PolicyArgs {
  const float *logp, *old_logp, *adv;  // [B, T]
  const bool* mask;                    // [B, T]
  int64_t B, T;
  float clip_low, clip_high, dual_clip;  // dual_clip 0: none
  const float* rollout;  // [B, T] rollout_logprobs, or nullptr (no correction)
  PolicyOptions opt;     // decoded `options`
  bool plain;            // options = 0: the kernels run their DefaultOptions code
};

struct ValueArgs {
  const float *values, *old_values, *returns;  // [B, T]
  const bool* mask;                            // [B, T]
  int64_t B, T;
  bool has_clip;
  float clip;
};

namespace detail {

// ppo_policy_loss's `options` (the fields of rlhf/layout.h) and the arguments that go with them, as
// each message says. Returns rollout_logprobs as float32 (undefined when absent).
inline at::Tensor check_policy_options(int64_t options, const c10::optional<at::Tensor>& rollout,
                                       c10::optional<double> is_cap, bool has_dual_clip, const at::Tensor& logprobs,
                                       const char* op) {
  TORCH_CHECK_VALUE(options >= 0 && (options >> (kOptionBits * kNumOptionFields)) == 0, op, ": `options` must pack ",
                    static_cast<int>(kNumOptionFields), " fields of ", kOptionBits, " bits (rlhf/layout.h), got ",
                    options);
  constexpr int counts[kNumOptionFields] = {kNumRatioLevels, kNumObjectives, kNumIsCorrections, kNumIsLevels};
  for (int f = 0; f < kNumOptionFields; ++f)
    TORCH_CHECK_VALUE(option_field(options, f) < counts[f], op, ": `", kOptionFieldNames[f], "` code must be 0..",
                      counts[f] - 1, ", got ", option_field(options, f));
  if (options == 0 && !rollout.has_value() && !is_cap.has_value()) return at::Tensor();  // the plain loss
  const bool correct = option_field(options, kOptIsCorrection) != kIsNone;
  TORCH_CHECK_VALUE(!correct || rollout.has_value(), op,
                    ": `is_correction` needs `rollout_logprobs` (the rollout engine's log-probabilities)");
  TORCH_CHECK_VALUE(correct || !rollout.has_value(), op,
                    ": `rollout_logprobs` given without `is_correction` (\"tis\" or \"mis\"); it would be ignored");
  TORCH_CHECK_VALUE(correct || option_field(options, kOptIsLevel) == kIsLevelUnset, op,
                    ": `is_level` given without `is_correction`; it would be ignored");
  TORCH_CHECK_VALUE(correct || !is_cap.has_value(), op,
                    ": `is_cap` given without `is_correction`; it would be ignored");
  TORCH_CHECK_VALUE(!is_cap.has_value() || (*is_cap > 1 && std::isfinite(*is_cap)), op,
                    ": `is_cap` must be a finite number > 1, got ", is_cap.value_or(0.0));
  TORCH_CHECK_VALUE(option_field(options, kOptObjective) != kObjectiveCISPO || !has_dual_clip, op,
                    ": `dual_clip` cannot be used with objective \"cispo\" (its loss has no clipped branch to cap)");
  return opt_f32_like(rollout, "rollout_logprobs", logprobs, "logprobs", op);
}

// `options` as the kernels read them (checked by check_policy_options).
inline PolicyOptions decode_policy_options(int64_t options, c10::optional<double> is_cap) {
  const int level = option_field(options, kOptIsLevel);
  return {option_field(options, kOptRatioLevel) == kRatioSequence,
          option_field(options, kOptObjective) == kObjectiveCISPO,
          option_field(options, kOptIsCorrection),
          level == kIsLevelUnset || level == kIsLevelToken,
          level == kIsLevelGeometric,
          static_cast<float>(is_cap.value_or(2.0))};
}

struct PolicyCall {
  PPOInputs in;
  at::Tensor rollout;  // float32, or undefined
  PolicyArgs args;
};

inline PolicyCall policy_call(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                              const at::Tensor& mask, double clip_low, c10::optional<double> clip_high,
                              c10::optional<double> dual_clip, const c10::optional<at::Tensor>& rollout_logprobs,
                              int64_t options, c10::optional<double> is_cap, const char* op) {
  PPOInputs in = check_ppo_inputs(logprobs, old_logprobs, advantages, mask, {"logprobs", "old_logprobs", "advantages"},
                                  op);
  check_clip(clip_low, "clip_low", op);
  const double ch = clip_high.value_or(clip_low);
  check_clip(ch, "clip_high", op);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, op, ": `dual_clip` must be > 1 (or None), got ",
                    dual_clip.value_or(0.0));
  at::Tensor rollout = check_policy_options(options, rollout_logprobs, is_cap, dual_clip.has_value(), logprobs, op);
  const PolicyArgs args{in.a.data_ptr<float>(),
                        in.b.data_ptr<float>(),
                        in.c.data_ptr<float>(),
                        in.mask.data_ptr<bool>(),
                        in.a.size(0),
                        in.a.size(1),
                        static_cast<float>(clip_low),
                        static_cast<float>(ch),
                        static_cast<float>(dual_clip.value_or(0.0)),
                        ptr_or_null(rollout),
                        decode_policy_options(options, is_cap),
                        options == 0};
  return {in, rollout, args};
}

struct ValueCall {
  PPOInputs in;
  ValueArgs args;
};

inline ValueCall value_call(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                            const at::Tensor& mask, c10::optional<double> clip, const char* op) {
  PPOInputs in = check_ppo_inputs(values, old_values, returns, mask, {"values", "old_values", "returns"}, op);
  TORCH_CHECK_VALUE(!clip.has_value() || *clip > 0, op, ": `clip` must be > 0 (or None), got ", clip.value_or(0.0));
  const ValueArgs args{in.a.data_ptr<float>(), in.b.data_ptr<float>(),  in.c.data_ptr<float>(),
                       in.mask.data_ptr<bool>(), in.a.size(0),         in.a.size(1),
                       clip.has_value(),         static_cast<float>(clip.value_or(0.0))};
  return {in, args};
}

// A forward's normalizer, outputs (loss [], stats [n_stats], row_scale [B]) and device call
// launch(args, norm, outputs, like).
template <typename Call, typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Call& call, const c10::optional<at::Tensor>& num_tokens,
                                                       c10::optional<double> number, int64_t loss_agg, int64_t n_stats,
                                                       Launch launch, const char* op) {
  const at::Tensor& like = call.in.a;
  const at::Tensor nt = check_num_tokens(num_tokens, number, like, op);
  TORCH_CHECK_VALUE(loss_agg >= 0 && loss_agg < kNumLossAggs, op, ": loss_agg code must be 0..", kNumLossAggs - 1,
                    ", got ", loss_agg);
  const Normalizer norm{loss_agg, nt.defined() ? nt.data_ptr<double>() : nullptr, number.value_or(0.0)};
  auto [loss, stats, row_scale] = loss_outputs(like, n_stats);
  launch(call.args, norm, {loss.data_ptr<float>(), stats.data_ptr<float>(), row_scale.data_ptr<float>()}, like);
  return {loss, stats, row_scale};
}

// A backward's checks of grad and row_scale (against the rows of `ref_name`), its output and
// device call launch(args, grad, row_scale, out, like); nothing to launch for an empty batch.
template <typename Call, typename Launch>
at::Tensor backward(const Call& call, const at::Tensor& grad, const at::Tensor& row_scale, const char* ref_name,
                    Launch launch, const char* op) {
  const at::Tensor& like = call.in.a;
  at::Tensor g;
  const float* gp = checked_grad(grad, like, g, op);
  const float* w = checked_row_scale(row_scale, like, ref_name, op);
  at::Tensor d = at::empty(like.sizes(), like.options());
  if (d.numel() > 0) launch(call.args, gp, w, d.data_ptr<float>(), like);
  return d;
}

}  // namespace detail

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_forward(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& num_tokens, c10::optional<double> num_tokens_value, double clip_low,
    c10::optional<double> clip_high, c10::optional<double> dual_clip, int64_t loss_agg,
    const c10::optional<at::Tensor>& rollout_logprobs, int64_t options, c10::optional<double> is_cap) {
  const char* op = "ppo_policy_loss";
  const detail::PolicyCall call = detail::policy_call(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                                                      dual_clip, rollout_logprobs, options, is_cap, op);
  return detail::forward(call, num_tokens, num_tokens_value, loss_agg, kNumPolicyStats, Dev::policy_forward, op);
}

// The plain loss (options = 0): ppo_policy_fwd, whose schema has no option arguments (fewer
// schema arguments cost less host time per call); ppo_policy_options_fwd is ppo_policy_forward.
template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_forward_plain(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& num_tokens, c10::optional<double> num_tokens_value, double clip_low,
    c10::optional<double> clip_high, c10::optional<double> dual_clip, int64_t loss_agg) {
  return ppo_policy_forward<Dev>(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value, clip_low,
                                 clip_high, dual_clip, loss_agg, c10::nullopt, 0, c10::nullopt);
}

template <typename Dev>
at::Tensor ppo_policy_backward(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& row_scale,
                               double clip_low, c10::optional<double> clip_high, c10::optional<double> dual_clip,
                               const c10::optional<at::Tensor>& rollout_logprobs, int64_t options,
                               c10::optional<double> is_cap) {
  const char* op = "ppo_policy_loss backward";
  const detail::PolicyCall call = detail::policy_call(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                                                      dual_clip, rollout_logprobs, options, is_cap, op);
  return detail::backward(call, grad, row_scale, "logprobs", Dev::policy_backward, op);
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_forward(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    const c10::optional<at::Tensor>& num_tokens, c10::optional<double> num_tokens_value, c10::optional<double> clip,
    int64_t loss_agg) {
  const char* op = "ppo_value_loss";
  const detail::ValueCall call = detail::value_call(values, old_values, returns, mask, clip, op);
  return detail::forward(call, num_tokens, num_tokens_value, loss_agg, kNumValueStats, Dev::value_forward, op);
}

template <typename Dev>
at::Tensor ppo_value_backward(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& old_values,
                              const at::Tensor& returns, const at::Tensor& mask, const at::Tensor& row_scale,
                              c10::optional<double> clip) {
  const char* op = "ppo_value_loss backward";
  const detail::ValueCall call = detail::value_call(values, old_values, returns, mask, clip, op);
  return detail::backward(call, grad, row_scale, "values", Dev::value_backward, op);
}

}  // namespace rlhf
