// The policy head (hidden states straight to the PPO policy objective) on the CPU.
//
// The row chunks, the matmuls (MKL, float32: 16-bit inputs are upcast), the gradient
// accumulation, the loss and its statistics are the shared host code of
// rlhf/linear_policy_op.h; this file holds the epilogue it calls on each chunk's float32 logits,
// stored vocabulary-major ([V, nr]: MKL's fastest layout for these products at a few hundred
// rows). So the epilogue takes 8 tokens at a time, one per lane of an 8-float vector
// (rlhf/cpu_vec.h; blocks in parallel, the last nr % 8 tokens one by one), each vocabulary row
// of the chunk giving 8 consecutive floats, in three passes over the vocabulary:
//   1. the max of each token's scaled logits s = (z + b) / T;
//   2. d = sum exp(s - m) and w = sum exp(s - m) (s - m) (the vectorized exp_f32 of rlhf/ppo.h),
//      then per token logp, H, the KL estimate and the gradients g_logp,
//      g_H (rlhf/linear_policy.h);
//   3. (with gradients) dlogits in place, plus the label's one-hot term.
// Masked tokens give 0 and a zero gradient (their labels are never read); a label outside
// [0, V) at a valid token (when `validate` did not raise first) gives NaN logp and entropy and
// a zero gradient. A token's result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "rlhf/cpu_vec.h"  // before ppo.h (through linear_policy.h): silences -Wpsabi for its vector templates too
#include "rlhf/linear_policy.h"
#include "rlhf/linear_policy_op.h"

namespace rlhf {
namespace {

// F's lanes from / to consecutive floats (F = float: one).
template <typename F>
__attribute__((always_inline)) inline F load_lanes(const float* p) {
  F x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

template <typename F>
__attribute__((always_inline)) inline void store_lanes(float* p, F x) {
  std::memcpy(p, &x, sizeof x);
}

template <typename F>
__attribute__((always_inline)) inline F lanes_from(const float* a) {
  return load_lanes<F>(a);
}

// The tokens c0 .. c0 + L - 1 (L = the lanes of F: 8 for VecF, 1 for float) of a vocabulary-major
// chunk, z[v * ld + c] = the logit of token c for vocabulary entry v, one token per lane:
//   1. the max of each lane over the vocabulary;
//   2. d = sum exp(s - m), w = sum exp(s - m) (s - m) (softmax_stats_add of rlhf/logprobs.h);
//   then per token: logp, H, the KL estimate and g_logp, g_H (rlhf/linear_policy.h);
//   3. (with gradients) dz = [g_logp (onehot(y) - p) - g_H p (log p + H)] / T over the
//      vocabulary, in place (dz may be z), plus the one-hot term.
// Lanes of masked tokens give 0 and a zero gradient (their labels are never read); a label
// outside [0, V) gives NaN logp and entropy and a zero gradient.
constexpr int64_t kBlock = 256;  // vocabulary entries per float32 partial sum

template <typename F, typename Lab>
RLHF_CPU_CLONES void policy_lanes(const float* z, float* dz, int64_t ld, int64_t c0, const float* bias, int64_t V,
                                  float inv_t, const Lab* labels, const PolicyHeadRows& t, const PolicyHeadArgs& a) {
  constexpr int L = sizeof(F) / sizeof(float);
  const float* zc = z + c0;
  float* gc = dz ? dz + c0 : nullptr;
  const F it = splat<F>(inv_t), zero = splat<F>(0.f), ninf = splat<F>(-INFINITY);
  const auto scaled = [&](int64_t v) __attribute__((always_inline)) {
    return (load_lanes<F>(zc + v * ld) + (bias ? bias[v] : 0.f)) * it;
  };
  bool any = false;
  for (int j = 0; j < L; ++j) any = any || t.mask[c0 + j];
  if (!any) {
    for (int j = 0; j < L; ++j) {
      t.logp[c0 + j] = t.entropy[c0 + j] = 0.f;
      if (t.kl) t.kl[c0 + j] = 0.f;
    }
    if (gc)
      for (int64_t v = 0; v < V; ++v) store_lanes<F>(gc + v * ld, zero);
    return;
  }
  F mx = ninf;
  for (int64_t v = 0; v < V; ++v) {
    const F s = scaled(v);
    mx = s > mx ? s : mx;  // NaN never wins: it shows up in its exp below
  }
  const F ms = mx == ninf ? zero : mx;  // a lane without a finite entry: its exps are 0 (or NaN)
  // float32 sums over blocks of kBlock entries, added up in float64: a row of V = 262144 then
  // keeps its d and w as accurate as the row-major kernels' (whose vector lanes split the sums)
  double d_[L] = {}, w_[L] = {};
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    F d = zero, w = zero;
    for (int64_t v = v0; v < std::min(V, v0 + kBlock); ++v) {
      const F x = scaled(v) - ms, e = exp_f32(x);
      d += e;
      w += e > zero ? e * x : zero;
    }
    alignas(32) float db[L], wb[L];
    store_lanes<F>(db, d);
    store_lanes<F>(wb, w);
    for (int j = 0; j < L; ++j) {
      d_[j] += db[j];
      w_[j] += wb[j];
    }
  }
  alignas(32) float m_[L], log_d[L], h_[L], gl[L], gh[L], keep[L];
  store_lanes<F>(m_, mx);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int j = 0; j < L; ++j) {
    const int64_t r = c0 + j;
    log_d[j] = h_[j] = gl[j] = gh[j] = keep[j] = 0.f;
    if (!t.mask[r]) {
      t.logp[r] = t.entropy[r] = 0.f;
      if (t.kl) t.kl[r] = 0.f;
      continue;
    }
    const int64_t y = static_cast<int64_t>(labels[r]);
    const bool in_vocab = y >= 0 && y < V;
    log_d[j] = static_cast<float>(std::log(d_[j]));
    const float lp = in_vocab ? ((zc[y * ld + j] + (bias ? bias[y] : 0.f)) * inv_t - m_[j]) - log_d[j] : nan;
    h_[j] = in_vocab ? static_cast<float>(std::log(d_[j]) - w_[j] / d_[j]) : nan;
    const PolicyHeadToken tok = policy_head_token(lp, t.old_logp[r], t.adv[r], t.rollout ? t.rollout[r] : 0.f,
                                                  t.ref != nullptr, t.ref ? t.ref[r] : 0.f, t.weight[r],
                                                  t.policy_scale[r], a);
    t.logp[r] = lp;
    t.entropy[r] = h_[j];
    if (t.kl) t.kl[r] = tok.kl;
    gl[j] = tok.g_logp;
    gh[j] = tok.g_entropy;
    keep[j] = in_vocab ? 1.f : 0.f;
  }
  if (!gc) return;
  const F ldv = lanes_from<F>(log_d), hv = lanes_from<F>(h_), glv = lanes_from<F>(gl), ghv = lanes_from<F>(gh);
  const auto kept = lanes_from<F>(keep) != zero;
  for (int64_t v = 0; v < V; ++v) {
    const F lp = (scaled(v) - ms) - ldv, p = exp_f32(lp);
    const F g = p != zero ? -p * (glv + ghv * (lp + hv)) : zero;  // p != 0: NaN stays NaN
    store_lanes<F>(gc + v * ld, kept ? g * it : zero);
  }
  for (int j = 0; j < L; ++j)
    if (keep[j] != 0.f) gc[static_cast<int64_t>(labels[c0 + j]) * ld + j] += gl[j] * inv_t;
}

// Every token of a vocabulary-major chunk [V, nr] (ld = nr): blocks of 8 tokens in parallel,
// the last nr % 8 one by one.
template <typename Lab>
void policy_chunk(const float* z, float* dz, int64_t nr, const float* bias, int64_t V, float inv_t,
                  const Lab* labels, const PolicyHeadRows& t, const PolicyHeadArgs& a) {
  const int64_t full = nr / kW, tasks = full + nr % kW;
  at::parallel_for(0, tasks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b < full) {
        policy_lanes<VecF>(z, dz, nr, b * kW, bias, V, inv_t, labels, t, a);
      } else {
        policy_lanes<float>(z, dz, nr, full * kW + (b - full), bias, V, inv_t, labels, t, a);
      }
    }
  });
}

