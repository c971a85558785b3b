// Bradley-Terry and all-pairs ranking losses on the CPU.
// Reductions run over fixed-size chunks (BT) or rows (ranking) in parallel, each
// leaving float64 partials that are combined in order: thread-count independent.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rlhf/bt.h"
#include "rlhf/bt_op.h"

namespace rlhf {
namespace {

constexpr int64_t kChunk = 4096;

int64_t prompt_grain(int64_t K) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(K * K, 1)); }

// The device launchers of rlhf/bt_op.h (which checks, converts and allocates).
struct CpuBT {
  static void bt_forward(const PairArgs& a, const LossOutputs& out, const at::Tensor&) {
    const int64_t P = a.P;
    const float *c = a.chosen, *r = a.rejected, *mg = a.margin;
    const int64_t chunks = (P + kChunk - 1) / kChunk;
    // per chunk: pair loss, centering term, correct pairs, margin sum
    std::vector<double> part(4 * chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t k = c0; k < c1; ++k) {
        double l = 0, sq = 0, acc = 0, mar = 0;
        for (int64_t i = k * kChunk, e = std::min(P, i + kChunk); i < e; ++i) {
          const float diff = c[i] - r[i];
          l += bt_pair_loss(mg ? diff - mg[i] : diff, a.label_smoothing);
          const float s = c[i] + r[i];
          sq += static_cast<double>(s) * s;
          acc += c[i] > r[i] ? 1 : 0;
          mar += diff;
        }
        part[4 * k] = l;
        part[4 * k + 1] = sq;
        part[4 * k + 2] = acc;
        part[4 * k + 3] = mar;
      }
    });
    double l = 0, sq = 0, acc = 0, mar = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      l += part[4 * k];
      sq += part[4 * k + 1];
      acc += part[4 * k + 2];
      mar += part[4 * k + 3];
    }
    const double n = std::max<double>(static_cast<double>(P), 1.0);
    *out.loss = static_cast<float>((l + a.center_coef * sq) / n);
    out.stats[kBTAccuracy] = static_cast<float>(acc / n);
    out.stats[kBTMarginMean] = static_cast<float>(mar / n);
  }

  static void bt_backward(const PairArgs& a, const float* grad, float* pc, float* pr, const at::Tensor&) {
    const float *c = a.chosen, *r = a.rejected, *mg = a.margin;
    const float scale = static_cast<float>(static_cast<double>(*grad) / std::max<double>(a.P, 1));
    const float cc2 = static_cast<float>(2 * a.center_coef);
    at::parallel_for(0, a.P, kChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float diff = c[i] - r[i];
        const float gd = bt_pair_grad(mg ? diff - mg[i] : diff, a.label_smoothing);
        const float gs = cc2 * (c[i] + r[i]);
        pc[i] = scale * (gd + gs);
        pr[i] = scale * (gs - gd);
      }
    });
  }

  static void ranking_forward(const RankingArgs& a, const LossOutputs& out, const at::Tensor&) {
    const int64_t P = a.P, K = a.K;
    std::vector<double> row_loss(P), row_pairs(P), row_correct(P);
    at::parallel_for(0, P, prompt_grain(K), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const float* r = a.rewards + p * K;
        const bool* v = a.valid ? a.valid + p * K : nullptr;
        double l = 0, n = 0, correct = 0;
        for (int64_t i = 0; i < K; ++i) {
          if (v && !v[i]) continue;
          for (int64_t j = i + 1; j < K; ++j) {
            if (v && !v[j]) continue;
            l -= log_sigmoid(r[i] - r[j]);
            n += 1;
            correct += r[i] > r[j] ? 1 : 0;
          }
        }
        row_loss[p] = l;
        row_pairs[p] = n;
        row_correct[p] = correct;
      }
    });
    double prompts = 0, pairs = 0, correct = 0;
    for (int64_t p = 0; p < P; ++p) {
      prompts += row_pairs[p] > 0 ? 1 : 0;
      pairs += row_pairs[p];
      correct += row_correct[p];
    }
    double loss = 0;
    for (int64_t p = 0; p < P; ++p) {
      const double wp = row_pairs[p] > 0 ? 1.0 / (row_pairs[p] * prompts) : 0.0;
      out.row_scale[p] = static_cast<float>(wp);
      loss += wp * row_loss[p];
    }
    *out.loss = static_cast<float>(loss);
    out.stats[kRankingAccuracy] = static_cast<float>(pairs > 0 ? correct / pairs : 0.0);
  }

  static void ranking_backward(const RankingArgs& a, const float* grad, const float* prompt_scale, float* out,
                               const at::Tensor&) {
    const int64_t K = a.K;
    const float g = *grad;
    at::parallel_for(0, a.P, prompt_grain(K), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const float* r = a.rewards + p * K;
        const bool* v = a.valid ? a.valid + p * K : nullptr;
        const float s = g * prompt_scale[p];
        for (int64_t i = 0; i < K; ++i) {
          float acc = 0.f;
          if (!v || v[i]) {
            for (int64_t j = 0; j < K; ++j) {
              if (j == i || (v && !v[j])) continue;
              // i better than j (i < j): -sigmoid(r_j - r_i); j better than i: +sigmoid(r_i - r_j)
              acc += j > i ? -sigmoid(r[j] - r[i]) : sigmoid(r[i] - r[j]);
            }
          }
          out[p * K + i] = s * acc;
        }
      }
    });
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("bt_fwd", &rlhf::bt_forward<rlhf::CpuBT>);
  m.impl("bt_bwd", &rlhf::bt_backward<rlhf::CpuBT>);
  m.impl("ranking_fwd", &rlhf::ranking_forward<rlhf::CpuBT>);
  m.impl("ranking_bwd", &rlhf::ranking_backward<rlhf::CpuBT>);
}
