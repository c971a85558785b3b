// The score op's host side, written once for both devices: argument checks, the `validate`
// check of the levels and thresholds, conversion of the inputs to what the kernels read
// (float32 and int32/int64, contiguous: no copy when they already are), allocation of the
// outputs, then one call into the device's launcher `Dev` (csrc/cpu/score.cpp,
// csrc/cuda/score.cu), which sees only the raw-pointer struct below.
//
// Dev provides:
//   template <typename L> static void score_forward(const ScoreArgs<L>&, const ScoreOutputs&, const at::Tensor& like);
//   static void check_values(const at::Tensor& level, const at::Tensor& thresholds, const char* op);
// The forward writes the loss, the stats and the gradient factors of the mean loss (d_pred [P],
// d_thresholds [K-1]); the backward (csrc/autograd/score.cpp) only scales them.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "rlhf/checks.h"
#include "rlhf/label_dispatch.h"
#include "rlhf/layout.h"

namespace rlhf {

template <typename L>
struct ScoreArgs {
  const float* pred;        // [P]
  const float* target;      // [P] regression target, or nullptr (ordinal)
  const L* level;           // [P] ordinal level, or nullptr (regression)
  const float* thresholds;  // [K-1] ordinal thresholds, or nullptr (regression)
  int64_t P, K;             // K: number of levels (ordinal)
  int64_t kind;             // ScoreKind
};

struct ScoreOutputs {
  float* loss;          // []
  float* stats;         // [kNumScoreStats]
  float* d_pred;        // [P]: d loss / d pred
  float* d_thresholds;  // [K-1]: d loss / d thresholds (ordinal)
};

namespace detail {

// `validate` for kind = ordinal: levels in [0, K), thresholds finite and strictly increasing.
// Host memory is read in place; elsewhere a few elementwise ops and one read back (one host
// sync: Dev::check_values skips it while a CUDA graph is captured).
inline void fail_score_level(int64_t i, int64_t value, int64_t K, const char* op) {
  TORCH_CHECK_VALUE(false, op, ": `score` must hold levels in [0, K) = [0, ", K,
                    ") for kind='ordinal' (K = thresholds.shape[0] + 1), but score[", i, "] = ", value);
}

inline void fail_thresholds(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(false, op, ": `thresholds` must be finite and strictly increasing, got ",
                    t.to(at::kCPU).slice(0, 0, 16));
}

inline void check_score_values(const at::Tensor& level, const at::Tensor& t, const char* op) {
  const int64_t K = t.size(0) + 1, P = level.numel();
  if (level.is_cpu()) {
    with_labels(level, [&](auto* y) {
      for (int64_t i = 0; i < P; ++i)
        if (y[i] < 0 || y[i] >= K) fail_score_level(i, static_cast<int64_t>(y[i]), K, op);
    });
    const float* th = t.const_data_ptr<float>();
    for (int64_t k = 0; k < K - 1; ++k)
      if (!std::isfinite(th[k]) || (k > 0 && !(th[k] > th[k - 1]))) fail_thresholds(t, op);
    return;
  }
  const at::Tensor bad = level.lt(0).logical_or_(level.ge(K));
  at::Tensor any = bad.any().logical_or_(t.isfinite().logical_not_().any());
  if (K > 2) any.logical_or_(t.slice(0, 1).le(t.slice(0, 0, K - 2)).any());
  if (!any.item<bool>()) return;  // the one host sync of valid inputs
  if (bad.any().item<bool>()) {
    const int64_t i = at::nonzero(bad).select(1, 0)[0].item<int64_t>();
    fail_score_level(i, level[i].item<int64_t>(), K, op);
  }
  fail_thresholds(t, op);
}

}  // namespace detail

// -> (loss [], stats [kNumScoreStats], d_pred [P], d_thresholds [K-1] ([0] for regression)) float32.
template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_forward(const at::Tensor& pred,
                                                                         const at::Tensor& score,
                                                                         const c10::optional<at::Tensor>& thresholds,
                                                                         int64_t kind, bool validate) {
  const char* op = "score_loss";
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumScoreKinds, op, ": `kind` code must be 0 (regression) or 1 (ordinal), got ",
                    kind);
  check_floating(pred, "pred", op);
  check_dim(pred, 1, "[P]", "pred", op);
  const bool ordinal = kind == kScoreOrdinal;
  at::Tensor target, level, t;
  if (!ordinal) {
    check_floating(score, "score", op);
    check_like(score, "score", pred, "pred", op);
    TORCH_CHECK_VALUE(!thresholds.has_value(), op,
                      ": `thresholds` is for kind='ordinal'; kind='regression' takes none, got a tensor of shape ",
                      thresholds->sizes());
    target = as_f32(score);
  } else {
    TORCH_CHECK_TYPE(at::isIntegralType(score.scalar_type(), /*includeBool=*/false), op,
                     ": `score` must be an integer tensor of levels in [0, K) for kind='ordinal', got ",
                     score.scalar_type());
    check_like(score, "score", pred, "pred", op);
    TORCH_CHECK_VALUE(thresholds.has_value(), op, ": kind='ordinal' needs `thresholds` [K-1] (increasing), got None");
    check_floating(*thresholds, "thresholds", op);
    check_dim(*thresholds, 1, "[K-1]", "thresholds", op);
    check_same_device(*thresholds, "thresholds", pred, "pred", op);
    const auto dt = score.scalar_type();
    const bool native = dt == at::kLong || dt == at::kInt;
    level = native && score.is_contiguous() ? score : (native ? score : score.to(at::kLong)).contiguous();
    t = as_f32(*thresholds);
    if (validate) Dev::check_values(level, t, op);
  }
  const at::Tensor x = as_f32(pred);
  const int64_t P = x.size(0), K = ordinal ? t.size(0) + 1 : 0;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32), stats = at::empty({kNumScoreStats}, f32), d_pred = at::empty({P}, f32),
             d_t = at::empty({ordinal ? K - 1 : 0}, f32);
  const ScoreOutputs out{loss.data_ptr<float>(), stats.data_ptr<float>(), d_pred.data_ptr<float>(),
                         d_t.data_ptr<float>()};
  with_labels(level, [&](auto* y) {
    using L = std::remove_cv_t<std::remove_pointer_t<decltype(y)>>;
    const ScoreArgs<L> args{x.const_data_ptr<float>(), ordinal ? nullptr : target.const_data_ptr<float>(), y,
                            ordinal ? t.const_data_ptr<float>() : nullptr, P, K, kind};
    Dev::score_forward(args, out, x);
  });
  return {loss, stats, d_pred, d_t};
}

}  // namespace rlhf
