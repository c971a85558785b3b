// Absolute-score reward-model loss (regression, ordinal) on the CPU.
// One pass: fixed-size chunks in parallel, each writing its elements' d pred and leaving float64
// partials (the loss, the stats' sums, and for ordinal each threshold's gradient sum), combined
// in chunk order: thread-count independent.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "rlhf/score.h"
#include "rlhf/score_op.h"

namespace rlhf {
namespace {

constexpr int64_t kChunk = 4096;
// a chunk's partials: loss, first stat (sum e^2 | correct levels), |error|, pred, pred^2;
// then (ordinal) K-1 threshold gradient sums
constexpr int kParts = 5;

struct CpuScore {
  static void check_values(const at::Tensor& level, const at::Tensor& thresholds, const char* op) {
    detail::check_score_values(level, thresholds, op);  // host memory: no sync
  }

  template <typename L>
  static void score_forward(const ScoreArgs<L>& a, const ScoreOutputs& out, const at::Tensor&) {
    const int64_t P = a.P, K = a.K, nt = a.kind == kScoreOrdinal ? K - 1 : 0, width = kParts + nt;
    const int64_t chunks = (P + kChunk - 1) / kChunk;
    const double n = std::max<double>(static_cast<double>(P), 1.0);
    const float inv_n = static_cast<float>(1.0 / n);
    std::vector<double> part(static_cast<size_t>(std::max<int64_t>(chunks, 1) * width), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double* pc = part.data() + c * width;
        for (int64_t i = c * kChunk, e = std::min(P, i + kChunk); i < e; ++i) {
          const float x = a.pred[i];
          pc[3] += x;
          pc[4] += static_cast<double>(x) * x;
          if (a.kind == kScoreRegression) {
            const float err = x - a.target[i];
            pc[0] += 0.5 * static_cast<double>(err) * err;
            pc[1] += static_cast<double>(err) * err;
            pc[2] += std::fabs(err);
            out.d_pred[i] = err * inv_n;
            continue;
          }
          const int64_t y = static_cast<int64_t>(a.level[i]);
          const OrdinalPrediction guess = ordinal_predict(x, a.thresholds, K);
          pc[1] += guess.level == y ? 1 : 0;
          pc[2] += std::fabs(static_cast<double>(guess.expected) - static_cast<double>(y));
          if (y < 0 || y >= K) {  // not validated: NaN loss, no gradient, never a read outside t
            pc[0] += std::numeric_limits<double>::quiet_NaN();
            out.d_pred[i] = 0.f;
            continue;
          }
          const bool has_lower = y > 0, has_upper = y < K - 1;
          const float lower = has_lower ? a.thresholds[y - 1] : 0.f, upper = has_upper ? a.thresholds[y] : 0.f;
          pc[0] += ordinal_nll(x, lower, upper, has_lower, has_upper);
          const OrdinalGrad g = ordinal_grad(x, lower, upper, has_lower, has_upper);
          out.d_pred[i] = g.d_pred * inv_n;
          if (has_lower) pc[kParts + y - 1] += g.d_lower;
          if (has_upper) pc[kParts + y] += g.d_upper;
        }
      }
    });
    std::vector<double> sum(static_cast<size_t>(width), 0.0);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < width; ++j) sum[j] += part[c * width + j];
    const double mean = sum[3] / n;
    *out.loss = static_cast<float>(sum[0] / n);
    out.stats[kScoreFirst] = static_cast<float>(sum[1] / n);
    out.stats[kScoreMae] = static_cast<float>(sum[2] / n);
    out.stats[kScorePredMean] = static_cast<float>(mean);
    out.stats[kScorePredStd] = static_cast<float>(std::sqrt(std::max(sum[4] / n - mean * mean, 0.0)));
    for (int64_t k = 0; k < nt; ++k) out.d_thresholds[k] = static_cast<float>(sum[kParts + k] / n);
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("score_fwd", &rlhf::score_forward<rlhf::CpuScore>); }
