// The policy head (hidden states straight to the policy objective) on the CPU.
//
// The row chunks, the matmuls (MKL, float32: 16-bit inputs are upcast), the gradient
// accumulation, the loss and its statistics are the shared host code of
// rlhf/linear_policy_op.h; this file holds the epilogue it calls on each chunk's float32 logits
// [nr, V], row-major: each token's row (V floats, in L2) is read in L1-sized pieces by the
// vector helpers of the logprobs kernels (rlhf/cpu_softmax.h), tokens in parallel:
//   1. the row's softmax statistics (m, d, w) of s = (z + b) / T, piece by piece, merged
//      (softmax_stats_merge of rlhf/logprobs.h); then logp, H, the KL estimate and the
//      gradients g_logp, g_H (rlhf/linear_policy.h);
//   2. (with gradients) dlogits in place, plus the label's one-hot term.
// (A vocabulary-major tile, [V, nr], multiplies 10-20% faster in MKL at N = 1024, H = 512,
// V = 32000, but an epilogue that walks it 8 tokens at a time, a strided read of 32 bytes per
// vocabulary entry, took 0.27 s there against 0.06 s for this one, more than the products gained.)
// Masked tokens give 0 and a zero gradient row (their labels are never read); a label outside
// [0, V) at a valid token (when `validate` did not raise first) gives NaN logp and entropy and
// a zero gradient row. A token's result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "rlhf/cpu_softmax.h"  // before ppo.h (through linear_policy.h): silences -Wpsabi for its vector templates too
#include "rlhf/linear_policy.h"
#include "rlhf/linear_policy_op.h"
#include "rlhf/logprobs.h"

namespace rlhf {
namespace {

// Every token of a row-major chunk z [nr, V] (dz: its dlogits, may be z, or nullptr).
template <typename Lab>
void policy_rows(const float* z, float* dz, int64_t nr, const float* bias, int64_t V, float inv_t,
                 const Lab* labels, const PolicyHeadRows& t, const PolicyHeadArgs& a) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, nr, grain(V), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const float* zr = z + r * V;
      float* gr = dz ? dz + r * V : nullptr;
      if (!t.mask[r]) {
        t.logp[r] = t.entropy[r] = 0.f;
        if (t.kl) t.kl[r] = 0.f;
        if (gr) std::fill(gr, gr + V, 0.f);
        continue;
      }
      SoftmaxStats st = {-INFINITY, 0.f, 0.f};
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t k = std::min(kChunk, V - c);
        load_biased(zr + c, bias ? bias + c : nullptr, k, inv_t, buf);
        st = softmax_stats_merge(st, chunk_softmax_stats(buf, k, 1.f));
      }
      const int64_t y = static_cast<int64_t>(labels[r]);
      const bool in_vocab = y >= 0 && y < V;
      const float log_d = std::log(st.d);
      const float lp = in_vocab ? ((zr[y] + (bias ? bias[y] : 0.f)) * inv_t - st.m) - log_d : nan;
      const float h = in_vocab ? log_d - st.w / st.d : nan;
      const PolicyHeadToken tok = policy_head_token(lp, t.old_logp[r], t.adv[r], t.rollout ? t.rollout[r] : 0.f,
                                                    t.ref != nullptr, t.ref ? t.ref[r] : 0.f, t.weight[r],
                                                    t.policy_scale[r], a);
      t.logp[r] = lp;
      t.entropy[r] = h;
      if (t.kl) t.kl[r] = tok.kl;
      if (!gr) continue;
      if (!in_vocab) {
        std::fill(gr, gr + V, 0.f);
        continue;
      }
      for (int64_t c = 0; c < V; c += kChunk) {
        const int64_t k = std::min(kChunk, V - c);
        load_biased(zr + c, bias ? bias + c : nullptr, k, inv_t, buf);
        chunk_logprob_grad(buf, gr + c, k, 1.f, st.m, log_d, h, tok.g_logp, tok.g_entropy, inv_t);
      }
      gr[y] += tok.g_logp * inv_t;
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
  // chunks of 256 rows whatever N is (batch invariance, rlhf/linear_policy_op.h): MKL runs near its
  // full rate there, and a short batch pads at most 255 rows
  static constexpr int64_t kMaxRows = 256;

  // MKL multiplies float32 operands: 16-bit inputs are upcast (hidden and weight once per call).
  static at::Tensor operand(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }
  static void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
  static void addmm_f32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { acc.addmm_(a, b); }

  static void check_label_range(const at::Tensor& labels, const at::Tensor& mask, int64_t V, const char* op) {
    detail::check_masked_label_range(labels, mask, V, op);  // labels in host memory: no sync
  }

  // logits and dlogits: contiguous [nr, V] (dlogits float32, possibly the logits themselves)
  static void policy(const at::Tensor& logits, const at::Tensor& dlogits, const float* bias,
                     const PolicyHeadRows& rows, float inv_t, const PolicyHeadArgs& a) {
    TORCH_INTERNAL_ASSERT(logits.is_contiguous(), "the CPU epilogue reads row-major logits");
    TORCH_INTERNAL_ASSERT(!dlogits.defined() || (dlogits.scalar_type() == at::kFloat && dlogits.is_contiguous()),
                          "the CPU epilogue writes float32 row-major dlogits");
    with_labels(rows.labels, [&](auto* lab) {
      policy_rows(logits.data_ptr<float>(), dlogits.defined() ? dlogits.data_ptr<float>() : nullptr, logits.size(0),
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
