// Shared by the CPU (.cpp) and CUDA (.cu) kernels: no torch headers here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

// Per-element functions templated over a float type F (float, or on the host a GCC vector of
// floats: rlhf/ppo.h, rlhf/cpu_softmax.h) are always inlined on the host too, so that the CPU
// loops that call them see straight-line vector code.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define RLHF_HD_TOKEN RLHF_HD
#else
#define RLHF_HD_TOKEN inline __attribute__((always_inline))
#endif

// A loop over a fixed small range unrolled, so that CUDA keeps the arrays it indexes in registers
// (a runtime index would put them in local memory).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLHF_UNROLL _Pragma("unroll")
#else
#define RLHF_UNROLL _Pragma("GCC unroll 16")
#endif

namespace rlhf {

// x in every lane of F (F = float: x itself).
template <typename F>
RLHF_HD_TOKEN F splat(float x) {
  return F{} + x;
}

// An affine map x -> a*x + b. Reverse-time recurrences such as GAE,
// A_t = delta_t + c_t * A_{t+1}, are compositions of these maps, so a scan
// over them parallelises the recurrence.
template <typename T>
struct Affine {
  T a, b;
};

// outer ∘ inner: x -> outer.a * (inner.a * x + inner.b) + outer.b
template <typename T>
RLHF_HD Affine<T> compose(Affine<T> outer, Affine<T> inner) {
  return {outer.a * inner.a, outer.b + outer.a * inner.b};
}

template <typename T>
RLHF_HD T apply(Affine<T> f, T x) {
  return f.b + f.a * x;
}

}  // namespace rlhf
