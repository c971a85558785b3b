// Autograd of linear_policy_loss (see autograd.h). The gradients are made by the forward:
// with one of hidden, weight and bias requiring a gradient (and grad mode on) the Function
// calls linear_policy_fwd_grad, which returns d loss / d hidden, weight and bias for a unit
// upstream gradient along with the loss (rlhf/linear_policy_op.h), each only when its input
// needs one; without, linear_policy_fwd runs the forward alone (2NHV FLOPs, no node).
// The gradients are kept in the context's saved_data, not as saved variables: nothing else
// holds them, so the backward takes them out, multiplies them in place by the upstream
// gradient (a 0-d tensor on the device: no host sync) and hands them over to the
// accumulation without a copy. That multiply is the whole backward. They are handed over
// once: a second backward through the same forward (retain_graph=True) raises.
#include <optional>
#include <string_view>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

using OptT = std::optional<at::Tensor>;
using OptD = std::optional<double>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FwdGrad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
constexpr size_t kArgs = 23;  // linear_policy_fwd's arguments
constexpr const char* kGradKeys[3] = {"d_hidden", "d_weight", "d_bias"};

struct LinearPolicy : public torch::autograd::Function<LinearPolicy> {
  // linear_policy_fwd itself, below autograd (the CPU or CUDA op): no gradients
  static Fwd run(const at::Tensor& hidden, const at::Tensor& weight, const OptT& bias, const at::Tensor& labels,
                 const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                 const OptT& ref_logprobs, const OptT& num_tokens, OptD num_tokens_value, double temperature,
                 double kl_coef, std::string_view kl_kind, double entropy_coef, double clip_low, OptD clip_high,
                 OptD dual_clip, int64_t loss_agg, const OptT& rollout_logprobs, int64_t options, OptD is_cap,
                 int64_t tile, bool validate) {
    static const auto op =
        native_op<Fwd(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, OptD, double, double,
                      std::string_view, double, double, OptD, OptD, int64_t, const OptT&, int64_t, OptD, int64_t,
                      bool)>("rlhf_kernels::linear_policy_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, num_tokens,
                   num_tokens_value, temperature, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                   loss_agg, rollout_logprobs, options, is_cap, tile, validate);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const OptT& bias, const at::Tensor& labels, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& mask, const OptT& ref_logprobs,
                               const OptT& num_tokens, OptD num_tokens_value, double temperature, double kl_coef,
                               std::string_view kl_kind, double entropy_coef, double clip_low, OptD clip_high,
                               OptD dual_clip, int64_t loss_agg, const OptT& rollout_logprobs, int64_t options,
                               OptD is_cap, int64_t tile, bool validate) {
    static const auto op =
        native_op<FwdGrad(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, OptD, double, double,
                          std::string_view, double, double, OptD, OptD, int64_t, const OptT&, int64_t, OptD, int64_t,
                          bool, bool, bool, bool)>("rlhf_kernels::linear_policy_fwd_grad");
    const bool need[3] = {hidden.requires_grad(), weight.requires_grad(), bias.has_value() && bias->requires_grad()};
    FwdGrad r;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      r = op.call(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, num_tokens,
                  num_tokens_value, temperature, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                  loss_agg, rollout_logprobs, options, is_cap, tile, validate, need[0], need[1], need[2]);
    }
    auto& [loss, stats, logp, d_hidden, d_weight, d_bias] = r;
    const at::Tensor grads[3] = {d_hidden, d_weight, d_bias};
    for (int i = 0; i < 3; ++i)
      if (need[i]) ctx->saved_data[kGradKeys[i]] = grads[i];
    ctx->mark_non_differentiable({stats, logp});
    ctx->set_materialize_grads(false);
    return {loss, stats, logp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out = no_grads(kArgs);
    bool found = false;
    for (int i = 0; i < 3; ++i) {
      const auto it = ctx->saved_data.find(kGradKeys[i]);
      if (it == ctx->saved_data.end()) continue;
      found = true;
      at::Tensor g = it->second.toTensor();
      ctx->saved_data.erase(it);  // ours alone now: scaled in place, handed over without a copy
      if (grads[0].defined()) out[i] = g.mul_(grads[0]);
    }
    TORCH_CHECK(found, "linear_policy_loss: a second backward through the same call (retain_graph=True?): its "
                       "gradients are made by the forward and handed over to the first backward; call "
                       "linear_policy_loss again");
    return out;
  }
};

Fwd linear_policy_fwd(const at::Tensor& hidden, const at::Tensor& weight, const OptT& bias, const at::Tensor& labels,
                      const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                      const OptT& ref_logprobs, const OptT& num_tokens, OptD num_tokens_value, double temperature,
                      double kl_coef, std::string_view kl_kind, double entropy_coef, double clip_low, OptD clip_high,
                      OptD dual_clip, int64_t loss_agg, const OptT& rollout_logprobs, int64_t options, OptD is_cap,
                      int64_t tile, bool validate) {
  return autograd_forward<LinearPolicy>(records_grad({hidden, weight, bias.value_or(at::Tensor())}), hidden, weight,
                                        bias, labels, old_logprobs, advantages, mask, ref_logprobs, num_tokens,
                                        num_tokens_value, temperature, kl_coef, kl_kind, entropy_coef, clip_low,
                                        clip_high, dual_clip, loss_agg, rollout_logprobs, options, is_cap, tile,
                                        validate);
}

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  m.impl("linear_policy_fwd", &rlhf::autograd::linear_policy_fwd);
}
