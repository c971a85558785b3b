// GAE, packed GAE and masked whitening on the CPU.
// Rows (sequences) are independent, so they run in parallel (at::parallel_for,
// OpenMP in PyTorch's builds); within a row the reverse recurrence runs in
// float64, which keeps gamma*lam = 1 over 128k steps within 1e-6 of exact.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "rlhf/gae.h"
#include "rlhf/gae_op.h"

namespace rlhf {
namespace {

// One sequence of n steps; arrays already offset to the sequence start.
void gae_row(const float* r, const float* v, const bool* m, int64_t n, double last_value, double gamma,
             double lam, float* adv, float* ret) {
  double next_value = last_value;  // value of the next unmasked step
  double carry = 0.0;              // advantage of the next unmasked step
  for (int64_t t = n - 1; t >= 0; --t) {
    const bool valid = m == nullptr || m[t];
    const Affine<double> f = gae_step_map<double>(valid, r[t], v[t], next_value, gamma, lam);
    carry = apply(f, carry);
    adv[t] = valid ? static_cast<float>(carry) : 0.f;
    ret[t] = valid ? static_cast<float>(carry + v[t]) : 0.f;
    next_value = apply(next_value_map<double>(valid, v[t]), next_value);
  }
}

// cu_seqlens live in host memory here, so they are always checked (no sync to avoid).
void check_cu_seqlens(const int64_t* cu, int64_t B, int64_t N) {
  const char* op = "gae_packed";
  TORCH_CHECK_VALUE(cu[0] == 0 && cu[B] == N, op, ": `cu_seqlens` must start at 0 and end at N=", N,
                    " (len(rewards)), got ", cu[0], " ... ", cu[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(cu[b] <= cu[b + 1], op, ": `cu_seqlens` must be non-decreasing, but cu_seqlens[", b, "]=",
                      cu[b], " > cu_seqlens[", b + 1, "]=", cu[b + 1]);
}

// Whitening statistics in float64 over fixed-size chunks summed in a fixed
// order, so the result does not depend on the number of threads.
void whiten(const WhitenArgs& a) {
  const int64_t n = a.n;
  const float* px = a.x;
  const bool* pm = a.mask;
  float* po = a.out;
  const bool shift_mean = a.shift_mean, unbiased = a.unbiased;
  const double eps = a.eps;
  constexpr int64_t kChunk = 16384;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part_sum(chunks), part_cnt(chunks), part_sq(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0, k = 0;
      for (int64_t i = c * kChunk, e = std::min(n, i + kChunk); i < e; ++i)
        if (pm[i]) { s += px[i]; k += 1; }
      part_sum[c] = s;
      part_cnt[c] = k;
    }
  });
  double sum = 0, count = 0;
  for (int64_t c = 0; c < chunks; ++c) { sum += part_sum[c]; count += part_cnt[c]; }
  const double mean = count > 0 ? sum / count : 0.0;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double q = 0;
      for (int64_t i = c * kChunk, e = std::min(n, i + kChunk); i < e; ++i)
        if (pm[i]) { const double d = px[i] - mean; q += d * d; }
      part_sq[c] = q;
    }
  });
  double sq = 0;
  for (int64_t c = 0; c < chunks; ++c) sq += part_sq[c];
  const double denom = unbiased ? count - 1 : count;
  const double var = denom > 0 ? sq / denom : 0.0;
  const double inv_std = 1.0 / std::sqrt(var + eps);
  const double add_back = shift_mean ? 0.0 : mean;
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      po[i] = pm[i] ? static_cast<float>((px[i] - mean) * inv_std + add_back) : 0.f;
  });
}


// The device launchers of rlhf/gae_op.h (which checks, converts and allocates).
struct CpuGae {
  static void gae(const GaeArgs& a, const at::Tensor&) {
    if (a.cu_seqlens) check_cu_seqlens(a.cu_seqlens, a.B, a.N);
    at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = a.cu_seqlens ? a.cu_seqlens[b] : b * a.T;
        const int64_t e = a.cu_seqlens ? a.cu_seqlens[b + 1] : s + a.T;
        gae_row(a.rewards + s, a.values + s, a.mask ? a.mask + s : nullptr, e - s,
                a.last_values ? a.last_values[b] : 0.0, a.gamma, a.lam, a.adv + s, a.ret + s);
      }
    });
  }

  static void masked_whiten(const WhitenArgs& a, const at::Tensor&) { whiten(a); }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("gae", &rlhf::gae_forward<rlhf::CpuGae>);
  m.impl("gae_packed", &rlhf::gae_packed_forward<rlhf::CpuGae>);
  m.impl("masked_whiten", &rlhf::masked_whiten_forward<rlhf::CpuGae>);
}
