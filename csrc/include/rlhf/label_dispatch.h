// Host helpers shared by the CPU and CUDA launchers of the logprobs families: the labels'
// integer type as a template parameter, and optional float32 tensors as raw pointers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace rlhf {

// Calls f(const int64_t*) or f(const int32_t*) with the labels' data; f(nullptr as
// const int64_t*) when there are no labels.
template <typename F>
void with_labels(const c10::optional<at::Tensor>& labels, F f) {
  if (!labels.has_value()) {
    f(static_cast<const int64_t*>(nullptr));
  } else if (labels->scalar_type() == at::kLong) {
    f(labels->data_ptr<int64_t>());
  } else {
    f(labels->data_ptr<int32_t>());
  }
}

inline const float* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace rlhf
