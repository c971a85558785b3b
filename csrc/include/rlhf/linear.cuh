// Shared by the CUDA epilogues of the fused LM heads (csrc/cuda/linear_logprobs.cu,
// csrc/cuda/linear_policy.cu) (.cu only): the biased, scaled load of a float32 logits tile,
// the float32-output matmuls and the dispatch on the dlogits dtype. Everything is in an anonymous namespace, as in
// rlhf/softmax.cuh: each including file gets its own copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

#include "rlhf/softmax.cuh"

namespace rlhf {
namespace {

// s = (z + b) * inv_t for K entries (b == nullptr: no bias); K > 1 needs 16-byte alignment.
template <int K>
__device__ __forceinline__ void load_biased(const float* z, const float* b, float inv_t, float (&s)[K]) {
  load_scaled<float, K>(z, 1.f, s);
  if (b != nullptr) {
    float bv[K];
    load_scaled<float, K>(b, 1.f, bv);
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += bv[k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] *= inv_t;
}

// out (float32) = a @ b; 16-bit operands through cuBLAS with float32 accumulation and output
// (at::mm's out_dtype overload), so nothing is rounded to 16 bits.
void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

// acc (float32) += a @ b. Float32 operands in place (addmm_); 16-bit ones through mm_f32's
// overload into a float32 temporary, then an add: addmm_out with a float32 `out` and 16-bit
// operands is accepted by torch 2.14 but refused by some older versions, and
// the temporary is what linear_logprobs has always paid.
void addmm_f32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b, at::kFloat));
  }
}

// Calls launch(T*) with dlogits' data, T the matmul operands' dtype (float, Half or BFloat16),
// or with a null float* when dlogits is undefined (no gradient asked for).
template <typename F>
void with_dlogits(const at::Tensor& dlogits, F launch) {
  if (!dlogits.defined()) {
    return launch(static_cast<float*>(nullptr));
  }
  switch (dlogits.scalar_type()) {
    case at::kFloat:
      return launch(dlogits.data_ptr<float>());
    case at::kHalf:
      return launch(dlogits.data_ptr<at::Half>());
    default:
      TORCH_INTERNAL_ASSERT(dlogits.scalar_type() == at::kBFloat16, "unexpected dlogits dtype");
      return launch(dlogits.data_ptr<at::BFloat16>());
  }
}

}  // namespace
}  // namespace rlhf
