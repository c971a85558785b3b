// Argument checks for the native ops: every failure names the argument and
// what was expected, so the Python error says what to fix.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define RLHF_CHECK_DTYPE(t, dt, op) \
  TORCH_CHECK((t).scalar_type() == (dt), op ": `" #t "` must be ", c10::toString(dt), ", got ", (t).scalar_type())
#define RLHF_CHECK_CONTIG(t, op) \
  TORCH_CHECK((t).is_contiguous(), op ": `" #t "` must be contiguous (the Python API makes it so)")
#define RLHF_CHECK_SAME_DEVICE(a, b, op)                                                                  \
  TORCH_CHECK((a).device() == (b).device(), op ": `" #a "` is on ", (a).device(), " but `" #b "` is on ", \
              (b).device())
#define RLHF_CHECK_SAME_SHAPE(a, b, op)                                                                   \
  TORCH_CHECK((a).sizes() == (b).sizes(), op ": `" #a "` has shape ", (a).sizes(), " but `" #b "` has shape ", \
              (b).sizes())

namespace rlhf {

// `last_values` of the gae ops: absent (nullptr) or float32 [B] contiguous beside `ref`.
inline const float* check_last_values(const c10::optional<at::Tensor>& last_values, int64_t B, const at::Tensor& ref,
                                      const char* op) {
  if (!last_values.has_value()) return nullptr;
  const at::Tensor& lv = *last_values;
  TORCH_CHECK(lv.dim() == 1 && lv.size(0) == B, op, ": `last_values` must have shape [", B, "], got ", lv.sizes());
  RLHF_CHECK_DTYPE(lv, at::kFloat, "rlhf_kernels");
  RLHF_CHECK_CONTIG(lv, "rlhf_kernels");
  RLHF_CHECK_SAME_DEVICE(lv, ref, "rlhf_kernels");
  return lv.data_ptr<float>();
}

}  // namespace rlhf
