// Autograd of the ppo ops (see autograd.h): the forward saves the inputs and each row's
// weight in the loss (row_scale); the backward is one call of the elementwise backward op,
// which reads the upstream gradient on the device (no host sync, no glue kernels).
// Only `logprobs` / `values` get a gradient; old values, advantages, returns and the rollout
// log-probabilities are constants.
#include <optional>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;
using OptD = std::optional<double>;

struct PolicyLoss : public torch::autograd::Function<PolicyLoss> {
  // the plain loss: ppo_policy_fwd's arguments only (saves less, so costs less host time)
  static bool plain(const OptT& rollout_logprobs, int64_t options, OptD is_cap) {
    return options == 0 && !rollout_logprobs.has_value() && !is_cap.has_value();
  }

  // the op itself, below autograd (the CPU or CUDA kernel): ppo_policy_fwd for the plain loss
  // (no options), ppo_policy_options_fwd otherwise; one Function serves both ops
  static Fwd run(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                 const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, double clip_low,
                 OptD clip_high, OptD dual_clip, int64_t loss_agg, const OptT& rollout_logprobs, int64_t options,
                 OptD is_cap) {
    static const auto plain_op =
        native_op<Fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, OptD,
                      double, OptD, OptD, int64_t)>("rlhf_kernels::ppo_policy_fwd");
    static const auto with_options =
        native_op<Fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, OptD,
                      double, OptD, OptD, int64_t, const OptT&, int64_t, OptD)>("rlhf_kernels::ppo_policy_options_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    if (PolicyLoss::plain(rollout_logprobs, options, is_cap))
      return plain_op.call(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value, clip_low,
                           clip_high, dual_clip, loss_agg);
    return with_options.call(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value, clip_low,
                             clip_high, dual_clip, loss_agg, rollout_logprobs, options, is_cap);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const OptT& num_tokens,
                               OptD num_tokens_value, double clip_low, OptD clip_high, OptD dual_clip,
                               int64_t loss_agg, const OptT& rollout_logprobs, int64_t options, OptD is_cap) {
    auto [loss, stats, row_scale] = run(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value,
                                        clip_low, clip_high, dual_clip, loss_agg, rollout_logprobs, options, is_cap);
    ctx->saved_data["clip_low"] = clip_low;
    ctx->saved_data["clip_high"] = clip_high;
    ctx->saved_data["dual_clip"] = dual_clip;
    if (plain(rollout_logprobs, options, is_cap)) {
      ctx->save_for_backward({logprobs, old_logprobs, advantages, mask, row_scale});
    } else {  // rollout_logprobs saved undefined when absent
      const at::Tensor rollout = rollout_logprobs.value_or(at::Tensor());
      ctx->save_for_backward({logprobs, old_logprobs, advantages, mask, row_scale, rollout});
      ctx->saved_data["options"] = options;
      ctx->saved_data["is_cap"] = is_cap;
    }
    ctx->mark_non_differentiable({stats, row_scale});
    ctx->set_materialize_grads(false);
    return {loss, stats, row_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, OptD,
                                                OptD, const OptT&, int64_t, OptD)>("rlhf_kernels::ppo_policy_bwd");
    variable_list out = no_grads(13);
    if (!grads[0].defined()) return out;  // the loss was not used: zero gradient
    const auto s = ctx->get_saved_variables();
    const bool plain_loss = s.size() == 5;
    const OptT rollout = !plain_loss && s[5].defined() ? OptT(s[5]) : OptT();
    out[0] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["clip_low"].toDouble(),
                     ctx->saved_data["clip_high"].toOptional<double>(),
                     ctx->saved_data["dual_clip"].toOptional<double>(), rollout,
                     plain_loss ? 0 : ctx->saved_data["options"].toInt(),
                     plain_loss ? OptD() : ctx->saved_data["is_cap"].toOptional<double>());
    return out;
  }
};

struct ValueLoss : public torch::autograd::Function<ValueLoss> {
  static Fwd run(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                 const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, OptD clip, int64_t loss_agg) {
    static const auto op = native_op<Fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptT&, OptD, OptD, int64_t)>("rlhf_kernels::ppo_value_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(values, old_values, returns, mask, num_tokens, num_tokens_value, clip, loss_agg);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& old_values,
                               const at::Tensor& returns, const at::Tensor& mask, const OptT& num_tokens,
                               OptD num_tokens_value, OptD clip, int64_t loss_agg) {
    auto [loss, stats, row_scale] =
        run(values, old_values, returns, mask, num_tokens, num_tokens_value, clip, loss_agg);
    ctx->save_for_backward({values, old_values, returns, mask, row_scale});
    ctx->saved_data["clip"] = clip;
    ctx->mark_non_differentiable({stats, row_scale});
    ctx->set_materialize_grads(false);
    return {loss, stats, row_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, OptD)>(
        "rlhf_kernels::ppo_value_bwd");
    variable_list out = no_grads(8);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    out[0] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["clip"].toOptional<double>());
    return out;
  }
};

Fwd policy_fwd_options(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                       const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, double clip_low,
                       OptD clip_high, OptD dual_clip, int64_t loss_agg, const OptT& rollout_logprobs, int64_t options,
                       OptD is_cap) {
  return autograd_forward<PolicyLoss>(records_grad({logprobs}), logprobs, old_logprobs, advantages, mask,
                                      num_tokens, num_tokens_value, clip_low, clip_high, dual_clip, loss_agg,
                                      rollout_logprobs, options, is_cap);
}

Fwd policy_fwd(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
               const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, double clip_low, OptD clip_high,
               OptD dual_clip, int64_t loss_agg) {
  return autograd_forward<PolicyLoss>(records_grad({logprobs}), logprobs, old_logprobs, advantages, mask,
                                      num_tokens, num_tokens_value, clip_low, clip_high, dual_clip, loss_agg, OptT(),
                                      int64_t{0}, OptD());
}

Fwd value_fwd(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
              const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, OptD clip, int64_t loss_agg) {
  return autograd_forward<ValueLoss>(records_grad({values}), values, old_values, returns, mask, num_tokens,
                                     num_tokens_value, clip, loss_agg);
}

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  m.impl("ppo_policy_fwd", &rlhf::autograd::policy_fwd);
  m.impl("ppo_policy_options_fwd", &rlhf::autograd::policy_fwd_options);
  m.impl("ppo_value_fwd", &rlhf::autograd::value_fwd);
}
