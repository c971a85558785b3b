// The policy head, hidden states straight to the PPO policy objective: the host side of the
// linear_policy ops, written once for both devices (argument checks, row chunks, matmuls,
// gradient accumulation, the loss and its statistics), templated on the device epilogue E of
// the CPU (csrc/cpu/linear_policy.cpp) and CUDA (csrc/cuda/linear_policy.cu) ops.
//
// hidden [B, T, H], weight [V, H], bias [V]; logits = hidden @ weight^T (+ bias), s = logits / T,
// never held as [N, V] (N = B * T tokens). The per-token loss and its gradient are in
// rlhf/linear_policy.h. When gradients are asked for, the FORWARD produces them:
//   before the loop: each row's weight w_b in the aggregated loss, from the mask (and
//     num_tokens) alone, so that every token's d loss / d logp is known once its row of
//     logits is;
//   per chunk of `rows` tokens (rows chosen so that the chunk's whole [rows, V] float32 logits,
//     and their 16-bit dlogits copy on a GPU, fit the buffer; see chunk_rows): one matmul gives the logits of
//     all of V (float32 output, into one reused buffer); E::policy takes each row twice,
//     first its softmax statistics (m, d, w) and the label's logit -> logp, H, the token's
//     loss terms and gradients, then dlogits in place (in the operands' dtype); then
//     d_hidden[rows] = dlogits @ W (one product per chunk: no accumulator),
//     d_weight (+)= dlogits^T @ hidden[rows], d_bias += column sums.
//   That is 2NHV + 2NHV + 2NHV = 6NHV FLOPs (4NHV when only hidden or only weight needs a
//   gradient), and every logit is read twice from the buffer, never recomputed.
//   Without gradients the loop is the matmul and the first half of E::policy: 2NHV.
// After the loop the PPO loss and statistics are ppo_policy_options_fwd's on the [B, T] logp (the
// op itself, through the dispatcher: exactly what ppo_policy_loss computes from those logp), and
// the entropy and KL terms are aggregated with the same w_b (float64 sums, no host sync).
// The policy term's gradient is ppo_policy_loss's backward: s_b * policy_grad_token(t) (see
// rlhf/linear_policy.h), s_b that op's row_scale. Under every option but the sequence-level
// ratio, s_b does not depend on logp (w_b times the row's IS weight, from old_logprobs and
// rollout_logprobs): it comes from one ppo_policy_options_fwd before the loop, with old_logprobs
// standing in for the logp its row_scale does not read then ([B, T] work, no matmul). With ratio_level "sequence" (GSPO) every token's gradient needs
// its row's sequence ratio, so all of the row's logp first: two passes, the loop without
// gradients (2NHV: logp only), ppo_policy_options_fwd for s_b, then the loop with them (6NHV):
// 8NHV in all, the cost of linear_token_logprobs followed by the loss.
// The autograd (csrc/autograd/derivatives.cpp) keeps the gradients, made for a unit upstream
// gradient, and its backward multiplies them in place by the upstream gradient.
//
// d_weight accumulates over the chunks: in d_weight itself for float32 inputs; for 16-bit
// inputs in a float32 [V, H] accumulator (E::kAccumulatorBytes bounds it on a GPU; beyond it,
// as for the LM heads of large vocabularies, d_weight accumulates in its own dtype, with
// float32 accumulation inside each product and one rounding per chunk, as Liger's fused
// linear losses do). With one chunk it is one product, rounded once.
// Batch invariance (a token's logp, entropy and KL are bitwise the same whatever other tokens
// share its batch, how many, in which order): `rows` comes from (V, H, the dtypes, `tile`) alone,
// never from N, and not from which gradients are asked for (so logp is the same with and without
// them, and in both passes of the sequence ratio); the last chunk, and a chunk whose rows do not
// start on an aligned boundary, is padded to `rows` (rlhf/linear_logprobs_op.h: linear_row_block),
// so every matmul is [rows, H] x [H, V] or [rows, V] x [V, H] and MKL / cuBLAS run the same
// algorithm with the same reduction order on every chunk; d_hidden goes through a [rows, H]
// product, d_weight and d_bias take the real rows only. The cost: up to rows - 1 padded rows per
// call (rows <= E::kMaxRows: 256 on the CPU, 2048 on a GPU), large only for small N.
// Extra memory: the buffer (at most E::kDefaultBufferBytes with the accumulator, or `tile`
// float32 logits), the accumulator when used, the padded row block and the d_hidden product
// [rows, H], float32 per-token vectors [N] and d_bias [V], and E::operand's copies (CPU, 16-bit
// inputs only: hidden and weight in float32).
//
// E provides:
//   static constexpr int64_t kDefaultBufferBytes;  logits (+ dlogits) buffer and accumulator together
//   static constexpr int64_t kAccumulatorBytes;    the largest float32 d_weight accumulator
//   static constexpr int64_t kMaxRows;             the most token rows per chunk
//   static at::Tensor operand(t);                  matmul operand: t itself, or a float32 copy
//   static void mm_f32(out, a, b);                 out (float32) = a @ b
//   static void addmm_f32(acc, a, b);              acc (float32) += a @ b
//   static void check_label_range(labels, mask, V, op);  the `validate` check (CUDA: skipped while capturing)
//   static void policy(logits [nr, V] f32, dlogits [nr, V] or undefined (no gradient; may alias
//                      logits), bias (float32 [V]) or nullptr, PolicyHeadRows, inv_t, PolicyHeadArgs);
// Every tensor E gets is contiguous, and so are the matmul operands (hidden and weight are made
// contiguous first: a copy only when they are not).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <tuple>

