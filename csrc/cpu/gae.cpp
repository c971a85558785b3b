// GAE, packed GAE and masked whitening on the CPU.
// Rows (sequences) are independent, so they run in parallel (at::parallel_for,
// OpenMP in PyTorch's builds); within a row the reverse recurrence runs in
// float64, which keeps gamma*lam = 1 over 128k steps within 1e-6 of exact.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "rlhf/checks.h"
#include "rlhf/gae.h"

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

// Rows b in [0, B): row b spans [start(b), end(b)) of the flat arrays.
template <typename Bounds>
void gae_rows(const at::Tensor& rewards, const at::Tensor& values, const bool* m, const float* last, int64_t B,
              Bounds bounds, double gamma, double lam, at::Tensor& adv, at::Tensor& ret) {
  const float* r = rewards.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* a = adv.data_ptr<float>();
  float* o = ret.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t s, e;
      bounds(b, s, e);
      gae_row(r + s, v + s, m ? m + s : nullptr, e - s, last ? last[b] : 0.0, gamma, lam, a + s, o + s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
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
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const float* last = check_last_values(last_values, B, rewards, "gae");
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  if (rewards.numel() == 0) return {adv, ret};
  gae_rows(rewards, values, mask.data_ptr<bool>(), last, B,
           [T](int64_t b, int64_t& s, int64_t& e) { s = b * T; e = s + T; }, gamma, lam, adv, ret);
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_packed_cpu(const at::Tensor& rewards, const at::Tensor& values,
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
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "gae_packed: `cu_seqlens` must be [B+1] with B >= 0, got ", cu_seqlens.sizes());
  const int64_t B = cu_seqlens.size(0) - 1, N = rewards.size(0);
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK(cu[0] == 0 && cu[B] == N, "gae_packed: `cu_seqlens` must start at 0 and end at N=", N, ", got ",
              cu[0], " ... ", cu[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(cu[b] <= cu[b + 1], "gae_packed: `cu_seqlens` must be non-decreasing, but cu_seqlens[", b,
                "]=", cu[b], " > cu_seqlens[", b + 1, "]=", cu[b + 1]);
  const bool* m = nullptr;
  if (mask.has_value()) {
    RLHF_CHECK_SAME_SHAPE(rewards, (*mask), "gae_packed");
    RLHF_CHECK_DTYPE((*mask), at::kBool, "gae_packed");
    RLHF_CHECK_CONTIG((*mask), "gae_packed");
    m = mask->data_ptr<bool>();
  }
  const float* last = check_last_values(last_values, B, rewards, "gae_packed");
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  if (N == 0) return {adv, ret};
  gae_rows(rewards, values, m, last, B, [cu](int64_t b, int64_t& s, int64_t& e) { s = cu[b]; e = cu[b + 1]; },
           gamma, lam, adv, ret);
  return {adv, ret};
}

// Whitening statistics in float64 over fixed-size chunks summed in a fixed
// order, so the result does not depend on the number of threads.
at::Tensor masked_whiten_cpu(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased,
                             double eps) {
  RLHF_CHECK_SAME_SHAPE(x, mask, "masked_whiten");
  RLHF_CHECK_DTYPE(x, at::kFloat, "masked_whiten");
  RLHF_CHECK_DTYPE(mask, at::kBool, "masked_whiten");
  RLHF_CHECK_CONTIG(x, "masked_whiten");
  RLHF_CHECK_CONTIG(mask, "masked_whiten");
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const float* px = x.data_ptr<float>();
  const bool* pm = mask.data_ptr<bool>();
  float* po = out.data_ptr<float>();
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
  return out;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("gae", &rlhf::gae_cpu);
  m.impl("gae_packed", &rlhf::gae_packed_cpu);
  m.impl("masked_whiten", &rlhf::masked_whiten_cpu);
}
