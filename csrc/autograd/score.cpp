// Autograd of score_fwd (see autograd.h). The forward already wrote the gradient factors of
// the loss (d_pred [P], d_thresholds [K-1]); the backward scales them by the upstream
// gradient: one elementwise multiply each, on the device, no host sync. The score is a
// constant.
#include <ATen/ops/mul.h>

#include <optional>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

using ScoreOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ScoreLoss : public torch::autograd::Function<ScoreLoss> {
  using FwdSig = ScoreOut(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, bool);

  // score_fwd itself, below autograd (the CPU or CUDA kernel)
  static ScoreOut run(const at::Tensor& pred, const at::Tensor& score, const std::optional<at::Tensor>& thresholds,
                      int64_t kind, bool validate) {
    static const auto op = native_op<FwdSig>("rlhf_kernels::score_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(pred, score, thresholds, kind, validate);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& score,
                               const std::optional<at::Tensor>& thresholds, int64_t kind, bool validate) {
    auto [loss, stats, d_pred, d_thresholds] = run(pred, score, thresholds, kind, validate);
    ctx->save_for_backward({d_pred, d_thresholds});
    ctx->saved_data["thresholds"] = thresholds.has_value();
    ctx->mark_non_differentiable({stats, d_pred, d_thresholds});
    ctx->set_materialize_grads(false);
    return {loss, stats, d_pred, d_thresholds};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out = no_grads(5);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    out[0] = at::mul(s[0], grads[0]);
    if (ctx->saved_data["thresholds"].toBool()) out[2] = at::mul(s[1], grads[0]);
    return out;
  }
};

ScoreOut score_fwd(const at::Tensor& pred, const at::Tensor& score, const std::optional<at::Tensor>& thresholds,
                   int64_t kind, bool validate) {
  const bool record = thresholds.has_value() ? records_grad({pred, *thresholds}) : records_grad({pred});
  return autograd_forward<ScoreLoss>(record, pred, score, thresholds, kind, validate);
}

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) { m.impl("score_fwd", &rlhf::autograd::score_fwd); }
