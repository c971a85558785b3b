// Token log-probabilities, entropy and full-vocabulary KL on the CPU.
//
// Checks, allocation and dtype dispatch are the shared host code of rlhf/logprobs_op.h; this
// file holds the kernels and their launchers (struct CpuLogprobs).
// Rows are independent and run in parallel (at::parallel_for). A row is walked in
// chunks of kChunk entries, reduced by the vector helpers of rlhf/cpu_softmax.h (float32
// logits read in place and scaled by 1/T on the fly; 16-bit ones first converted into an
// L1-resident buffer), and merged into the row's running statistics (rlhf/logprobs.h).
// The forward reads the logits once; the backward reads them once and writes the
// gradient once, chunk by chunk, so writing over the logits (inplace) is safe.
// The result of a row does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "rlhf/cpu_softmax.h"
#include "rlhf/logprobs.h"
#include "rlhf/logprobs_op.h"

namespace rlhf {
namespace {

// KL statistics of s = src * scale and r = ref * scale (as chunk_softmax_stats). A chunk
// whose s (or r) has no finite entry is measured against 0 instead of its max: its exps are
// then 0 (or NaN, for a NaN entry) and its d (or d_r) is 0 (or NaN); the merge treats d == 0
// as "nothing seen".
RLHF_CPU_CLONES KlStats chunk_kl_stats(const float* src, const float* ref, int64_t n, float scale) {
  const float m = max_of(src, n) * scale, mr = max_of(ref, n) * scale;
  const float ms = m == -INFINITY ? 0.f : m, mrs = mr == -INFINITY ? 0.f : mr;
  const VecF msv = splat<VecF>(ms), mrv = splat<VecF>(mrs), sc = splat<VecF>(scale), zero = splat<VecF>(0.f);
  VecF d = zero, w = zero, dr = zero;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF x = load8(src + i) * sc, y = load8(ref + i) * sc;
    const VecF e = exp_nonpos(x - msv);
    d += e;
    w += e > zero ? e * (x - y) : zero;
    dr += exp_nonpos(y - mrv);
  }
  KlStats st = {m, lane_sum(d), lane_sum(w), mr, lane_sum(dr)};
  for (; i < n; ++i) {
    const float s = src[i] * scale, r = ref[i] * scale;
    kl_stats_add(st, s, r, exp_nonpos(s - ms), exp_nonpos(r - mrs));
  }
  return st;
}

// out_j = g dKL/ds_j / T of s = src * scale, r = ref * scale (full_kl_grad of rlhf/logprobs.h,
// eight lanes at a time); out may be src.
RLHF_CPU_CLONES void chunk_kl_grad(const float* src, const float* ref, float* out, int64_t n, float scale,
                                   const float* st, float kl, float g, float inv_t) {
  const float m = st[0], log_d = st[1], mr = st[2], log_dr = st[3];
  const VecF mv = splat<VecF>(m), ldv = splat<VecF>(log_d), mrv = splat<VecF>(mr), ldrv = splat<VecF>(log_dr);
  const VecF klv = splat<VecF>(kl), gv = splat<VecF>(g), itv = splat<VecF>(inv_t), zero = splat<VecF>(0.f);
  const VecF sc = splat<VecF>(scale);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VecF lp = (load8(src + i) * sc - mv) - ldv, lq = (load8(ref + i) * sc - mrv) - ldrv;
    const VecF p = exp_nonpos(lp);
    const VecF d = p != zero ? gv * p * (lp - lq - klv) : zero;  // p != 0: NaN stays NaN
    store8(out + i, d * itv);
  }
  for (; i < n; ++i) {
    const float lp = log_prob(src[i] * scale, m, log_d);
    out[i] = full_kl_grad(lp, log_prob(ref[i] * scale, mr, log_dr), exp_nonpos(lp), g, kl) * inv_t;
  }
}

// One row of token_logprobs / token_entropy: (m, log d) into stats, the entropy, and with
// labels the label's logp (0 and 0 when ignored; NaN and NaN for a label outside [0, V)).
template <typename T, typename L>
void logprobs_forward_row(const LogprobsFwdArgs<T, L>& a, int64_t row, float* buf) {
  const int64_t V = a.V;
  const T* zr = a.z + row * V;
  float scale;
  const int64_t n0 = std::min(kChunk, V);
  const float* s0 = scaled_chunk(zr, n0, a.inv_t, buf, scale);
  SoftmaxStats st = chunk_softmax_stats(s0, n0, scale);  // the first chunk needs no merge
  for (int64_t c = kChunk; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    const float* s = scaled_chunk(zr + c, n, a.inv_t, buf, scale);
    st = softmax_stats_merge(st, chunk_softmax_stats(s, n, scale));
  }
  const float log_d = logf(st.d);  // once: logf is not pure to the compiler (errno)
  a.stats[2 * row] = st.m;
  a.stats[2 * row + 1] = log_d;
  const float h = log_d - st.w / st.d;  // softmax_entropy
  if (a.labels == nullptr) {
    a.entropy[row] = h;
    return;
  }
  const int64_t y = static_cast<int64_t>(a.labels[row]);
  if (y == a.ignore_index) {
    a.logp[row] = 0.f;
    a.entropy[row] = 0.f;
  } else if (y < 0 || y >= V) {  // not validated (validate=False): NaN, no read
    a.logp[row] = NAN;
    a.entropy[row] = NAN;
  } else {
    a.logp[row] = log_prob(static_cast<float>(zr[y]) * a.inv_t, st.m, log_d);  // softmax_logprob
    a.entropy[row] = h;
  }
}

