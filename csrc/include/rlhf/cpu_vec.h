// The CPU kernels' explicit vectors: 8 float lanes (GCC vector extensions: one AVX2 register,
// two SSE registers in the baseline build), and the AVX2 clone of the hot loops chosen at load
// time by CPU feature. Used by csrc/cpu/ppo.cpp and rlhf/cpu_softmax.h (the logprobs families).
#pragma once
#include <cstdint>

// The helpers taking vectors are always inlined, so the -Wpsabi note about passing 32-byte
// vectors by value is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

// The build targets baseline x86-64; hot loops get an AVX2 clone picked at load time by CPU
// feature. Not "arch=haswell": that clone is picked by CPU model, so AMD never gets it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLHF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RLHF_CPU_CLONES
#endif

namespace rlhf {
namespace {

typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
constexpr int kW = 8;  // lanes per vector

}  // namespace
}  // namespace rlhf