#include "rlhf/checks.h"
#include "rlhf/label_dispatch.h"
#include "rlhf/layout.h"
#include "rlhf/linear_logprobs_op.h"
#include "rlhf/linear_policy.h"
#include "rlhf/ppo_op.h"

namespace rlhf {

// One chunk's tokens, as E::policy reads and writes them ([nr] each, offset to the chunk).
struct PolicyHeadRows {
  at::Tensor labels;          // int32/int64; read only where mask is set
  const bool* mask;
  const float *old_logp, *adv;
  const float* ref;           // nullptr without ref_logprobs
  const float* rollout;       // rollout_logprobs, or nullptr (no correction)
  const float* weight;        // w_b of the token's row (0 where masked)
  const float* policy_scale;  // s_b of the token's row: ppo_policy_loss's row_scale (0 where masked)
  float *logp, *entropy;      // out: 0 where masked
  float* kl;                  // out (nullptr without ref_logprobs): 0 where masked
};

namespace detail {

inline int kl_kind_code(std::string_view kind, const char* op) {
  for (int k = 0; k < kNumKlKinds; ++k)
    if (kind == kKlKindNames[k]) return k;
  TORCH_CHECK_VALUE(false, op, ": `kl_kind` must be one of 'k1', 'k2', 'k3', 'abs', got '", kind, "'");
  return 0;
}

inline void check_coef(double x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x >= 0 && std::isfinite(x), op, ": `", name, "` must be a finite number >= 0, got ", x);
}

// The checked and converted arguments.
struct PolicyHeadCall {
  int64_t B, T, H, V;
  at::Tensor labels;            // [B, T] int32/int64, contiguous
  at::Tensor mask;              // [B, T] bool, contiguous
  at::Tensor old_logp, adv;     // [B, T] float32, contiguous
  at::Tensor ref;               // [B, T] float32, or undefined
  at::Tensor rollout;           // [B, T] float32, or undefined
  at::Tensor num_tokens;        // float64 0-d, or undefined
  PolicyHeadArgs args;
  float inv_t;
};

inline PolicyHeadCall check_policy_head(const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                                        const at::Tensor& old_logprobs, const at::Tensor& advantages,
                                        const at::Tensor& mask, const c10::optional<at::Tensor>& ref_logprobs,
                                        const c10::optional<at::Tensor>& num_tokens,
                                        c10::optional<double> num_tokens_value, double temperature, double kl_coef,
                                        std::string_view kl_kind, double entropy_coef, double clip_low,
                                        c10::optional<double> clip_high, c10::optional<double> dual_clip,
                                        int64_t loss_agg, const c10::optional<at::Tensor>& rollout_logprobs,
                                        int64_t options, c10::optional<double> is_cap, const char* op) {
  PolicyHeadCall c;
  const auto hv = check_linear(hidden, weight, bias, op);
  check_dim(hidden, 3, "[B, T, H]", "hidden", op);
  c.B = hidden.size(0);
  c.T = hidden.size(1);
  c.H = hv.first;
  c.V = hv.second;
  c.labels = check_labels(labels, hidden, "hidden", "H", op);
  c.old_logp = check_per_position(old_logprobs, hidden, "old_logprobs", "hidden", op);
  c.adv = check_per_position(advantages, hidden, "advantages", "hidden", op);
  TORCH_CHECK_VALUE(mask.sizes() == lead_shape(hidden), op, ": `mask` must have shape ", lead_shape(hidden),
                    " (hidden's shape ", hidden.sizes(), " without H), got ", mask.sizes());
  check_same_device(mask, "mask", hidden, "hidden", op);
  c.mask = as_mask(mask, "mask", op);
  c.ref = opt_per_position(ref_logprobs, hidden, "ref_logprobs", "hidden", op);
  const int kind = kl_kind_code(kl_kind, op);
  check_coef(kl_coef, "kl_coef", op);
  check_coef(entropy_coef, "entropy_coef", op);
  TORCH_CHECK_VALUE(kl_coef == 0 || ref_logprobs.has_value(), op, ": `kl_coef` = ", kl_coef,
                    " needs `ref_logprobs` (the reference policy's log-probabilities of the labels)");
  TORCH_CHECK_VALUE(kl_coef > 0 || !ref_logprobs.has_value(), op,
                    ": `ref_logprobs` given with `kl_coef` = 0; it would be ignored (pass kl_coef > 0, or no "
                    "ref_logprobs)");
  check_clip(clip_low, "clip_low", op);
  const double ch = clip_high.value_or(clip_low);
  check_clip(ch, "clip_high", op);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, op, ": `dual_clip` must be > 1 (or None), got ",
                    dual_clip.value_or(0.0));
  TORCH_CHECK_VALUE(loss_agg >= 0 && loss_agg < kNumLossAggs, op, ": loss_agg code must be 0..", kNumLossAggs - 1,
                    ", got ", loss_agg);
  opt_per_position(rollout_logprobs, hidden, "rollout_logprobs", "hidden", op);  // its shape, named after hidden
  c.rollout = check_policy_options(options, rollout_logprobs, is_cap, dual_clip.has_value(), c.old_logp, op);
  c.num_tokens = check_num_tokens(num_tokens, num_tokens_value, hidden, op);
  c.inv_t = inverse_temperature(temperature, op);
  c.args = {static_cast<float>(clip_low),   static_cast<float>(ch),           static_cast<float>(dual_clip.value_or(0.0)),
            static_cast<float>(kl_coef),    static_cast<float>(entropy_coef), kind,
            decode_policy_options(options, is_cap)};
  return c;
}

