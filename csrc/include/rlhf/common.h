// Shared by the CPU (.cpp) and CUDA (.cu) kernels: no torch headers here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

namespace rlhf {

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
