// The bt ops' host side, written once for both devices: argument checks, conversion of the
// inputs to what the kernels read (float32 and bool, contiguous: no copy when they already
// are), allocation of the outputs, then one call into the device's launchers `Dev`
// (csrc/cpu/bt.cpp, csrc/cuda/bt.cu), which see only the raw-pointer structs below.
//
// Dev provides:
//   static void bt_forward(const PairArgs&, const LossOutputs& (row_scale nullptr), const at::Tensor& like);
//   static void bt_backward(const PairArgs&, const float* grad, float* d_chosen, float* d_rejected,
//                           const at::Tensor& like);
//   static void ranking_forward(const RankingArgs&, const LossOutputs&, const at::Tensor& like);
//   static void ranking_backward(const RankingArgs&, const float* grad, const float* prompt_scale, float* out,
//                                const at::Tensor& like);
// The ranking forward returns each prompt's weight in the loss (prompt_scale [P]), so that its
// backward is one pass: d r_i = grad * w_p * sum_j dl_ij/dr_i.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "rlhf/checks.h"
#include "rlhf/layout.h"
#include "rlhf/loss_op.h"

namespace rlhf {

struct PairArgs {
  const float *chosen, *rejected;  // [P]
  const float* margin;             // [P], or nullptr
  int64_t P;
  float label_smoothing;
  double center_coef;
};

struct RankingArgs {
  const float* rewards;  // [P, K], best first
  const bool* valid;     // [P, K], or nullptr (all valid)
  int64_t P, K;
};

namespace detail {

inline std::tuple<PairInputs, PairArgs> pair_call(const at::Tensor& chosen, const at::Tensor& rejected,
                                                   const c10::optional<at::Tensor>& margin, double label_smoothing,
                                                   double center_coef, const char* op) {
  PairInputs in = check_pairs(chosen, rejected, margin, op);
  check_range(label_smoothing, 0.0, 1.0, "label_smoothing", op);
  TORCH_CHECK_VALUE(center_coef >= 0, op, ": `center_coef` must be >= 0, got ", center_coef);
  const PairArgs args{in.chosen.data_ptr<float>(), in.rejected.data_ptr<float>(), ptr_or_null(in.margin),
                      in.chosen.size(0), static_cast<float>(label_smoothing), center_coef};
  return {in, args};
}

inline std::tuple<RankingInputs, RankingArgs> ranking_call(const at::Tensor& rewards,
                                                           const c10::optional<at::Tensor>& valid, const char* op) {
  RankingInputs in = check_ranking(rewards, valid, op);
  const RankingArgs args{in.rewards.data_ptr<float>(), in.valid.defined() ? in.valid.data_ptr<bool>() : nullptr,
                         in.rewards.size(0), in.rewards.size(1)};
  return {in, args};
}

}  // namespace detail

template <typename Dev>
std::tuple<at::Tensor, at::Tensor> bt_forward(const at::Tensor& chosen, const at::Tensor& rejected,
                                              const c10::optional<at::Tensor>& margin, double label_smoothing,
                                              double center_coef) {
  const auto [in, args] = detail::pair_call(chosen, rejected, margin, label_smoothing, center_coef, "bt_loss");
  const auto opts = in.chosen.options();
  at::Tensor loss = at::empty({}, opts), stats = at::empty({kNumBTStats}, opts);
  Dev::bt_forward(args, {loss.data_ptr<float>(), stats.data_ptr<float>(), nullptr}, in.chosen);
  return {loss, stats};
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor> bt_backward(const at::Tensor& grad, const at::Tensor& chosen,
                                               const at::Tensor& rejected, const c10::optional<at::Tensor>& margin,
                                               double label_smoothing, double center_coef) {
  const char* op = "bt_loss backward";
  const auto [in, args] = detail::pair_call(chosen, rejected, margin, label_smoothing, center_coef, op);
  at::Tensor g;
  const float* gp = checked_grad(grad, in.chosen, g, op);
  at::Tensor dc = at::empty_like(in.chosen), dr = at::empty_like(in.rejected);
  if (args.P > 0) Dev::bt_backward(args, gp, dc.data_ptr<float>(), dr.data_ptr<float>(), in.chosen);
  return {dc, dr};
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ranking_forward(const at::Tensor& rewards,
                                                               const c10::optional<at::Tensor>& valid) {
  const auto [in, args] = detail::ranking_call(rewards, valid, "ranking_loss");
  auto [loss, stats, prompt_scale] = loss_outputs(in.rewards, kNumRankingStats);
  Dev::ranking_forward(args, {loss.data_ptr<float>(), stats.data_ptr<float>(), prompt_scale.data_ptr<float>()},
                       in.rewards);
  return {loss, stats, prompt_scale};
}

template <typename Dev>
at::Tensor ranking_backward(const at::Tensor& grad, const at::Tensor& rewards, const c10::optional<at::Tensor>& valid,
                            const at::Tensor& prompt_scale) {
  const char* op = "ranking_loss backward";
  const auto [in, args] = detail::ranking_call(rewards, valid, op);
  at::Tensor g;
  const float* gp = checked_grad(grad, in.rewards, g, op);
  const float* w = checked_row_scale(prompt_scale, in.rewards, "rewards", op);
  at::Tensor d = at::empty_like(in.rewards);
  if (args.P > 0 && args.K > 0) Dev::ranking_backward(args, gp, w, d.data_ptr<float>(), in.rewards);
  return d;
}

}  // namespace rlhf
