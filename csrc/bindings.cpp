// The one native module, rlhf_kernels._C: operator schemas for the dispatcher
// (the CPU and CUDA implementations register themselves in cpu/ and cuda/),
// plus build facts for `python -m rlhf_kernels.info`.
#include <torch/extension.h>
#include <torch/library.h>

#if RLHF_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "rlhf/layout.h"

TORCH_LIBRARY(rlhf_kernels, m) {
  // gae family: float32 [B, T] (or [N] packed) inputs, bool masks, int64 cu_seqlens.
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, Tensor? last_values, float gamma, float lam)"
        " -> (Tensor, Tensor)");
  m.def("gae_packed(Tensor rewards, Tensor values, Tensor cu_seqlens, Tensor? last_values, Tensor? mask,"
        " float gamma, float lam) -> (Tensor, Tensor)");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");
  // logprobs family: logits [..., V] float32/float16/bfloat16 (any strides: the ops read a
  // contiguous copy when needed), labels [...] of any integer dtype (the kernels read int32/int64).
  // Per-position outputs float32 [...]; saved softmax statistics float32 [N, 2] = (max, log sum
  // exp(s - max)) over the N = numel / V rows ([N, 4] with the reference's for full_kl);
  // gradients in the logits' dtype and shape. `validate`: raise for a label outside [0, V) other
  // than ignore_index (one host sync on a GPU, skipped while a CUDA graph is captured); without
  // it such a label gives NaN logp and entropy and a zero gradient row. `inplace_backward`: the
  // autograd wrapper (csrc/autograd/logprobs.cpp) writes the gradient over the logits
  // (logprobs_bwd_inplace). Autograd of the *_fwd ops: csrc/autograd/logprobs.cpp.
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, bool validate,"
        " bool inplace_backward) -> (Tensor logp, Tensor entropy, Tensor stats)");
  m.def("token_entropy_fwd(Tensor logits, float temperature) -> (Tensor entropy, Tensor stats)");
  m.def("logprobs_bwd(Tensor logits, Tensor? labels, Tensor? grad_logp, Tensor? grad_entropy, Tensor stats,"
        " Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def("logprobs_bwd_inplace(Tensor(a!) logits, Tensor? labels, Tensor? grad_logp, Tensor? grad_entropy,"
        " Tensor stats, Tensor entropy, float temperature, int ignore_index) -> ()");
  m.def("full_kl_fwd(Tensor logits, Tensor ref_logits, float temperature) -> (Tensor kl, Tensor stats)");
  m.def("full_kl_bwd(Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor kl, Tensor stats,"
        " float temperature) -> Tensor");
  // linear_logprobs family: hidden [..., H], weight [V, H], bias [V] of one dtype (float32/
  // float16/bfloat16), any strides; labels [...] of any integer dtype; `tile` = most logits
  // elements held at once (0: the backend's default); `validate` as for token_logprobs.
  // Forward -> float32 (logp [...], entropy [...], stats [N, 2]); backward -> (d_hidden [..., H],
  // d_weight, d_bias) in the input dtype, [0] where not asked for. Autograd of the forward:
  // csrc/autograd/derivatives.cpp.
  m.def("linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature,"
        " int ignore_index, int tile, bool validate) -> (Tensor logp, Tensor entropy, Tensor stats)");
  m.def("linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? grad_logp,"
        " Tensor? grad_entropy, Tensor stats, Tensor entropy, float temperature, int ignore_index, int tile,"
        " bool need_hidden, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  // linear_policy family (the policy head): hidden [B, T, H], weight [V, H], bias [V] as for
  // linear_logprobs; labels [B, T] of any integer dtype, read only where mask is nonzero;
  // old_logprobs, advantages, ref_logprobs [B, T] float; mask [B, T] bool or integer. kl_kind
  // "k1" | "k2" | "k3" | "abs" (parsed in rlhf/linear_policy_op.h); ref_logprobs given exactly when
  // kl_coef > 0; num_tokens, clip_*, loss_agg, rollout_logprobs, options, is_cap as for
  // ppo_policy_options_fwd; tile as for linear_logprobs;
  // validate: raise for a label outside [0, V) where mask is set (one host sync on a GPU).
  // -> float32 (loss [], stats [n] (order: rlhf/layout.h, kLinearPolicyStatNames after the policy
  // stats), logprobs [B, T]). linear_policy_fwd_grad also returns the loss's gradients (for a unit
  // upstream gradient) wrt hidden, weight and bias in the input dtype, [0] where not asked for:
  // the forward makes them; the autograd of linear_policy_fwd (csrc/autograd/derivatives.cpp)
  // calls it and its backward scales them.
  m.def("linear_policy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor old_logprobs,"
        " Tensor advantages, Tensor mask, Tensor? ref_logprobs, Tensor? num_tokens, float? num_tokens_value,"
        " float temperature, float kl_coef, str kl_kind, float entropy_coef, float clip_low, float? clip_high,"
        " float? dual_clip, int loss_agg, Tensor? rollout_logprobs, int options, float? is_cap, int tile,"
        " bool validate) -> (Tensor loss, Tensor stats, Tensor logprobs)");
  m.def("linear_policy_fwd_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor old_logprobs,"
        " Tensor advantages, Tensor mask, Tensor? ref_logprobs, Tensor? num_tokens, float? num_tokens_value,"
        " float temperature, float kl_coef, str kl_kind, float entropy_coef, float clip_low, float? clip_high,"
        " float? dual_clip, int loss_agg, Tensor? rollout_logprobs, int options, float? is_cap, int tile,"
        " bool validate, bool need_hidden, bool need_weight,"
        " bool need_bias) -> (Tensor loss, Tensor stats, Tensor logprobs, Tensor d_hidden, Tensor d_weight,"
        " Tensor d_bias)");
  // ppo family: [B, T] float inputs (any float dtype and strides; the kernels read float32
  // copies when needed) and a bool or integer mask. The token-mean normalizer is num_tokens
  // (a 0-d real tensor on the inputs' device, read by the kernels: no host sync) or
  // num_tokens_value (a number), at most one. loss_agg codes, stats order: rlhf/layout.h.
  // clip_high None means clip_low; dual_clip None means none. Forward -> (loss [], stats
  // [n_stats], row_scale [B]: each row's weight in the loss, used by the backward);
  // backward -> d logprobs / d values [B, T] float32. Autograd: csrc/autograd/derivatives.cpp.
  // The policy loss's options take ppo_policy_options_fwd, the plain loss keeps ppo_policy_fwd
  // (every schema argument costs host time on every call); both share ppo_policy_bwd. `options`
  // packs ratio_level, objective, is_correction and is_level (bit layout: rlhf/layout.h; 0 = the
  // plain loss); rollout_logprobs [B, T] float goes with a correction, is_cap (None: 2) too. Then
  // row_scale [B] is each row's weight times its factor in the gradient (rlhf/ppo.h, row_grad_factor).
  m.def("ppo_policy_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? num_tokens,"
        " float? num_tokens_value, float clip_low, float? clip_high, float? dual_clip, int loss_agg)"
        " -> (Tensor loss, Tensor stats, Tensor row_scale)");
  m.def("ppo_policy_options_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask,"
        " Tensor? num_tokens, float? num_tokens_value, float clip_low, float? clip_high, float? dual_clip,"
        " int loss_agg, Tensor? rollout_logprobs, int options, float? is_cap)"
        " -> (Tensor loss, Tensor stats, Tensor row_scale)");
  m.def("ppo_policy_bwd(Tensor grad, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask,"
        " Tensor row_scale, float clip_low, float? clip_high, float? dual_clip, Tensor? rollout_logprobs=None,"
        " int options=0, float? is_cap=None) -> Tensor");
  m.def("ppo_value_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, Tensor? num_tokens,"
        " float? num_tokens_value, float? clip, int loss_agg) -> (Tensor loss, Tensor stats, Tensor row_scale)");
  m.def("ppo_value_bwd(Tensor grad, Tensor values, Tensor old_values, Tensor returns, Tensor mask,"
        " Tensor row_scale, float? clip) -> Tensor");
  // bt family: float32 [P] rewards (ranking: [P, K], bool valid). bt_fwd -> (loss [], stats [2]);
  // ranking_fwd -> (loss [], stats [1], prompt_scale [P]).
  m.def("bt_fwd(Tensor chosen, Tensor rejected, Tensor? margin, float label_smoothing, float center_coef)"
        " -> (Tensor loss, Tensor stats)");
  m.def("bt_bwd(Tensor grad, Tensor chosen, Tensor rejected, Tensor? margin, float label_smoothing,"
        " float center_coef) -> (Tensor, Tensor)");
  m.def("ranking_fwd(Tensor rewards, Tensor? valid) -> (Tensor loss, Tensor stats, Tensor prompt_scale)");
  m.def("ranking_bwd(Tensor grad, Tensor rewards, Tensor? valid, Tensor prompt_scale) -> Tensor");
  // score family: pred [P] any float dtype; kind 0 = regression (score [P] float, no thresholds),
  // 1 = ordinal (score [P] integer levels, thresholds [K-1] float). -> (loss [], stats [4],
  // d_pred [P], d_thresholds [K-1] or [0]): the gradient factors of the loss, which the
  // backward (csrc/autograd/score.cpp) scales by the upstream gradient.
  m.def("score_fwd(Tensor pred, Tensor score, Tensor? thresholds, int kind, bool validate)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // group_advantages family (no gradients): rewards [B] of any float dtype and strides; groups
  // given by exactly one of group_index ([B], any integer dtype: ids need not be sorted or
  // contiguous) and group_size (must divide B). mode: "grpo", "dr_grpo", "rloo" or
  // "reinforce++" (parsed in rlhf/group_advantages_op.h: no code crosses languages); eps other
  // than 1e-6 only with grpo and reinforce++. -> adv [B] float32; the _masked op also returns
  // adv where mask [B, T] (bool or integer) is nonzero, else 0, as float32 [B, T].
  m.def("group_advantages(Tensor rewards, Tensor? group_index, int? group_size, str mode, float eps) -> Tensor");
  m.def("group_advantages_masked(Tensor rewards, Tensor? group_index, int? group_size, str mode, float eps,"
        " Tensor mask) -> (Tensor, Tensor)");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["torch"] = TORCH_VERSION;
  d["cuda"] = static_cast<bool>(RLHF_WITH_CUDA);
#if RLHF_WITH_CUDA
  d["cuda_runtime"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  d["cuda_runtime"] = pybind11::none();
#endif
  return d;
}

template <size_t N>
pybind11::tuple names(const char* const (&a)[N]) {
  pybind11::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = a[i];
  return t;
}

// The C++ copy of the layouts in rlhf/layout.h, for the test that checks the Python copy.
pybind11::dict layout() {
  pybind11::dict d;
  d["loss_aggs"] = names(rlhf::kLossAggNames);
  d["option_bits"] = pybind11::make_tuple(rlhf::kOptionBits);
  const pybind11::tuple codes[rlhf::kNumOptionFields] = {names(rlhf::kRatioLevelNames), names(rlhf::kObjectiveNames),
                                                         names(rlhf::kIsCorrectionNames), names(rlhf::kIsLevelNames)};
  pybind11::tuple options(static_cast<size_t>(rlhf::kNumOptionFields));
  for (int f = 0; f < rlhf::kNumOptionFields; ++f)
    options[f] = pybind11::make_tuple(rlhf::kOptionFieldNames[f], codes[f]);
  d["policy_options"] = options;
  d["policy_stats"] = names(rlhf::kPolicyStatNames);
  d["value_stats"] = names(rlhf::kValueStatNames);
  d["bt_stats"] = names(rlhf::kBTStatNames);
  d["ranking_stats"] = names(rlhf::kRankingStatNames);
  d["score_kinds"] = names(rlhf::kScoreKindNames);
  d["score_regression_stats"] = names(rlhf::kScoreRegressionStatNames);
  d["score_ordinal_stats"] = names(rlhf::kScoreOrdinalStatNames);
  d["policy_parts"] = names(rlhf::kPolicyPartNames);
  d["value_parts"] = names(rlhf::kValuePartNames);
  pybind11::list lp;
  for (const char* n : rlhf::kPolicyStatNames) lp.append(n);
  for (const char* n : rlhf::kLinearPolicyStatNames) lp.append(n);
  d["linear_policy_stats"] = pybind11::tuple(lp);
  d["kl_kinds"] = names(rlhf::kKlKindNames);
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf-kernels native kernels (CPU and, when built, CUDA); ops live in torch.ops.rlhf_kernels";
  m.def("build_info", &build_info, "Facts compiled into this binary: torch version, CUDA or not");
  m.def("layout", &layout, "The cross-language layouts compiled into this binary (rlhf/layout.h)");
}
