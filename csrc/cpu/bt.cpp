// Bradley-Terry and all-pairs ranking losses on the CPU.
// Reductions run over fixed-size chunks (BT) or rows (ranking) in parallel, each
// leaving float64 partials that are combined in order: thread-count independent.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rlhf/bt.h"
#include "rlhf/loss_checks.h"

namespace rlhf {
namespace {

constexpr int64_t kChunk = 4096;

std::tuple<at::Tensor, at::Tensor> bt_fwd_cpu(const at::Tensor& chosen, const at::Tensor& rejected,
                                              const c10::optional<at::Tensor>& margin, double label_smoothing,
                                              double center_coef) {
  const char* op = "bt_fwd";
  const float* mg = check_pairs(chosen, rejected, margin, op);
  const int64_t P = chosen.size(0);
  const float* c = chosen.data_ptr<float>();
  const float* r = rejected.data_ptr<float>();
  const float eps = static_cast<float>(label_smoothing);
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  // per chunk: pair loss, centering term, correct pairs, margin sum
  std::vector<double> part(4 * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t k = c0; k < c1; ++k) {
      double l = 0, sq = 0, acc = 0, mar = 0;
      for (int64_t i = k * kChunk, e = std::min(P, i + kChunk); i < e; ++i) {
        const float diff = c[i] - r[i];
        l += bt_pair_loss(mg ? diff - mg[i] : diff, eps);
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
  at::Tensor loss = at::empty({}, chosen.options());
  loss.data_ptr<float>()[0] = static_cast<float>((l + center_coef * sq) / n);
  at::Tensor stats = at::empty({2}, chosen.options());
  stats.data_ptr<float>()[0] = static_cast<float>(acc / n);
  stats.data_ptr<float>()[1] = static_cast<float>(mar / n);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> bt_bwd_cpu(const at::Tensor& grad, const at::Tensor& chosen,
                                              const at::Tensor& rejected, const c10::optional<at::Tensor>& margin,
                                              double label_smoothing, double center_coef) {
  const char* op = "bt_bwd";
  const float* mg = check_pairs(chosen, rejected, margin, op);
  check_scalar(grad, "grad", chosen, op);
  const int64_t P = chosen.size(0);
  const float* c = chosen.data_ptr<float>();
  const float* r = rejected.data_ptr<float>();
  const float eps = static_cast<float>(label_smoothing);
  const float scale = static_cast<float>(grad.to(at::kDouble).item<double>() / std::max<double>(P, 1));
  const float cc2 = static_cast<float>(2 * center_coef);
  at::Tensor dc = at::empty_like(chosen), dr = at::empty_like(rejected);
  float* pc = dc.data_ptr<float>();
  float* pr = dr.data_ptr<float>();
  at::parallel_for(0, P, kChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float diff = c[i] - r[i];
      const float gd = bt_pair_grad(mg ? diff - mg[i] : diff, eps);
      const float gs = cc2 * (c[i] + r[i]);
      pc[i] = scale * (gd + gs);
      pr[i] = scale * (gs - gd);
    }
  });
  return {dc, dr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ranking_fwd_cpu(const at::Tensor& rewards,
                                                               const c10::optional<at::Tensor>& valid) {
  const char* op = "ranking_fwd";
  const bool* ok = check_ranking(rewards, valid, op);
  const int64_t P = rewards.size(0), K = rewards.size(1);
  const float* rw = rewards.data_ptr<float>();
  std::vector<double> row_loss(P), row_pairs(P), row_correct(P);
  at::parallel_for(0, P, std::max<int64_t>(1, 4096 / std::max<int64_t>(K * K, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* r = rw + p * K;
      const bool* v = ok ? ok + p * K : nullptr;
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
  at::Tensor scale = at::empty({P}, rewards.options());
  float* w = scale.data_ptr<float>();
  double loss = 0;
  for (int64_t p = 0; p < P; ++p) {
    const double wp = row_pairs[p] > 0 ? 1.0 / (row_pairs[p] * prompts) : 0.0;
    w[p] = static_cast<float>(wp);
    loss += wp * row_loss[p];
  }
  at::Tensor out = at::empty({}, rewards.options());
  out.data_ptr<float>()[0] = static_cast<float>(loss);
  at::Tensor stats = at::empty({1}, rewards.options());
  stats.data_ptr<float>()[0] = static_cast<float>(pairs > 0 ? correct / pairs : 0.0);
  return {out, stats, scale};
}

at::Tensor ranking_bwd_cpu(const at::Tensor& grad, const at::Tensor& rewards, const c10::optional<at::Tensor>& valid,
                           const at::Tensor& prompt_scale) {
  const char* op = "ranking_bwd";
  const bool* ok = check_ranking(rewards, valid, op);
  const int64_t P = rewards.size(0), K = rewards.size(1);
  check_scalar(grad, "grad", rewards, op);
  check_row_scale(prompt_scale, P, rewards, "prompt_scale", op);
  const float g = grad.to(at::kFloat).item<float>();
  const float* rw = rewards.data_ptr<float>();
  const float* ws = prompt_scale.data_ptr<float>();
  at::Tensor d = at::empty_like(rewards);
  float* out = d.data_ptr<float>();
  at::parallel_for(0, P, std::max<int64_t>(1, 4096 / std::max<int64_t>(K * K, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* r = rw + p * K;
      const bool* v = ok ? ok + p * K : nullptr;
      const float s = g * ws[p];
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
  return d;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("bt_fwd", &rlhf::bt_fwd_cpu);
  m.impl("bt_bwd", &rlhf::bt_bwd_cpu);
  m.impl("ranking_fwd", &rlhf::ranking_fwd_cpu);
  m.impl("ranking_bwd", &rlhf::ranking_bwd_cpu);
}
