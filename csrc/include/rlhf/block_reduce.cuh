// Deterministic block-wide reductions for the CUDA kernels (.cu only): a fixed shuffle
// tree within each warp, then over the warps in order. No atomics, so the same inputs
// give bitwise the same result on every run.
#pragma once

namespace rlhf {

struct SumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct MinOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return fmin(a, b); }
};
struct MaxOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Every thread of the block gets the reduction of `v` over the block. blockDim.x must be a
// multiple of 32 (at most 1024); `buf` is __shared__ double[33].
template <typename Op>
__device__ double block_reduce(double v, double identity, Op op, double* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? buf[lane] : identity;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
    if (lane == 0) buf[32] = v;
  }
  __syncthreads();
  const double r = buf[32];
  __syncthreads();  // buf is reused by the next reduction
  return r;
}

__device__ __forceinline__ double block_sum(double v, double* buf) { return block_reduce(v, 0.0, SumOp(), buf); }

}  // namespace rlhf
