// Autograd of the ppo ops (see autograd.h): the forward saves the inputs and each row's
// weight in the loss (row_scale); the backward is one call of the elementwise backward op,
// which reads the upstream gradient on the device (no host sync, no glue kernels).
// Only `logprobs` / `values` get a gradient; old values, advantages and returns are constants.
#include <optional>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;
using OptD = std::optional<double>;

struct PolicyLoss : public torch::autograd::Function<PolicyLoss> {
  // ppo_policy_fwd itself, below autograd (the CPU or CUDA kernel)
  static Fwd run(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                 const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, double clip_low,
                 OptD clip_high, OptD dual_clip, int64_t loss_agg) {
    static const auto op =
        native_op<Fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, OptD,
                      double, OptD, OptD, int64_t)>("rlhf_kernels::ppo_policy_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value, clip_low, clip_high,
                   dual_clip, loss_agg);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const OptT& num_tokens,
                               OptD num_tokens_value, double clip_low, OptD clip_high, OptD dual_clip,
                               int64_t loss_agg) {
    auto [loss, stats, row_scale] = run(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value,
                                        clip_low, clip_high, dual_clip, loss_agg);
    ctx->save_for_backward({logprobs, old_logprobs, advantages, mask, row_scale});
    ctx->saved_data["clip_low"] = clip_low;
    ctx->saved_data["clip_high"] = clip_high;
    ctx->saved_data["dual_clip"] = dual_clip;
    ctx->mark_non_differentiable({stats, row_scale});
    ctx->set_materialize_grads(false);
    return {loss, stats, row_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, OptD,
                                                OptD)>("rlhf_kernels::ppo_policy_bwd");
    variable_list out = no_grads(10);
    if (!grads[0].defined()) return out;  // the loss was not used: zero gradient
    const auto s = ctx->get_saved_variables();
    out[0] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["clip_low"].toDouble(),
                     ctx->saved_data["clip_high"].toOptional<double>(),
                     ctx->saved_data["dual_clip"].toOptional<double>());
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

Fwd policy_fwd(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
               const at::Tensor& mask, const OptT& num_tokens, OptD num_tokens_value, double clip_low, OptD clip_high,
               OptD dual_clip, int64_t loss_agg) {
  return autograd_forward<PolicyLoss>(records_grad({logprobs}), logprobs, old_logprobs, advantages, mask,
                                      num_tokens, num_tokens_value, clip_low, clip_high, dual_clip, loss_agg);
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
  m.impl("ppo_value_fwd", &rlhf::autograd::value_fwd);
}
