// GAE, packed GAE and masked whitening on CUDA.
//
// GAE is a reverse scan over affine maps (rlhf/gae.h). One thread block per
// sequence; the sequence is cut into tiles of THREADS*ITEMS steps walked from
// the end, each tile solved by two block-wide scans, with a carry between tiles
// so any length works:
//   1. V_next(t): maps "x -> m_{t+1} ? V_{t+1} : x"   (float: a pure selection)
//   2. A_t:       maps "x -> m_t ? delta_t + gamma*lam*x : x"  (float64 carry)
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf/checks.h"
#include "rlhf/gae.h"

namespace rlhf {
namespace {

constexpr int kThreads = 512;  // per block (one block per sequence)
constexpr int kItems = 8;      // steps per thread per tile
constexpr int kTile = kThreads * kItems;
constexpr int kWarps = kThreads / 32;

// Scan order k = 0, 1, ... runs backwards in time, so a later element is the
// outer map: S_k = f_k ∘ S_{k-1}. Returns the exclusive prefix of this thread
// and the whole block's composition in `total`.
template <typename T>
__device__ Affine<T> block_exclusive_scan(Affine<T> mine, Affine<T>& total, Affine<T>* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Affine<T> incl = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    Affine<T> other;
    other.a = __shfl_up_sync(0xffffffffu, incl.a, off);
    other.b = __shfl_up_sync(0xffffffffu, incl.b, off);
    if (lane >= off) incl = compose(incl, other);
  }
  Affine<T> lane_excl;
  lane_excl.a = __shfl_up_sync(0xffffffffu, incl.a, 1);
  lane_excl.b = __shfl_up_sync(0xffffffffu, incl.b, 1);
  if (lane == 0) lane_excl = {T(1), T(0)};
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    Affine<T> w = lane < kWarps ? warp_sums[lane] : Affine<T>{T(1), T(0)};
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      Affine<T> other;
      other.a = __shfl_up_sync(0xffffffffu, w.a, off);
      other.b = __shfl_up_sync(0xffffffffu, w.b, off);
      if (lane >= off) w = compose(w, other);
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  const Affine<T> warp_prefix = warp > 0 ? warp_sums[warp - 1] : Affine<T>{T(1), T(0)};
  total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next scan
  return compose(lane_excl, warp_prefix);
}

// rewards, values: [N] float32 (padded rows are laid end to end)
// mask: [N] bool, or nullptr (all valid)
// cu_seqlens: [B+1] int64, or nullptr, then row b is [b*T, (b+1)*T)
// last_values: [B] float32, or nullptr (0)
// adv, ret: [N] float32 outputs
__global__ void __launch_bounds__(kThreads) gae_kernel(const float* __restrict__ rewards,
                                                       const float* __restrict__ values,
                                                       const bool* __restrict__ mask,
                                                       const int64_t* __restrict__ cu_seqlens, int64_t T,
                                                       const float* __restrict__ last_values, double gamma,
                                                       double lam, float* __restrict__ adv, float* __restrict__ ret) {
  __shared__ Affine<float> sums_v[kWarps];
  __shared__ Affine<double> sums_a[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t start = cu_seqlens ? cu_seqlens[row] : row * T;
  const int64_t end = cu_seqlens ? cu_seqlens[row + 1] : start + T;
  float carry_v = last_values ? last_values[row] : 0.f;  // value of the next unmasked step after the tile
  double carry_a = 0.0;                                   // advantage of the next unmasked step after the tile

  for (int64_t tile_end = end; tile_end > start; tile_end -= kTile) {
    const int64_t tile_start = tile_end - kTile > start ? tile_end - kTile : start;
    const int64_t t0 = tile_end - 1 - static_cast<int64_t>(threadIdx.x) * kItems;  // this thread's first step

    // Scan 1: value of the next unmasked step, V_next(t).
    Affine<float> mine_v = {1.f, 0.f};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = t0 - i;
      if (t >= tile_start && t + 1 < end) {
        const bool valid_next = mask == nullptr || mask[t + 1];
        mine_v = compose(next_value_map<float>(valid_next, values[t + 1]), mine_v);
      }
    }
    Affine<float> total_v;
    const Affine<float> excl_v = block_exclusive_scan(mine_v, total_v, sums_v);
    float next_v[kItems];
    float x = apply(excl_v, carry_v);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = t0 - i;
      if (t >= tile_start && t + 1 < end) {
        const bool valid_next = mask == nullptr || mask[t + 1];
        x = apply(next_value_map<float>(valid_next, values[t + 1]), x);
      }
      next_v[i] = x;
    }
    carry_v = apply(total_v, carry_v);

    // Scan 2: the advantages.
    Affine<double> mine_a = {1.0, 0.0};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = t0 - i;
      if (t >= tile_start) {
        const bool valid = mask == nullptr || mask[t];
        mine_a = compose(gae_step_map<double>(valid, rewards[t], values[t], next_v[i], gamma, lam), mine_a);
      }
    }
    Affine<double> total_a;
    const Affine<double> excl_a = block_exclusive_scan(mine_a, total_a, sums_a);
    double y = apply(excl_a, carry_a);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = t0 - i;
      if (t >= tile_start) {
        const bool valid = mask == nullptr || mask[t];
        const double v = values[t];
        y = apply(gae_step_map<double>(valid, rewards[t], v, next_v[i], gamma, lam), y);
        adv[t] = valid ? static_cast<float>(y) : 0.f;
        ret[t] = valid ? static_cast<float>(y + v) : 0.f;
      }
    }
    carry_a = apply(total_a, carry_a);
  }
}

