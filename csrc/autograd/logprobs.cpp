// Autograd of the logprobs ops (see autograd.h). Only the logits get a gradient (labels are
// integers; full_kl's ref_logits are a constant). Saved between forward and backward: the
// caller's logits (no copy), the per-row statistics [N, 2] ([N, 4] for full_kl) and the
// per-position output the gradient needs (entropy, or kl). With inplace_backward the backward
// writes the gradient over the saved logits (logprobs_bwd_inplace) and returns them: one
// [..., V] buffer less, and the caller's logits hold the gradient afterwards (eager only: the
// Python API passes false while torch.compile traces).
#include <optional>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

using OptT = std::optional<at::Tensor>;
using Fwd3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Fwd2 = std::tuple<at::Tensor, at::Tensor>;
using BwdSig = at::Tensor(const at::Tensor&, const OptT&, const OptT&, const OptT&, const at::Tensor&,
                          const at::Tensor&, double, int64_t);
using BwdInplaceSig = void(at::Tensor&, const OptT&, const OptT&, const OptT&, const at::Tensor&, const at::Tensor&,
                           double, int64_t);

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct TokenLogprobs : public torch::autograd::Function<TokenLogprobs> {
  // token_logprobs_fwd itself, below autograd (the CPU or CUDA kernel)
  static Fwd3 run(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
                  bool validate, bool inplace_backward) {
    static const auto op = native_op<Fwd3(const at::Tensor&, const at::Tensor&, double, int64_t, bool, bool)>(
        "rlhf_kernels::token_logprobs_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(logits, labels, temperature, ignore_index, validate, inplace_backward);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels,
                               double temperature, int64_t ignore_index, bool validate, bool inplace_backward) {
    auto [logp, entropy, stats] = run(logits, labels, temperature, ignore_index, validate, inplace_backward);
    ctx->save_for_backward({logits, labels, stats, entropy});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["inplace_backward"] = inplace_backward;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {logp, entropy, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out = no_grads(6);
    if (!grads[0].defined() && !grads[1].defined()) return out;  // neither output was used
    const auto s = ctx->get_saved_variables();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    if (ctx->saved_data["inplace_backward"].toBool()) {
      static const auto op = native_op<BwdInplaceSig>("rlhf_kernels::logprobs_bwd_inplace");
      at::Tensor z = s[0].detach();  // the caller's buffer (shares storage and version counter)
      op.call(z, s[1], opt(grads[0]), opt(grads[1]), s[2], s[3], temperature, ignore_index);
      out[0] = z;
    } else {
      static const auto op = native_op<BwdSig>("rlhf_kernels::logprobs_bwd");
      out[0] = op.call(s[0], s[1], opt(grads[0]), opt(grads[1]), s[2], s[3], temperature, ignore_index);
    }
    return out;
  }
};

struct TokenEntropy : public torch::autograd::Function<TokenEntropy> {
  static Fwd2 run(const at::Tensor& logits, double temperature) {
    static const auto op = native_op<Fwd2(const at::Tensor&, double)>("rlhf_kernels::token_entropy_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(logits, temperature);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, double temperature) {
    auto [entropy, stats] = run(logits, temperature);
    ctx->save_for_backward({logits, stats, entropy});
    ctx->saved_data["temperature"] = temperature;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {entropy, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<BwdSig>("rlhf_kernels::logprobs_bwd");
    variable_list out = no_grads(2);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    out[0] = op.call(s[0], std::nullopt, std::nullopt, grads[0], s[1], s[2],
                     ctx->saved_data["temperature"].toDouble(), 0);
    return out;
  }
};

struct FullKL : public torch::autograd::Function<FullKL> {
  static Fwd2 run(const at::Tensor& logits, const at::Tensor& ref_logits, double temperature) {
    static const auto op =
        native_op<Fwd2(const at::Tensor&, const at::Tensor&, double)>("rlhf_kernels::full_kl_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(logits, ref_logits, temperature);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& ref_logits,
                               double temperature) {
    auto [kl, stats] = run(logits, ref_logits, temperature);
    ctx->save_for_backward({logits, ref_logits, kl, stats});
    ctx->saved_data["temperature"] = temperature;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {kl, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, double)>(
        "rlhf_kernels::full_kl_bwd");
    variable_list out = no_grads(3);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    out[0] = op.call(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["temperature"].toDouble());
    return out;
  }
};

Fwd3 token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
                        bool validate, bool inplace_backward) {
  return autograd_forward<TokenLogprobs>(records_grad({logits}), logits, labels, temperature, ignore_index,
                                         validate, inplace_backward);
}

Fwd2 token_entropy_fwd(const at::Tensor& logits, double temperature) {
  return autograd_forward<TokenEntropy>(records_grad({logits}), logits, temperature);
}

// ref_logits is a constant: it never records a node, even when it requires a gradient.
Fwd2 full_kl_fwd(const at::Tensor& logits, const at::Tensor& ref_logits, double temperature) {
  return autograd_forward<FullKL>(records_grad({logits}), logits, ref_logits, temperature);
}

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  m.impl("token_logprobs_fwd", &rlhf::autograd::token_logprobs_fwd);
  m.impl("token_entropy_fwd", &rlhf::autograd::token_entropy_fwd);
  m.impl("full_kl_fwd", &rlhf::autograd::full_kl_fwd);
}