struct CpuEpilogue {
  // float32 logits of a chunk: 256 rows at V = 32000; about 5% of the unfused eager path's
  // extra memory at the benchmark's shape (benchmarks/bench_policy_head.py), and wide enough
  // for MKL to run the three products near its full rate
  static constexpr int64_t kDefaultBufferBytes = int64_t{32} << 20;
  // the products are float32: 16-bit inputs always need the float32 d_weight accumulator, and it
  // is not taken from the buffer's budget
  static constexpr int64_t kAccumulatorBytes = 0;
  // MKL runs the three products of a chunk of a few hundred rows about 10% faster with the logits
  // stored [V, rows] than [rows, V] (measured at N = 1024, H = 512, V = 32000, 256 rows)
  static constexpr bool kVocabMajor = true;

  // MKL multiplies float32 operands: 16-bit inputs are upcast (hidden and weight once per call).
  static at::Tensor operand(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }
  static void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
  static void addmm_f32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { acc.addmm_(a, b); }

  static void check_label_range(const at::Tensor& labels, const at::Tensor& mask, int64_t V, const char* op) {
    detail::check_masked_label_range(labels, mask, V, op);  // labels in host memory: no sync
  }

  // logits and dlogits: [nr, V] transposed views of contiguous [V, nr] buffers (kVocabMajor)
  static void policy(const at::Tensor& logits, const at::Tensor& dlogits, const float* bias,
                     const PolicyHeadRows& rows, float inv_t, const PolicyHeadArgs& a) {
    TORCH_INTERNAL_ASSERT(logits.t().is_contiguous(), "the CPU epilogue reads vocabulary-major logits");
    TORCH_INTERNAL_ASSERT(!dlogits.defined() || (dlogits.scalar_type() == at::kFloat && dlogits.t().is_contiguous()),
                          "the CPU epilogue writes float32 vocabulary-major dlogits");
    with_labels(rows.labels, [&](auto* lab) {
      policy_chunk(logits.data_ptr<float>(), dlogits.defined() ? dlogits.data_ptr<float>() : nullptr, logits.size(0),
                   bias, logits.size(1), inv_t, lab, rows, a);
    });
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("linear_policy_fwd", &rlhf::linear_policy_forward<rlhf::CpuEpilogue>);
  m.impl("linear_policy_fwd_grad", &rlhf::linear_policy_forward_grad<rlhf::CpuEpilogue>);
}