void launch_gae(const at::Tensor& rewards, const at::Tensor& values, const bool* mask, const int64_t* cu,
                int64_t B, int64_t T, const c10::optional<at::Tensor>& last_values, double gamma, double lam,
                at::Tensor& adv, at::Tensor& ret, const char* op) {
  const float* last = check_last_values(last_values, B, rewards, op);
  if (B == 0 || rewards.numel() == 0) return;
  TORCH_CHECK(B <= 2147483647LL, "gae: too many sequences for one launch: ", B);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  gae_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      rewards.data_ptr<float>(), values.data_ptr<float>(), mask, cu, T, last, gamma, lam, adv.data_ptr<float>(),
      ret.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, const c10::optional<at::Tensor>& last_values,
                                            double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2, "gae: `rewards` must be [B, T], got ", rewards.sizes());
  RLHF_CHECK_SAME_SHAPE(rewards, values, "gae");
  RLHF_CHECK_SAME_SHAPE(rewards, mask, "gae");
  RLHF_CHECK_DTYPE(rewards, at::kFloat, "gae");
  RLHF_CHECK_DTYPE(values, at::kFloat, "gae");
  RLHF_CHECK_DTYPE(mask, at::kBool, "gae");
  RLHF_CHECK_CONTIG(rewards, "gae");
  RLHF_CHECK_CONTIG(values, "gae");
  RLHF_CHECK_CONTIG(mask, "gae");
  RLHF_CHECK_SAME_DEVICE(rewards, values, "gae");
  RLHF_CHECK_SAME_DEVICE(rewards, mask, "gae");
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  launch_gae(rewards, values, mask.data_ptr<bool>(), nullptr, rewards.size(0), rewards.size(1), last_values, gamma,
             lam, adv, ret, "gae");
  return {adv, ret};
}