// The `validate` check: labels where mask is set must be in [0, V) (elsewhere they are never
// read). Labels in host memory are read in place; elsewhere a few elementwise ops and one
// read back: one host sync on a GPU (the CUDA epilogue skips it while a graph is captured).
inline void check_masked_label_range(const at::Tensor& labels, const at::Tensor& mask, int64_t V, const char* op) {
  if (labels.numel() == 0) return;
  const int64_t T = labels.size(1);
  const auto fail = [&](int64_t i, int64_t value) {
    TORCH_CHECK_VALUE(false, op, ": `labels` must be in [0, V) = [0, ", V, ") where `mask` is set, but labels[",
                      i / T, ", ", i % T, "] = ", value, " (labels where `mask` is 0 are never read)");
  };
  if (labels.is_cpu()) {
    const bool* m = mask.data_ptr<bool>();
    with_labels(labels, [&](auto* y) {
      const int64_t n = labels.numel();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(y[i]);
        if (m[i] && (v < 0 || v >= V)) fail(i, v);
      }
    });
    return;
  }
  const at::Tensor flat = labels.reshape({-1});
  const at::Tensor bad = flat.lt(0).logical_or_(flat.ge(V)).logical_and_(mask.reshape({-1}));
  if (!bad.any().item<bool>()) return;  // the one host sync of valid labels
  const int64_t i = at::nonzero(bad).select(1, 0)[0].item<int64_t>();
  fail(i, flat[i].item<int64_t>());
}

// w_b, each row's weight in the aggregated loss (ppo_row_weight of rlhf/ppo.h, as tensors on the
// inputs' device: no host sync): float64 [B], 0 for rows without a valid token.
inline at::Tensor row_weights(const at::Tensor& mask, int64_t agg, const at::Tensor& num_tokens,
                              c10::optional<double> num_tokens_value) {
  const int64_t B = mask.size(0);
  const at::Tensor count = mask.sum({1}, false, at::kDouble);
  const at::Tensor has = count.gt(0);
  const auto f64 = count.options();
  at::Tensor w;
  switch (agg) {
    case kTokenMean: {
      at::Tensor denom = count.sum();
      if (num_tokens_value.has_value()) {
        denom = at::full({}, *num_tokens_value, f64);
      } else if (num_tokens.defined()) {
        denom = at::where(num_tokens.gt(0), num_tokens, denom);  // as ppo_row_weight: num_tokens > 0
      }
      w = denom.reciprocal().expand({B});
      break;
    }
    case kSeqMeanTokenMean: w = count.mul(has.sum(at::kDouble)).reciprocal(); break;
    case kSeqMeanTokenSum: w = has.sum(at::kDouble).reciprocal().expand({B}); break;
    case kSeqMeanTokenSumNorm: w = at::full({B}, 1.0 / static_cast<double>(mask.numel()), f64); break;
    default: w = at::ones({B}, f64);  // kTokenSum
  }
  return at::where(has, w, 0.0);
}