// One row of the backward; a.grad may alias a.z (inplace): each chunk is read before it is
// written (float32: by the same vector step; other dtypes: into the buffer first).
template <typename T, typename L>
void logprobs_backward_row(const LogprobsBwdArgs<T, L>& a, int64_t row, float* buf) {
  const int64_t V = a.V;
  const T* zr = a.z + row * V;
  T* gr = a.grad + row * V;
  int64_t y = -1;
  if (a.labels != nullptr) {
    y = static_cast<int64_t>(a.labels[row]);
    if (y == a.ignore_index || y < 0 || y >= V) {
      std::fill(gr, gr + V, static_cast<T>(0.f));
      return;
    }
  }
  const float gl = a.g_logp ? a.g_logp[row] : 0.f, gh = a.g_entropy ? a.g_entropy[row] : 0.f;
  const float m = a.stats[2 * row], log_d = a.stats[2 * row + 1], h = a.entropy[row];
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    float scale;
    const float* src = scaled_chunk(zr + c, n, a.inv_t, buf, scale);
    if constexpr (std::is_same_v<T, float>) {
      chunk_logprob_grad(src, gr + c, n, scale, m, log_d, h, gl, gh, a.inv_t);
      if (y >= c && y < c + n) gr[y] += gl * a.inv_t;
    } else {
      chunk_logprob_grad(src, buf, n, scale, m, log_d, h, gl, gh, a.inv_t);
      if (y >= c && y < c + n) buf[y - c] += gl * a.inv_t;
      store(buf, n, gr + c);
    }
  }
}

// The launchers of rlhf/logprobs_op.h: rows in parallel, each with its own chunk buffers.
struct CpuLogprobs {
  template <typename T, typename L>
  static void logprobs_forward(const LogprobsFwdArgs<T, L>& a, const at::Tensor&) {
    at::parallel_for(0, a.N, grain(a.V), [&](int64_t r0, int64_t r1) {
      alignas(64) float buf[kChunk];
      for (int64_t row = r0; row < r1; ++row) logprobs_forward_row(a, row, buf);
    });
  }

  template <typename T, typename L>
  static void logprobs_backward(const LogprobsBwdArgs<T, L>& a, const at::Tensor&) {
    at::parallel_for(0, a.N, grain(a.V), [&](int64_t r0, int64_t r1) {
      alignas(64) float buf[kChunk];
      for (int64_t row = r0; row < r1; ++row) logprobs_backward_row(a, row, buf);
    });
  }

  template <typename T>
  static void full_kl_forward(const FullKlFwdArgs<T>& a, const at::Tensor&) {
    const int64_t V = a.V;
    at::parallel_for(0, a.N, grain(V), [&](int64_t r0, int64_t r1) {
      alignas(64) float bs[kChunk];
      alignas(64) float br[kChunk];
      for (int64_t row = r0; row < r1; ++row) {
        KlStats st = kl_stats_empty();
        for (int64_t c = 0; c < V; c += kChunk) {
          const int64_t n = std::min(kChunk, V - c);
          float scale;
          const float* s = scaled_chunk(a.z + row * V + c, n, a.inv_t, bs, scale);
          const float* r = scaled_chunk(a.zr + row * V + c, n, a.inv_t, br, scale);
          st = kl_stats_merge(st, chunk_kl_stats(s, r, n, scale));
        }
        a.kl[row] = kl_value(st);
        a.stats[4 * row] = st.m;
        a.stats[4 * row + 1] = logf(st.d);
        a.stats[4 * row + 2] = st.mr;
        a.stats[4 * row + 3] = logf(st.dr);
      }
    });
  }

  template <typename T>
  static void full_kl_backward(const FullKlBwdArgs<T>& a, const at::Tensor&) {
    const int64_t V = a.V;
    at::parallel_for(0, a.N, grain(V), [&](int64_t r0, int64_t r1) {
      alignas(64) float bs[kChunk];
      alignas(64) float br[kChunk];
      for (int64_t row = r0; row < r1; ++row) {
        for (int64_t c = 0; c < V; c += kChunk) {
          const int64_t n = std::min(kChunk, V - c);
          float scale;
          const float* s = scaled_chunk(a.z + row * V + c, n, a.inv_t, bs, scale);
          const float* r = scaled_chunk(a.zr + row * V + c, n, a.inv_t, br, scale);
          T* out = a.grad + row * V + c;
          if constexpr (std::is_same_v<T, float>) {
            chunk_kl_grad(s, r, out, n, scale, a.stats + 4 * row, a.kl[row], a.g[row], a.inv_t);
          } else {
            chunk_kl_grad(s, r, bs, n, scale, a.stats + 4 * row, a.kl[row], a.g[row], a.inv_t);
            store(bs, n, out);
          }
        }
      }
    });
  }

  static void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
    rlhf::check_label_range(labels, V, ignore_index, op);  // labels in host memory: no sync
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &rlhf::token_logprobs_forward<rlhf::CpuLogprobs>);
  m.impl("token_entropy_fwd", &rlhf::token_entropy_forward<rlhf::CpuLogprobs>);
  m.impl("logprobs_bwd", &rlhf::logprobs_backward<rlhf::CpuLogprobs>);
  m.impl("logprobs_bwd_inplace", &rlhf::logprobs_backward_inplace<rlhf::CpuLogprobs>);
  m.impl("full_kl_fwd", &rlhf::full_kl_forward<rlhf::CpuLogprobs>);
  m.impl("full_kl_bwd", &rlhf::full_kl_backward<rlhf::CpuLogprobs>);
}
