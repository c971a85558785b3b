// Per-token math of the policy head (linear_policy_loss), used by both csrc/cpu/linear_policy.cpp
// and csrc/cuda/linear_policy.cu (the Triton epilogue mirrors it).
//
// Over valid tokens (mask set), with logp the label's log-probability and H the entropy of the
// row's softmax (rlhf/logprobs.h), w_b the weight of every token of row b in the aggregated loss
// (ppo_row_weight in rlhf/ppo.h: the same for the three terms, which share loss_agg and
// num_tokens) and l_ppo the policy loss of ppo_policy_loss under its options (rlhf/ppo.h):
//   loss = sum_b w_b sum_t [ l_ppo(logp) + kl_coef * kl(logp - ref) - entropy_coef * H ]
//   kl:  x = logp - ref;  k1 = x,  k2 = x^2 / 2,  k3 = expm1(-x) + x,  abs = |x|   (kl_penalty)
// Its gradient reaches the logits through logp and H only, so per token
//   g_logp = d loss / d logp = s_b * policy_grad_token(t) + w_b * kl_coef * d kl / dx
//   g_H    = d loss / d H    = -entropy_coef * w_b
// where s_b * policy_grad_token(t) is ppo_policy_loss's backward (rlhf/ppo.h, ppo_op.h): s_b its
// row_scale (w_b times the row's factor: its IS weight, or for the sequence ratio its s / n times
// the row's sum), policy_grad_token what varies per token. Then
//   dz = [g_logp (onehot(y) - p) - g_H p (log p + H)] / T,
// the linear_logprobs backward's formula (logprob_entropy_grad). So the gradient follows PyTorch's
// conventions on the reference's max/min/clamp, as ppo_policy_loss's.
// d kl / dx: k1 1, k2 x, k3 -expm1(-x) = 1 - exp(-x), abs sign(x) (0 at 0, as torch.abs).
#pragma once
#include <math.h>

#include "rlhf/common.h"
#include "rlhf/layout.h"
#include "rlhf/ppo.h"

namespace rlhf {

// The call's constants, as the epilogues take them.
struct PolicyHeadArgs {
  float clip_low, clip_high, dual_clip;  // dual_clip 0: none
  float kl_coef, entropy_coef;           // >= 0; kl_coef > 0 exactly when ref_logprobs is given
  int kl_kind;                           // KlKind (rlhf/layout.h)
  PolicyOptions opt;                     // ppo_policy_loss's options (decoded)
};

struct PolicyHeadToken {
  float kl;         // the estimator's value (0 without ref_logprobs)
  float g_logp;     // d loss / d logp
  float g_entropy;  // d loss / d H
};

// The estimator at x = logp - ref and its derivative.
RLHF_HD void kl_estimator(float x, int kind, float& value, float& slope) {
  switch (kind) {
    case kKlK1:
      value = x;
      slope = 1.f;
      break;
    case kKlK2:
      value = 0.5f * x * x;
      slope = x;
      break;
    case kKlK3: {
      const float e = expm1f(-x);  // expm1 keeps small x accurate, as kl_penalty
      value = e + x;
      slope = -e;
      break;
    }
    default:
      value = fabsf(x);
      slope = x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f);
  }
}

// One valid token: old_logp, adv, rollout (read only under a token-level correction), ref (read
// only when has_ref), w_b and s_b of its row (see above).
RLHF_HD PolicyHeadToken policy_head_token(float logp, float old_logp, float adv, float rollout, bool has_ref, float ref,
                                          float weight, float policy_scale, const PolicyHeadArgs& a) {
  const float d_ppo =
      policy_grad_token<float>(logp, old_logp, adv, rollout, a.clip_low, a.clip_high, a.dual_clip, a.opt);
  float kl = 0.f, d_kl = 0.f;
  if (has_ref) kl_estimator(logp - ref, a.kl_kind, kl, d_kl);
  return {kl, policy_scale * d_ppo + weight * a.kl_coef * d_kl, -a.entropy_coef * weight};
}

}  // namespace rlhf