// Token rows per chunk: as many as the buffer holds (the float32 logits [rows, V], and their dlogits
// copy when the operands are not float32; less the optional float32 d_weight accumulator [V, H]
// for 16-bit inputs), at most max_rows, rounded down to a power of two; with `tile` > 0, tile / V
// (tests). Never from N, nor from which gradients are asked for: batch invariance (see the top).
inline int64_t chunk_rows(int64_t V, int64_t H, at::ScalarType dt, const at::Tensor& h, int64_t tile,
                          int64_t buffer_bytes, int64_t acc_max_bytes, int64_t max_rows) {
  const bool in_place = h.scalar_type() == at::kFloat;
  const int64_t row_bytes = V * (4 + (in_place ? 0 : h.element_size()));
  const int64_t acc_bytes = V * H * 4;
  const bool acc_optional = h.scalar_type() == dt && dt != at::kFloat && acc_bytes <= acc_max_bytes;
  const int64_t budget = buffer_bytes - (acc_optional ? acc_bytes : 0);
  const int64_t want = std::clamp<int64_t>(tile > 0 ? tile / V : budget / row_bytes, 1, max_rows);
  int64_t rows = 1;
  while (rows * 2 <= want) rows *= 2;
  return rows;
}

}  // namespace detail

namespace detail {

// ppo_policy_options_fwd itself (through the dispatcher: the CPU or CUDA kernel of the inputs'
// device) -> (loss [], stats [kNumPolicyStats], row_scale [B]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy(
    const at::Tensor& logp, const PolicyHeadCall& c, const c10::optional<at::Tensor>& num_tokens,
    c10::optional<double> num_tokens_value, double clip_low, c10::optional<double> clip_high,
    c10::optional<double> dual_clip, int64_t loss_agg, int64_t options, c10::optional<double> is_cap) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rlhf_kernels::ppo_policy_options_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const c10::optional<at::Tensor>&, c10::optional<double>, double, c10::optional<double>,
              c10::optional<double>, int64_t, const c10::optional<at::Tensor>&, int64_t, c10::optional<double>)>();
  const c10::optional<at::Tensor> rollout = c.rollout.defined() ? c10::optional<at::Tensor>(c.rollout) : c10::nullopt;
  return op.call(logp, c.old_logp, c.adv, c.mask, num_tokens, num_tokens_value, clip_low, clip_high, dual_clip,
                 loss_agg, rollout, options, is_cap);
}

// [B] per row -> [B, T] float32 per token, 0 where masked.
inline at::Tensor per_token(const at::Tensor& rows, const at::Tensor& mask) {
  return at::where(mask, rows.unsqueeze(1), 0.0).to(at::kFloat).contiguous();
}

}  // namespace detail

