// Autograd of the bt ops (see autograd.h). bt: both chosen and rejected get a gradient, the
// margin is a constant. ranking: the forward saves each prompt's weight in the loss.
#include <optional>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

struct BTLoss : public torch::autograd::Function<BTLoss> {
  using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, double);
  using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, double);

  // bt_fwd itself, below autograd (the CPU or CUDA kernel)
  static std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& chosen, const at::Tensor& rejected,
                                                const std::optional<at::Tensor>& margin, double label_smoothing,
                                                double center_coef) {
    static const auto op = native_op<FwdSig>("rlhf_kernels::bt_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(chosen, rejected, margin, label_smoothing, center_coef);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& chosen, const at::Tensor& rejected,
                               const std::optional<at::Tensor>& margin, double label_smoothing, double center_coef) {
    auto [loss, stats] = run(chosen, rejected, margin, label_smoothing, center_coef);
    ctx->save_for_backward({chosen, rejected, margin.value_or(at::Tensor())});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["center_coef"] = center_coef;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<BwdSig>("rlhf_kernels::bt_bwd");
    variable_list out = no_grads(5);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    const std::optional<at::Tensor> margin = s[2].defined() ? std::optional<at::Tensor>(s[2]) : std::nullopt;
    auto [dc, dr] = op.call(grads[0], s[0], s[1], margin, ctx->saved_data["label_smoothing"].toDouble(),
                            ctx->saved_data["center_coef"].toDouble());
    out[0] = dc;
    out[1] = dr;
    return out;
  }
};

struct RankingLoss : public torch::autograd::Function<RankingLoss> {
  using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&);
  using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&);

  // ranking_fwd itself, below autograd (the CPU or CUDA kernel)
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& rewards,
                                                            const std::optional<at::Tensor>& valid) {
    static const auto op = native_op<FwdSig>("rlhf_kernels::ranking_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(rewards, valid);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& rewards,
                               const std::optional<at::Tensor>& valid) {
    auto [loss, stats, prompt_scale] = run(rewards, valid);
    ctx->save_for_backward({rewards, valid.value_or(at::Tensor()), prompt_scale});
    ctx->mark_non_differentiable({stats, prompt_scale});
    ctx->set_materialize_grads(false);
    return {loss, stats, prompt_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = native_op<BwdSig>("rlhf_kernels::ranking_bwd");
    variable_list out = no_grads(2);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    const std::optional<at::Tensor> valid = s[1].defined() ? std::optional<at::Tensor>(s[1]) : std::nullopt;
    out[0] = op.call(grads[0], s[0], valid, s[2]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> bt_fwd(const at::Tensor& chosen, const at::Tensor& rejected,
                                          const std::optional<at::Tensor>& margin, double label_smoothing,
                                          double center_coef) {
  return autograd_forward<BTLoss>(records_grad({chosen, rejected}), chosen, rejected, margin, label_smoothing,
                                  center_coef);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ranking_fwd(const at::Tensor& rewards,
                                                           const std::optional<at::Tensor>& valid) {
  return autograd_forward<RankingLoss>(records_grad({rewards}), rewards, valid);
}

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  m.impl("bt_fwd", &rlhf::autograd::bt_fwd);
  m.impl("ranking_fwd", &rlhf::autograd::ranking_fwd);
}
