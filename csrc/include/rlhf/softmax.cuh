// Device helpers of the logprobs CUDA kernels, shared by csrc/cuda/logprobs.cu (whole
// rows of logits) and csrc/cuda/linear_logprobs.cu (row segments of a logits tile):
// vector loads and stores, the NaN-keeping max, the fixed-order block merge of online-softmax
// statistics (warp shuffles, then across warps: deterministic, no atomics), and launcher
// helpers (vector width, row count, the capture-aware label check). Everything is in an
// anonymous namespace: each including file gets its own copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "rlhf/label_dispatch.h"
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

// Fold K scaled entries into a thread's running statistics: one max, at most one rebase,
// one exp per entry.
template <int K>
__device__ __forceinline__ void softmax_stats_fold(SoftmaxStats& st, const float (&s)[K]) {
  const float vmax = max_nan(s);
  if (!(vmax <= st.m)) st = softmax_stats_rebase(st, vmax);
  if (st.m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < K; ++k) softmax_stats_add(st, s[k], __expf(s[k] - st.m));
  }
}

// In place: the scaled entries s of columns j..j+K-1 -> dz = ds / T of g_l * logp_y + g_H * H,
// y the label's column (no column matches when it is elsewhere); all 0 unless `keep`.
template <int K>
__device__ __forceinline__ void logprob_grad_vec(float (&s)[K], int64_t j, int64_t y, float m, float log_d, float h,
                                                 float gl, float gh, float inv_t, bool keep) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float lp = log_prob(s[k], m, log_d);
    const float ds = logprob_entropy_grad(lp, __expf(lp), gl, gh, h) + (j + k == y ? gl : 0.f);
    s[k] = keep ? ds * inv_t : 0.f;
  }
}

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

void check_rows(int64_t N, const char* op) {
  TORCH_CHECK_VALUE(N <= 2147483647LL, op, ": too many rows for one launch: ", N);
}

// check_label_range (rlhf/label_dispatch.h: one host sync), except while the current stream
// is being captured into a CUDA graph, where a sync is not allowed: there a bad label gives
// NaN and a zero gradient row, as with validate=False.
void checked_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
  if (labels.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(labels.device());
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  check_label_range(labels, V, ignore_index, op);
}

}  // namespace
}  // namespace rlhf
