// Shared by the CPU (.cpp) and CUDA (.cu) kernels: no torch headers here.
#pragma once
#include <math.h>

#include <type_traits>

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

// min/max: fminf/fmaxf on the device; plain selects on the host (fminf's NaN rules
// make GCC emit calls and branches, which stop the CPU loops from vectorizing).
template <typename F>
RLHF_HD_TOKEN F min_f32(F a, F b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}

template <typename F>
RLHF_HD_TOKEN F max_f32(F a, F b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}

// The int32 type with F's lanes (F a GCC float vector: comparisons give exactly that).
template <typename F>
struct lane_int {
  using type = decltype(F{} < F{});
};
template <>
struct lane_int<float> {
  using type = int;
};

// static_cast, lane by lane (float <-> int32 truncates toward zero, like the scalar cast).
template <typename To, typename From>
RLHF_HD_TOKEN To convert_lanes(From x) {
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
  return static_cast<To>(x);
#else
  if constexpr (std::is_arithmetic_v<From>) {
    return static_cast<To>(x);
  } else {
    return __builtin_convertvector(x, To);
  }
#endif
}

// exp(x) for float32. On the device: expf. On the host: a branch-free Cephes-style
// polynomial (within 2 ulp of expf; inf above 88.72, 0 below -103.9, NaN stays NaN), so the
// CPU loops that call it vectorize; glibc's expf is a scalar call.
template <typename F>
RLHF_HD_TOKEN F exp_f32(F x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  using I = typename lane_int<F>::type;
  const F xc = min_f32(max_f32(x, splat<F>(-103.9f)), splat<F>(88.7228f));
  const F kf = xc * 1.44269504088896341f + (xc >= 0.f ? splat<F>(0.5f) : splat<F>(-0.5f));
  const I k = convert_lanes<I>(kf);  // round to nearest: truncation of x/ln2 +- 0.5
  const F fk = convert_lanes<F>(k);
  const F r = (xc - fk * 0.693359375f) - fk * -2.12194440e-4f;  // x - k*ln2 in two parts
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^k in two factors so that k in [-150, 128] never leaves the float exponent range
  const I k1 = k / 2, k2 = k - k1;
  const F y = p * __builtin_bit_cast(F, (k1 + 127) << 23) * __builtin_bit_cast(F, (k2 + 127) << 23);
  return x != x ? x : (x > 88.7228f ? splat<F>(INFINITY) : (x < -103.9f ? splat<F>(0.f) : y));
#endif
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
