// Fused LM head + token log-probabilities + entropy on the CPU.
//
// The tiling, the matmuls (MKL, float32: 16-bit inputs are upcast) and the gradient
// accumulation are the shared host code of rlhf/linear_logprobs_op.h; this file holds the two
// epilogues it calls on each [nr, n] float32 tile of logits, rows in parallel
// (at::parallel_for), each row's segment walked in L1-sized chunks (bias added, scaled by
// 1/T) by the vector helpers of rlhf/cpu_softmax.h:
//   fold: merge the segment's (m, d, w) into the row's running statistics and pick up the
//         label's logit when it falls in the segment;
//   grad: overwrite the segment with dlogits (rlhf/logprobs.h: logprob_entropy_grad plus
//         the label's one-hot term), zero on ignored rows and rows whose label is outside [0, V).
// A row's result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "rlhf/cpu_softmax.h"
#include "rlhf/linear_logprobs_op.h"
#include "rlhf/logprobs.h"

namespace rlhf {
namespace {

// s = (z + b) * inv_t for one chunk (b == nullptr: no bias).
template <typename L>
void fold_rows(const float* z, const float* bias, const L* labels, int64_t nr, int64_t n, int64_t c0, float inv_t,
               float* running) {
  at::parallel_for(0, nr, grain(n), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t row = r0; row < r1; ++row) {
      const float* zr = z + row * n;
      float* run = running + 4 * row;
      SoftmaxStats st = {run[0], run[1], run[2]};
      for (int64_t c = 0; c < n; c += kChunk) {
        const int64_t k = std::min(kChunk, n - c);
        load_biased(zr + c, bias ? bias + c : nullptr, k, inv_t, buf);
        st = softmax_stats_merge(st, chunk_softmax_stats(buf, k, 1.f));
      }
      run[0] = st.m;
      run[1] = st.d;
      run[2] = st.w;
      const int64_t y = static_cast<int64_t>(labels[row]) - c0;
      if (y >= 0 && y < n) run[3] = (zr[y] + (bias ? bias[y] : 0.f)) * inv_t;
    }
  });
}

// dz may alias z: each chunk is read into the buffer before it is written.
template <typename L>
void grad_rows(const float* z, float* dz, const float* bias, const L* labels, int64_t nr, int64_t n, int64_t c0,
               int64_t V, float inv_t, int64_t ignore_index, const float* stats, const float* entropy,
               const float* g_logp, const float* g_entropy) {
  at::parallel_for(0, nr, grain(n), [&](int64_t r0, int64_t r1) {
    alignas(64) float buf[kChunk];
    for (int64_t row = r0; row < r1; ++row) {
      const float* zr = z + row * n;
      float* gr = dz + row * n;
      const int64_t label = static_cast<int64_t>(labels[row]);
      if (label == ignore_index || label < 0 || label >= V) {
        std::fill(gr, gr + n, 0.f);
        continue;
      }
      const int64_t y = label - c0;
      const float gl = g_logp ? g_logp[row] : 0.f, gh = g_entropy ? g_entropy[row] : 0.f;
      for (int64_t c = 0; c < n; c += kChunk) {
        const int64_t k = std::min(kChunk, n - c);
        load_biased(zr + c, bias ? bias + c : nullptr, k, inv_t, buf);
        chunk_logprob_grad(buf, buf, k, 1.f, stats[2 * row], stats[2 * row + 1], entropy[row], gl, gh, inv_t);
        if (y >= c && y < c + k) buf[y - c] += gl * inv_t;
        std::copy(buf, buf + k, gr + c);
      }
    }
  });
}

struct CpuEpilogue {
  static constexpr int64_t kDefaultTileBytes = int64_t{2} << 20;  // 2 MiB of float32 logits per tile: L2-sized
  // token blocks of 256 rows whatever N is (batch invariance, rlhf/linear_logprobs_op.h)
  static constexpr int64_t kMaxRows = 256;

  // MKL multiplies float32 operands: 16-bit inputs are upcast (hidden once, weight per tile).
  static at::Tensor operand(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }
  // std::log per row, as the policy head's CPU epilogue (csrc/cpu/linear_policy.cpp) takes it: ATen's
  // vectorized log differs from it by an ulp on some values, which would make a trainer's first
  // PPO ratio differ from 1 when old log-probs come from this op and new ones from linear_policy_loss
  static at::Tensor log(const at::Tensor& d) {
    at::Tensor out = at::empty({d.size(0)}, d.options());
    const float* src = d.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t stride = d.stride(0);
    at::parallel_for(0, d.size(0), 4096, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dst[r] = std::log(src[r * stride]);
    });
    return out;
  }
  static void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
  static void addmm_f32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { acc.addmm_(a, b); }

  static void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
    rlhf::check_label_range(labels, V, ignore_index, op);  // labels in host memory: no sync
  }

  static void fold(const at::Tensor& logits, const float* bias, const at::Tensor& labels, int64_t c0, float inv_t,
                   const at::Tensor& running) {
    with_labels(labels, [&](auto* lab) {
      fold_rows(logits.data_ptr<float>(), bias, lab, logits.size(0), logits.size(1), c0, inv_t,
                running.data_ptr<float>());
    });
  }

  static void grad(const at::Tensor& logits, at::Tensor& dlogits, const float* bias, const at::Tensor& labels,
                   int64_t c0, int64_t V, float inv_t, int64_t ignore_index, const at::Tensor& stats,
                   const at::Tensor& entropy, const at::Tensor& g_logp, const at::Tensor& g_entropy) {
    TORCH_INTERNAL_ASSERT(dlogits.scalar_type() == at::kFloat, "the CPU epilogue writes float32");
    with_labels(labels, [&](auto* lab) {
      grad_rows(logits.data_ptr<float>(), dlogits.data_ptr<float>(), bias, lab, logits.size(0), logits.size(1), c0, V,
                inv_t, ignore_index, stats.data_ptr<float>(), entropy.data_ptr<float>(), ptr_or_null(g_logp),
                ptr_or_null(g_entropy));
    });
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("linear_logprobs_fwd", &rlhf::linear_logprobs_forward<rlhf::CpuEpilogue>);
  m.impl("linear_logprobs_bwd", &rlhf::linear_logprobs_backward<rlhf::CpuEpilogue>);
}
