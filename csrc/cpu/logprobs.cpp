// Token log-probabilities, entropy and full-vocabulary KL on the CPU.
//
// Rows are independent and run in parallel (at::parallel_for). A row is walked in
// chunks of kChunk entries: each chunk is converted to float and scaled by 1/T into
// an L1-resident buffer, reduced by the vector helpers of rlhf/cpu_softmax.h, and
// merged into the row's running statistics (rlhf/logprobs.h).
// The forward reads the logits once; the backward reads them once and writes the
// gradient once, chunk by chunk, so writing over the logits (inplace) is safe.
// The result of a row does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "rlhf/cpu_softmax.h"
#include "rlhf/logprobs.h"
#include "rlhf/logprobs_checks.h"

namespace rlhf {
namespace {

// A chunk whose s (or r) is all -inf is measured against 0 instead of its max: its exps are
// then exactly 0 and its d (or d_r) is 0, which the merge treats as "nothing seen".
RLHF_CPU_CLONES KlStats chunk_kl_stats(const float* s, const float* r, int64_t n) {
  const float m = max_of(s, n), mr = max_of(r, n);
  const float ms = m == -INFINITY ? 0.f : m, mrs = mr == -INFINITY ? 0.f : mr;
  const VecF msv = splat<VecF>(ms), mrv = splat<VecF>(mrs), zero = splat<VecF>(0.f);
  VecF d = zero, w = zero, dr = zero;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF x = load8(s + i), y = load8(r + i);
    const VecF e = exp_nonpos(x - msv);
    d += e;
    w += e > zero ? e * (x - y) : zero;
    dr += exp_nonpos(y - mrv);
  }
  KlStats st = {m, lane_sum(d), lane_sum(w), mr, lane_sum(dr)};
  for (; i < n; ++i) kl_stats_add(st, s[i], r[i], exp_nonpos(s[i] - ms), exp_nonpos(r[i] - mrs));
  return st;
}

// In place: s_j -> dz_j = g dKL/ds_j / T (full_kl_grad of rlhf/logprobs.h, eight lanes at a time).
RLHF_CPU_CLONES void chunk_kl_grad(float* s, const float* r, int64_t n, const float* st, float kl, float g,
                                   float inv_t) {
  const float m = st[0], log_d = st[1], mr = st[2], log_dr = st[3];
  const VecF mv = splat<VecF>(m), ldv = splat<VecF>(log_d), mrv = splat<VecF>(mr), ldrv = splat<VecF>(log_dr);
  const VecF klv = splat<VecF>(kl), gv = splat<VecF>(g), itv = splat<VecF>(inv_t), zero = splat<VecF>(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF lp = (load8(s + i) - mv) - ldv, lq = (load8(r + i) - mrv) - ldrv, p = exp_nonpos(lp);
    const VecF d = p > zero ? gv * p * (lp - lq - klv) : zero;
    store8(s + i, d * itv);
  }
  for (; i < n; ++i) {
    const float lp = log_prob(s[i], m, log_d);
    s[i] = full_kl_grad(lp, log_prob(r[i], mr, log_dr), exp_nonpos(lp), g, kl) * inv_t;
  }
}

template <typename T, typename L>
void logprobs_forward_rows(const T* z, const L* labels, int64_t N, int64_t V, float inv_t, int64_t ignore_index,
                           float* logp, float* entropy, float* stats, BadLabel& bad) {
  at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t row = r0; row < r1; ++row) {
      const T* zr = z + row * V;
      SoftmaxStats st = softmax_stats_empty();
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        load_scaled(zr + c, n, inv_t, buf);
        st = softmax_stats_merge(st, chunk_softmax_stats(buf, n));
      }
      stats[2 * row] = st.m;
      stats[2 * row + 1] = logf(st.d);
      const float h = softmax_entropy(st);
      if (labels == nullptr) {
        entropy[row] = h;
        continue;
      }
      const int64_t y = static_cast<int64_t>(labels[row]);
      if (y == ignore_index) {
        logp[row] = 0.f;
        entropy[row] = 0.f;
      } else if (y < 0 || y >= V) {
        bad.note(row, y);
        logp[row] = NAN;
        entropy[row] = NAN;
      } else {
        logp[row] = softmax_logprob(st, static_cast<float>(zr[y]) * inv_t);
        entropy[row] = h;
      }
    }
  });
}

// grad may alias z (inplace): each chunk is read into the buffer before it is written.
template <typename T, typename L>
void logprobs_backward_rows(const T* z, const L* labels, const float* g_logp, const float* g_entropy,
                            const float* stats, const float* entropy, int64_t N, int64_t V, float inv_t,
                            int64_t ignore_index, T* grad) {
  at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t row = r0; row < r1; ++row) {
      const T* zr = z + row * V;
      T* gr = grad + row * V;
      int64_t y = -1;
      if (labels != nullptr) {
        y = static_cast<int64_t>(labels[row]);
        if (y == ignore_index || y < 0 || y >= V) {
          std::fill(gr, gr + V, static_cast<T>(0.f));
          continue;
        }
      }
      const float gl = g_logp ? g_logp[row] : 0.f, gh = g_entropy ? g_entropy[row] : 0.f;
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        load_scaled(zr + c, n, inv_t, buf);
        chunk_logprob_grad(buf, n, stats[2 * row], stats[2 * row + 1], entropy[row], gl, gh, inv_t);
        if (y >= c && y < c + n) buf[y - c] += gl * inv_t;
        store(buf, n, gr + c);
      }
    }
  });
}