// -> (loss [], stats [kNumLinearPolicyStats], logprobs [B, T], d_hidden [B, T, H] or [0],
//     d_weight [V, H] or [0], d_bias [V] or [0]): float32, the gradients in the input dtype.
template <typename E>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_policy_forward_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& num_tokens,
    c10::optional<double> num_tokens_value, double temperature, double kl_coef, std::string_view kl_kind,
    double entropy_coef, double clip_low, c10::optional<double> clip_high, c10::optional<double> dual_clip,
    int64_t loss_agg, const c10::optional<at::Tensor>& rollout_logprobs, int64_t options,
    c10::optional<double> is_cap, int64_t tile, bool validate, bool need_hidden, bool need_weight, bool need_bias) {
  const char* op = "linear_policy_loss";
  const detail::PolicyHeadCall c = detail::check_policy_head(
      hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, num_tokens, num_tokens_value,
      temperature, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip, loss_agg, rollout_logprobs,
      options, is_cap, op);
  TORCH_CHECK_VALUE(!need_bias || bias.has_value(), op, ": a bias gradient was asked for without a `bias`");
  if (validate) E::check_label_range(c.labels, c.mask, c.V, op);
  const int64_t B = c.B, T = c.T, H = c.H, V = c.V, N = B * T;
  const auto dt = hidden.scalar_type();
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool need_grad = need_hidden || need_weight || need_bias;
  // an output that was not asked for is a fresh [0] tensor (outputs must not alias)
  const auto none = [&] { return at::empty({0}, hidden.options()); };
  at::Tensor d_hidden = need_hidden ? at::empty(hidden.sizes(), hidden.options()) : none();
  at::Tensor d_weight = need_weight ? at::empty({V, H}, hidden.options()) : none();
  at::Tensor d_bias = need_bias ? at::zeros({V}, f32) : at::Tensor();  // float32 sums over the chunks
  at::Tensor logp = at::empty({B, T}, f32), entropy = at::empty({B, T}, f32);
  const bool has_ref = c.ref.defined();
  at::Tensor kl = has_ref ? at::empty({B, T}, f32) : at::Tensor();
  const at::Tensor w_row = detail::row_weights(c.mask, loss_agg, c.num_tokens, num_tokens_value);
  const at::Tensor w_tok = detail::per_token(w_row, c.mask);
  const auto ppo_on = [&](const at::Tensor& lp) {
    return detail::ppo_policy(lp, c, num_tokens, num_tokens_value, clip_low, clip_high, dual_clip, loss_agg, options,
                              is_cap);
  };
  // s_b, the policy term's row factor (see the comment at the top); w_b where no gradient is made
  const bool two_pass = need_grad && c.args.opt.seq_ratio && N > 0;
  at::Tensor s_tok = need_grad && !two_pass ? detail::per_token(std::get<2>(ppo_on(c.old_logp)), c.mask) : w_tok;

  // the row chunks: logits, the epilogue, then (with_grad) the gradients' products
  const auto run_chunks = [&](bool with_grad) {
    const at::Tensor h = E::operand(hidden.reshape({N, H}).contiguous());
    const at::Tensor w = E::operand(weight.contiguous());
    const at::Tensor b = bias.has_value() ? as_f32(*bias) : at::Tensor();
    // dlogits in the matmul operands' dtype: in place over the float32 logits when that is float32
    const bool in_place = h.scalar_type() == at::kFloat;
    const int64_t rows =
        detail::chunk_rows(V, H, dt, h, tile, E::kDefaultBufferBytes, E::kAccumulatorBytes, E::kMaxRows);
    const int64_t chunks = (N + rows - 1) / rows;
    // float32 d_weight accumulator: needed when dlogits are float32 but d_weight is not (CPU);
    // for 16-bit products (GPU) while it fits E::kAccumulatorBytes (chunk_rows left room for
    // it); with one chunk, one product rounded once
    const bool acc_required = with_grad && need_weight && h.scalar_type() != dt;
    const bool f32_acc = acc_required || (with_grad && need_weight && chunks > 1 && dt != at::kFloat &&
                                          V * H * 4 <= E::kAccumulatorBytes);
    at::Tensor buf = at::empty({rows * V}, f32);
    at::Tensor gbuf = with_grad && !in_place ? at::empty({rows * V}, h.options()) : at::Tensor();
    at::Tensor dw_acc = f32_acc ? at::empty({V, H}, f32) : at::Tensor();
    at::Tensor dh_rows_all = with_grad && need_hidden ? d_hidden.view({N, H}) : at::Tensor();
    at::Tensor pad;  // the padded row block (rlhf/linear_logprobs_op.h: linear_row_block)
    at::Tensor dh_block = with_grad && need_hidden ? at::empty({rows, H}, h.options()) : at::Tensor();
    const at::Tensor y = c.labels.reshape({-1});
    const bool* m = c.mask.data_ptr<bool>();
    const float *olp = c.old_logp.data_ptr<float>(), *adv = c.adv.data_ptr<float>();
    const float* ref = has_ref ? c.ref.data_ptr<float>() : nullptr;
    const float* roll = c.rollout.defined() ? c.rollout.data_ptr<float>() : nullptr;
    const float *wt = w_tok.data_ptr<float>(), *st = s_tok.data_ptr<float>();
    float *lp = logp.data_ptr<float>(), *ent = entropy.data_ptr<float>();
    float* klp = has_ref ? kl.data_ptr<float>() : nullptr;
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t n = std::min(rows, N - r0);
      const at::Tensor hr = h.narrow(0, r0, n);
      // the chunk's logits [rows, V] from the [rows, H] block (padded: see the top); the epilogue
      // takes the first n rows
      at::Tensor logits_block = buf.view({rows, V});
      E::mm_f32(logits_block, linear_row_block(h, pad, r0, n, rows), w.t());
      at::Tensor dz_block = !with_grad ? at::Tensor() : (in_place ? logits_block : gbuf.view({rows, V}));
      at::Tensor logits = logits_block.narrow(0, 0, n);
      at::Tensor dz = dz_block.defined() ? dz_block.narrow(0, 0, n) : at::Tensor();
      const PolicyHeadRows tokens{y.narrow(0, r0, n), m + r0,   olp + r0, adv + r0,
                                  ref ? ref + r0 : nullptr,   roll ? roll + r0 : nullptr,
                                  wt + r0,            st + r0,  lp + r0,  ent + r0,
                                  klp ? klp + r0 : nullptr};
      E::policy(logits, dz, bp, tokens, c.inv_t, c.args);
      if (!with_grad) continue;
      if (need_hidden) {  // all of V in this chunk: d_hidden of its rows in one [rows, V] x [V, H] product
        at::mm_out(dh_block, dz_block, w);
        dh_rows_all.narrow(0, r0, n).copy_(dh_block.narrow(0, 0, n));
      }
      if (need_weight) {
        if (f32_acc && r0 == 0) {
          E::mm_f32(dw_acc, dz.t(), hr);
        } else if (f32_acc) {
          E::addmm_f32(dw_acc, dz.t(), hr);
        } else if (r0 == 0) {
          at::mm_out(d_weight, dz.t(), hr);
        } else {
          d_weight.addmm_(dz.t(), hr);
        }
      }
      if (need_bias) d_bias.add_(at::sum(dz, {0}, false, at::kFloat));
    }
    if (f32_acc) d_weight.copy_(dw_acc);
  };

  std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo;
  if (two_pass) {  // the sequence ratio: every row's logp first, then s_b, then the gradients
    run_chunks(false);
    ppo = ppo_on(logp);
    s_tok = detail::per_token(std::get<2>(ppo), c.mask);
    run_chunks(true);  // the same logp, entropy and kl again (deterministic), and the gradients
  } else {
    if (N > 0) run_chunks(need_grad);
    ppo = ppo_on(logp);
  }
  if (N == 0 && need_weight) d_weight.zero_();

  // the entropy and KL terms, aggregated with the same row weights; their means over valid tokens
  const at::Tensor count = c.mask.sum(at::kDouble).clamp_min(1.0);
  const at::Tensor ent_rows = entropy.sum({1}, false, at::kDouble);
  at::Tensor loss = std::get<0>(ppo).to(at::kDouble);
  if (entropy_coef != 0) loss = loss.sub(ent_rows.mul(w_row).sum().mul(entropy_coef));
  const at::Tensor ent_mean = ent_rows.sum().div(count);
  at::Tensor kl_mean = at::zeros({}, count.options());
  if (has_ref) {
    const at::Tensor kl_rows = kl.sum({1}, false, at::kDouble);
    loss = loss.add(kl_rows.mul(w_row).sum().mul(kl_coef));
    kl_mean = kl_rows.sum().div(count);
  }
  const at::Tensor stats = at::cat({std::get<1>(ppo), at::stack({ent_mean, kl_mean}).to(at::kFloat)});
  return {loss.to(at::kFloat), stats, logp, d_hidden, d_weight, need_bias ? d_bias.to(dt) : none()};
}

// The op without gradients (linear_policy_fwd below autograd): one 2NHV pass.
template <typename E>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_policy_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const c10::optional<at::Tensor>& ref_logprobs, const c10::optional<at::Tensor>& num_tokens,
    c10::optional<double> num_tokens_value, double temperature, double kl_coef, std::string_view kl_kind,
    double entropy_coef, double clip_low, c10::optional<double> clip_high, c10::optional<double> dual_clip,
    int64_t loss_agg, const c10::optional<at::Tensor>& rollout_logprobs, int64_t options,
    c10::optional<double> is_cap, int64_t tile, bool validate) {
  auto r = linear_policy_forward_grad<E>(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs,
                                         num_tokens, num_tokens_value, temperature, kl_coef, kl_kind, entropy_coef,
                                         clip_low, clip_high, dual_clip, loss_agg, rollout_logprobs, options, is_cap,
                                         tile, validate, false, false, false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace rlhf
