// Host helpers shared by the host wrappers of the logprobs families (rlhf/logprobs_op.h,
// rlhf/linear_logprobs_op.h) and their launchers: the labels' integer type as a template
// parameter, and the label range check.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/any.h>
#include <ATen/ops/nonzero.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "rlhf/checks.h"

namespace rlhf {

// Calls f(const int64_t*) or f(const int32_t*) with the labels' data (int64 or int32,
// contiguous); f(nullptr as const int64_t*) when there are no labels.
template <typename F>
void with_labels(const at::Tensor& labels, F f) {
  if (!labels.defined()) {
    f(static_cast<const int64_t*>(nullptr));
  } else if (labels.scalar_type() == at::kLong) {
    f(labels.const_data_ptr<int64_t>());
  } else {
    f(labels.const_data_ptr<int32_t>());
  }
}

// Raises (ValueError) when a label is outside [0, V) and not ignore_index. `labels` as
// check_labels returns them. Labels in host memory are read in place; elsewhere the check
// is a few elementwise ops and one read back: one host sync on a GPU, which is why the
// public API documents it and can skip it (validate=False), and why the CUDA launchers skip
// it while a CUDA graph is being captured. The kernels never read outside a row whatever
// the labels hold: a bad label gives NaN (forward) and a zero gradient row.
inline void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
  if (labels.numel() == 0) return;
  if (labels.is_cpu()) {
    with_labels(labels, [&](auto* y) {
      const int64_t n = labels.numel();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(y[i]);
        if (v != ignore_index && (v < 0 || v >= V)) fail_bad_label(i, v, V, ignore_index, op);
      }
    });
    return;
  }
  const at::Tensor flat = labels.reshape({-1});
  const at::Tensor bad = flat.lt(0).logical_or_(flat.ge(V)).logical_and_(flat.ne(ignore_index));
  if (!bad.any().item<bool>()) return;  // the one host sync of valid labels
  const int64_t row = at::nonzero(bad).select(1, 0)[0].item<int64_t>();
  fail_bad_label(row, flat[row].item<int64_t>(), V, ignore_index, op);
}

}  // namespace rlhf
