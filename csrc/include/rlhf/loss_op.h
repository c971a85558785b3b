// Host-side pieces shared by the loss ops' wrappers (rlhf/ppo_op.h, rlhf/bt_op.h): their
// outputs and the checks of what a backward gets back from its forward.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "rlhf/checks.h"

namespace rlhf {

// A loss forward's outputs: the loss, its statistics (order: rlhf/layout.h) and each row's
// weight in the loss (loss = sum_b w_b * sum of the row's terms), used by the backward.
struct LossOutputs {
  float* loss;       // []
  float* stats;      // [n_stats]
  float* row_scale;  // [rows], or nullptr for a loss without per-row weights
};

// (loss [], stats [n_stats], row_scale [rows]) float32 beside `like` (rows = like.size(0)).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_outputs(const at::Tensor& like, int64_t n_stats) {
  const auto opts = like.options().dtype(at::kFloat);
  return {at::empty({}, opts), at::empty({n_stats}, opts), at::empty({like.size(0)}, opts)};
}

// The upstream gradient of a loss: 0-d, beside the inputs; float32 (kept alive in `keep`).
inline const float* checked_grad(const at::Tensor& grad, const at::Tensor& ref, at::Tensor& keep, const char* op) {
  check_scalar(grad, "grad", ref, op);
  keep = as_f32(grad);
  return keep.data_ptr<float>();
}

// The per-row weights [rows] a forward returned, checked against the rows of `ref`.
inline const float* checked_row_scale(const at::Tensor& row_scale, const at::Tensor& ref, const char* ref_name,
                                      const char* op) {
  check_rows_f32(row_scale, ref.size(0), 0, "row_scale", ref, ref_name, op);
  return row_scale.data_ptr<float>();
}

}  // namespace rlhf
