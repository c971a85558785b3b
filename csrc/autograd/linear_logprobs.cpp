// Autograd of linear_token_logprobs (see autograd.h): hidden, weight and bias get gradients,
// each only when it needs one (the backward op skips the matmuls of the others). Saved
// between forward and backward: the caller's hidden, weight and bias (no copies), the labels,
// the per-row statistics [N, 2] and the entropy.
#include <optional>
#include <tuple>

#include "autograd.h"

namespace rlhf::autograd {
namespace {

using OptT = std::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct LinearLogprobs : public torch::autograd::Function<LinearLogprobs> {
  // linear_logprobs_fwd itself, below autograd (the CPU or CUDA op)
  static Fwd run(const at::Tensor& hidden, const at::Tensor& weight, const OptT& bias, const at::Tensor& labels,
                 double temperature, int64_t ignore_index, int64_t tile, bool validate) {
    static const auto op = native_op<Fwd(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, double,
                                         int64_t, int64_t, bool)>("rlhf_kernels::linear_logprobs_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(hidden, weight, bias, labels, temperature, ignore_index, tile, validate);
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const OptT& bias, const at::Tensor& labels, double temperature, int64_t ignore_index,
                               int64_t tile, bool validate) {
    auto [logp, entropy, stats] = run(hidden, weight, bias, labels, temperature, ignore_index, tile, validate);
    ctx->save_for_backward({hidden, weight, bias.value_or(at::Tensor()), labels, stats, entropy});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["tile"] = tile;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {logp, entropy, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        native_op<Fwd(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const OptT&, const OptT&,
                      const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, bool, bool, bool)>(
            "rlhf_kernels::linear_logprobs_bwd");
    variable_list out = no_grads(8);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const auto s = ctx->get_saved_variables();
    const bool has_bias = s[2].defined();
    // needs_input_grad counts the tensor arguments: hidden, weight, then bias when given
    const bool need_h = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    if (!(need_h || need_w || need_b)) return out;
    auto [dh, dw, db] = op.call(s[0], s[1], opt(s[2]), s[3], opt(grads[0]), opt(grads[1]), s[4], s[5],
                                ctx->saved_data["temperature"].toDouble(), ctx->saved_data["ignore_index"].toInt(),
                                ctx->saved_data["tile"].toInt(), need_h, need_w, need_b);
    if (need_h) out[0] = dh;
    if (need_w) out[1] = dw;
    if (need_b) out[2] = db;
    return out;
  }
};

Fwd linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight, const OptT& bias,
                        const at::Tensor& labels, double temperature, int64_t ignore_index, int64_t tile,
                        bool validate) {
  return autograd_forward<LinearLogprobs>(records_grad({hidden, weight, bias.value_or(at::Tensor())}), hidden,
                                          weight, bias, labels, temperature, ignore_index, tile, validate);
}

}  // namespace
}  // namespace rlhf::autograd

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  m.impl("linear_logprobs_fwd", &rlhf::autograd::linear_logprobs_fwd);
}