template <typename T>
void full_kl_forward_rows(const T* z, const T* zr, int64_t N, int64_t V, float inv_t, float* kl, float* stats) {
  at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float bs[kChunk];
    alignas(64) float br[kChunk];
    for (int64_t row = r0; row < r1; ++row) {
      KlStats st = kl_stats_empty();
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        load_scaled(z + row * V + c, n, inv_t, bs);
        load_scaled(zr + row * V + c, n, inv_t, br);
        st = kl_stats_merge(st, chunk_kl_stats(bs, br, n));
      }
      kl[row] = kl_value(st);
      stats[4 * row] = st.m;
      stats[4 * row + 1] = logf(st.d);
      stats[4 * row + 2] = st.mr;
      stats[4 * row + 3] = logf(st.dr);
    }
  });
}

template <typename T>
void full_kl_backward_rows(const T* z, const T* zr, const float* g, const float* kl, const float* stats, int64_t N,
                           int64_t V, float inv_t, T* grad) {
  at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float bs[kChunk];
    alignas(64) float br[kChunk];
    for (int64_t row = r0; row < r1; ++row) {
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t n = std::min(kChunk, V - c);
        load_scaled(z + row * V + c, n, inv_t, bs);
        load_scaled(zr + row * V + c, n, inv_t, br);
        chunk_kl_grad(bs, br, n, stats + 4 * row, kl[row], g[row], inv_t);
        store(bs, n, grad + row * V + c);
      }
    }
  });
}


// ---- ops ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const c10::optional<at::Tensor>& labels,
                                                                double temperature, int64_t ignore_index,
                                                                const char* op) {
  check_logits(logits, op);
  if (labels.has_value()) check_labels(*labels, logits, op);
  const float inv_t = inverse_temperature(temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({labels.has_value() ? N : 0}, f32);
  at::Tensor entropy = at::empty({N}, f32), stats = at::empty({N, 2}, f32);
  if (N == 0) return {logp, entropy, stats};
  BadLabel bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_forward", [&] {
    with_labels(labels, [&](auto* lab) {
      logprobs_forward_rows(logits.data_ptr<scalar_t>(), lab, N, V, inv_t, ignore_index,
                            labels.has_value() ? logp.data_ptr<float>() : nullptr, entropy.data_ptr<float>(),
                            stats.data_ptr<float>(), bad);
    });
  });
  TORCH_CHECK(!bad.found.load(), op, ": `labels` must be in [0, V) = [0, ", V, ") or equal ignore_index = ",
              ignore_index, ", but labels[", bad.row.load(), "] = ", bad.value.load(), " (logits shape ",
              logits.sizes(), ")");
  return {logp, entropy, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& labels, double temperature,
                                                                      int64_t ignore_index) {
  return logprobs_forward(logits, labels, temperature, ignore_index, "token_logprobs");
}

std::tuple<at::Tensor, at::Tensor> token_entropy_fwd_cpu(const at::Tensor& logits, double temperature) {
  auto [logp, entropy, stats] = logprobs_forward(logits, c10::nullopt, temperature, 0, "token_entropy");
  return {entropy, stats};
}

void logprobs_backward_into(at::Tensor& grad, const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                            const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& stats, const at::Tensor& entropy, double temperature,
                            int64_t ignore_index) {
  const char* op = "token_logprobs backward";
  check_logits(logits, op);
  const float inv_t = check_logprobs_bwd_args(logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_backward", [&] {
    with_labels(labels, [&](auto* lab) {
      logprobs_backward_rows(logits.data_ptr<scalar_t>(), lab, opt_ptr(grad_logp), opt_ptr(grad_entropy),
                             stats.data_ptr<float>(), entropy.data_ptr<float>(), N, V, inv_t, ignore_index,
                             grad.data_ptr<scalar_t>());
    });
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                            const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& stats, const at::Tensor& entropy, double temperature,
                            int64_t ignore_index) {
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  logprobs_backward_into(grad, logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, ignore_index);
  return grad;
}

void logprobs_bwd_inplace_cpu(at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                              const c10::optional<at::Tensor>& grad_logp,
                              const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                              const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  logprobs_backward_into(logits, logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> full_kl_fwd_cpu(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                   double temperature) {
  const char* op = "full_kl";
  check_kl_pair(logits, ref_logits, op);
  const float inv_t = inverse_temperature(temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, f32), stats = at::empty({N, 4}, f32);
  if (N == 0) return {kl, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "full_kl_forward", [&] {
    full_kl_forward_rows(logits.data_ptr<scalar_t>(), ref_logits.data_ptr<scalar_t>(), N, V, inv_t,
                         kl.data_ptr<float>(), stats.data_ptr<float>());
  });
  return {kl, stats};
}

at::Tensor full_kl_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                           const at::Tensor& kl, const at::Tensor& stats, double temperature) {
  const char* op = "full_kl backward";
  const float inv_t = check_full_kl_bwd_args(grad_kl, logits, ref_logits, kl, stats, temperature, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (N == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "full_kl_backward", [&] {
    full_kl_backward_rows(logits.data_ptr<scalar_t>(), ref_logits.data_ptr<scalar_t>(), grad_kl.data_ptr<float>(),
                          kl.data_ptr<float>(), stats.data_ptr<float>(), N, V, inv_t,
                          grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &rlhf::token_logprobs_fwd_cpu);
  m.impl("token_entropy_fwd", &rlhf::token_entropy_fwd_cpu);
  m.impl("logprobs_bwd", &rlhf::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_inplace", &rlhf::logprobs_bwd_inplace_cpu);
  m.impl("full_kl_fwd", &rlhf::full_kl_fwd_cpu);
  m.impl("full_kl_bwd", &rlhf::full_kl_bwd_cpu);
}
