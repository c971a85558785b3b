// Device helpers of the logprobs CUDA kernels, shared by csrc/cuda/logprobs.cu (whole
// rows of logits) and csrc/cuda/linear_logprobs.cu (row segments of a logits tile):
// vector loads and stores, the NaN-keeping max, the fixed-order block merge of online-softmax
// statistics (warp shuffles, then across warps: deterministic, no atomics), and launcher
// helpers. Everything is in an anonymous namespace: each including file gets its own copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "rlhf/logprobs.h"

namespace rlhf {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

// K entries from p (16-byte aligned when K > 1), converted to float and scaled by inv_t.
template <typename T, int K>
__device__ __forceinline__ void load_scaled(const T* p, float inv_t, float (&s)[K]) {
  const Pack<T, K> pack = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] = static_cast<float>(pack.v[k]) * inv_t;
}

template <typename T, int K>
__device__ __forceinline__ void store(T* p, const float (&g)[K]) {
  Pack<T, K> pack;
#pragma unroll
  for (int k = 0; k < K; ++k) pack.v[k] = static_cast<T>(g[k]);
  *reinterpret_cast<Pack<T, K>*>(p) = pack;
}

// Max that keeps NaN (fmaxf would drop it, and a NaN row must stay NaN).
template <int K>
__device__ __forceinline__ float max_nan(const float (&s)[K]) {
  float m = s[0];
#pragma unroll
  for (int k = 1; k < K; ++k) m = (s[k] > m || s[k] != s[k]) ? s[k] : m;
  return m;
}

__device__ __forceinline__ SoftmaxStats shfl_xor(SoftmaxStats a, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, a.m, lane_mask), __shfl_xor_sync(0xffffffffu, a.d, lane_mask),
          __shfl_xor_sync(0xffffffffu, a.w, lane_mask)};
}

__device__ __forceinline__ KlStats shfl_xor(KlStats a, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, a.m, lane_mask), __shfl_xor_sync(0xffffffffu, a.d, lane_mask),
          __shfl_xor_sync(0xffffffffu, a.w, lane_mask), __shfl_xor_sync(0xffffffffu, a.mr, lane_mask),
          __shfl_xor_sync(0xffffffffu, a.dr, lane_mask)};
}

__device__ __forceinline__ SoftmaxStats merge(SoftmaxStats a, SoftmaxStats b) { return softmax_stats_merge(a, b); }
__device__ __forceinline__ KlStats merge(KlStats a, KlStats b) { return kl_stats_merge(a, b); }

// Merge every thread's statistics; the result is valid in thread 0.
template <typename S>
__device__ S block_merge(S st, S empty) {
  __shared__ S warp_stats[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl_xor(st, off));
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_stats[lane] : empty;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl_xor(st, off));
  }
  return st;
}

// ---- launcher helpers ----

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(std::integral_constant<int, K>) with K = 16 / sizeof(T) when every row of every
// pointer is 16-byte aligned, else K = 1.
template <typename T, typename F>
void with_vector_width(int64_t V, std::initializer_list<const void*> ptrs, F f) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = V % kVec == 0;
  for (const void* p : ptrs) vec = vec && aligned16(p);
  if (vec) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

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

const float* opt_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void check_rows(int64_t N, const char* op) {
  TORCH_CHECK(N <= 2147483647LL, op, ": too many rows for one launch: ", N);
}

}  // namespace
}  // namespace rlhf