// cu_seqlens is validated (0 .. N, non-decreasing) by the Python API, which may sync;
// the kernel itself never reads outside [cu_seqlens[b], cu_seqlens[b+1]).
std::tuple<at::Tensor, at::Tensor> gae_packed_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& cu_seqlens,
                                                   const c10::optional<at::Tensor>& last_values,
                                                   const c10::optional<at::Tensor>& mask, double gamma,
                                                   double lam) {
  TORCH_CHECK(rewards.dim() == 1, "gae_packed: `rewards` must be [N], got ", rewards.sizes());
  RLHF_CHECK_SAME_SHAPE(rewards, values, "gae_packed");
  RLHF_CHECK_DTYPE(rewards, at::kFloat, "gae_packed");
  RLHF_CHECK_DTYPE(values, at::kFloat, "gae_packed");
  RLHF_CHECK_DTYPE(cu_seqlens, at::kLong, "gae_packed");
  RLHF_CHECK_CONTIG(rewards, "gae_packed");
  RLHF_CHECK_CONTIG(values, "gae_packed");
  RLHF_CHECK_CONTIG(cu_seqlens, "gae_packed");
  RLHF_CHECK_SAME_DEVICE(rewards, values, "gae_packed");
  RLHF_CHECK_SAME_DEVICE(rewards, cu_seqlens, "gae_packed");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "gae_packed: `cu_seqlens` must be [B+1] with B >= 0, got ", cu_seqlens.sizes());
  const bool* m = nullptr;
  if (mask.has_value()) {
    RLHF_CHECK_SAME_SHAPE(rewards, (*mask), "gae_packed");
    RLHF_CHECK_DTYPE((*mask), at::kBool, "gae_packed");
    RLHF_CHECK_CONTIG((*mask), "gae_packed");
    RLHF_CHECK_SAME_DEVICE(rewards, (*mask), "gae_packed");
    m = mask->data_ptr<bool>();
  }
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  launch_gae(rewards, values, m, cu_seqlens.data_ptr<int64_t>(), cu_seqlens.size(0) - 1, 0, last_values, gamma, lam,
             adv, ret, "gae_packed");
  return {adv, ret};
}

// Whitening: one block computes mean and 1/std in float64 with a fixed
// reduction tree (deterministic, no atomics), then a grid-stride pass writes.
constexpr int kStatThreads = 1024;

template <typename T>
__device__ T block_sum(T v, T* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kStatThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const T r = smem[0];
  __syncthreads();
  return r;
}

// x: [n] float32, mask: [n] bool; stats: [3] float64 out = (mean, 1/std, value added back)
__global__ void __launch_bounds__(kStatThreads) whiten_stats_kernel(const float* __restrict__ x,
                                                                   const bool* __restrict__ mask, int64_t n,
                                                                   bool shift_mean, bool unbiased, double eps,
                                                                   double* __restrict__ stats) {
  __shared__ double smem[kStatThreads];
  double s = 0, k = 0;
  for (int64_t i = threadIdx.x; i < n; i += kStatThreads)
    if (mask[i]) { s += x[i]; k += 1; }
  const double sum = block_sum(s, smem), count = block_sum(k, smem);
  const double mean = count > 0 ? sum / count : 0.0;
  double q = 0;
  for (int64_t i = threadIdx.x; i < n; i += kStatThreads)
    if (mask[i]) { const double d = x[i] - mean; q += d * d; }
  const double sq = block_sum(q, smem);
  if (threadIdx.x == 0) {
    const double denom = unbiased ? count - 1 : count;
    const double var = denom > 0 ? sq / denom : 0.0;
    stats[0] = mean;
    stats[1] = 1.0 / sqrt(var + eps);
    stats[2] = shift_mean ? 0.0 : mean;
  }
}

__global__ void whiten_apply_kernel(const float* __restrict__ x, const bool* __restrict__ mask, int64_t n,
                                    const double* __restrict__ stats, float* __restrict__ out) {
  const double mean = stats[0], inv_std = stats[1], add_back = stats[2];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = mask[i] ? static_cast<float>((x[i] - mean) * inv_std + add_back) : 0.f;
}

at::Tensor masked_whiten_cuda(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased,
                              double eps) {
  RLHF_CHECK_SAME_SHAPE(x, mask, "masked_whiten");
  RLHF_CHECK_DTYPE(x, at::kFloat, "masked_whiten");
  RLHF_CHECK_DTYPE(mask, at::kBool, "masked_whiten");
  RLHF_CHECK_CONTIG(x, "masked_whiten");
  RLHF_CHECK_CONTIG(mask, "masked_whiten");
  RLHF_CHECK_SAME_DEVICE(x, mask, "masked_whiten");
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor stats = at::empty({3}, x.options().dtype(at::kDouble));
  whiten_stats_kernel<<<1, kStatThreads, 0, stream>>>(x.data_ptr<float>(), mask.data_ptr<bool>(), n, shift_mean,
                                                      unbiased, eps, stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  whiten_apply_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      x.data_ptr<float>(), mask.data_ptr<bool>(), n, stats.data_ptr<double>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("gae", &rlhf::gae_cuda);
  m.impl("gae_packed", &rlhf::gae_packed_cuda);
  m.impl("masked_whiten", &rlhf::masked_whiten_cuda);
}
