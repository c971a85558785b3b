// Per-row softmax statistics and per-element gradients of the logprobs family,
// used by both csrc/cpu/logprobs.cpp and csrc/cuda/logprobs.cu.
//
// With s_j = z_j / T over one row of the vocabulary (j < V):
//   m   = max_j s_j
//   d   = sum_j exp(s_j - m)
//   w   = sum_j exp(s_j - m) * (s_j - m)
//   lse = m + log d,   logp_y = (s_y - m) - log d,   H = log d - w / d
// Keeping w relative to the running max (not sum p*s) makes H exact even for
// logits near 1e4, where lse - E[s] would cancel. A term with exp(.) == 0 counts 0
// (a -inf logit has p = 0 and p*log p = 0). A NaN entry makes its exp NaN, hence d and every
// output and gradient of its row NaN (and nothing outside its row).
//
// Full KL(p || q), q = softmax(r), r_j = ref_z_j / T:
//   KL = sum_j p_j ((s_j - lse) - (r_j - lse_r)) = w_kl / d - lse + lse_r,
//   w_kl = sum_j exp(s_j - m) * (s_j - r_j).
//
// The backward gets (m, log d) per row rather than lse: lp_j = (s_j - m) - log d keeps
// p_j accurate for logits near 1e4, where lse rounded to float32 is off by ~5e-4.
// Backward, g_l and g_H the upstream gradients of logp_y and H, lp_j = log p_j:
//   dlogp_y/ds_j = [j == y] - p_j
//   dH/ds_j      = -p_j (lp_j + H)
//   dKL/ds_j     = p_j (lp_j - lq_j - KL)
//   dz_j         = ds_j / T
#pragma once
#include <cmath>

#include "rlhf/common.h"

namespace rlhf {

// The statistics of the entries seen so far: max m, d and w as above (relative to m).
struct SoftmaxStats {
  float m, d, w;
};

RLHF_HD SoftmaxStats softmax_stats_empty() { return {-INFINITY, 0.f, 0.f}; }

// Rescale stats kept relative to `m_old` to be relative to `m_new` >= m_old.
RLHF_HD SoftmaxStats softmax_stats_rebase(SoftmaxStats a, float m_new) {
  if (a.d == 0.f) return {m_new, 0.f, 0.f};  // nothing seen (or only -inf): also avoids -inf * 0
  const float shift = a.m - m_new;          // <= 0
  const float scale = expf(shift);
  return {m_new, a.d * scale, scale * (a.w + shift * a.d)};
}

// The statistics of the union of two disjoint sets of entries.
RLHF_HD SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.d + b.d, a.w + b.w};  // only -inf so far: both d are 0
  const SoftmaxStats ra = softmax_stats_rebase(a, m), rb = softmax_stats_rebase(b, m);
  return {m, ra.d + rb.d, ra.w + rb.w};
}

// Add one entry s with s <= st.m (the caller rebased to a max covering s first).
// e = exp(s - st.m) is passed in so each backend can use its own exp.
RLHF_HD void softmax_stats_add(SoftmaxStats& st, float s, float e) {
  st.d += e;
  st.w += e > 0.f ? e * (s - st.m) : 0.f;
}

RLHF_HD float softmax_lse(SoftmaxStats st) { return st.m + logf(st.d); }
RLHF_HD float softmax_entropy(SoftmaxStats st) { return logf(st.d) - st.w / st.d; }
RLHF_HD float softmax_logprob(SoftmaxStats st, float s_label) { return (s_label - st.m) - logf(st.d); }

// Full-vocabulary KL statistics: the policy's (m, d, w_kl) and the reference's (m_r, d_r).
struct KlStats {
  float m, d, w;  // w = sum exp(s - m) * (s - r): no shift term, (s - r) does not depend on m
  float mr, dr;
};

RLHF_HD KlStats kl_stats_empty() { return {-INFINITY, 0.f, 0.f, -INFINITY, 0.f}; }

// Rebase each part to its new max; a part with d == 0 has seen nothing (or only -inf).
RLHF_HD void kl_stats_rebase(KlStats& st, float m_new, float mr_new) {
  if (st.d != 0.f) {
    const float scale = expf(st.m - m_new);
    st.d *= scale;
    st.w *= scale;
  }
  if (st.dr != 0.f) st.dr *= expf(st.mr - mr_new);
  st.m = m_new;
  st.mr = mr_new;
}

RLHF_HD KlStats kl_stats_merge(KlStats a, KlStats b) {
  const float m = fmaxf(a.m, b.m), mr = fmaxf(a.mr, b.mr);
  kl_stats_rebase(a, m, mr);
  kl_stats_rebase(b, m, mr);
  return {m, a.d + b.d, a.w + b.w, mr, a.dr + b.dr};
}

// Add one pair (s, r) with s <= st.m and r <= st.mr; e = exp(s - m), er = exp(r - mr).
RLHF_HD void kl_stats_add(KlStats& st, float s, float r, float e, float er) {
  st.d += e;
  st.w += e > 0.f ? e * (s - r) : 0.f;
  st.dr += er;
}

RLHF_HD float kl_value(KlStats st) {
  // w/d - lse + lse_r, with the maxima subtracted first so that equal rows give 0 exactly
  return st.w / st.d + (st.mr - st.m) + (logf(st.dr) - logf(st.d));
}

// log p_j from the saved statistics (m, log d).
RLHF_HD float log_prob(float s, float m, float log_d) { return (s - m) - log_d; }

// The gradients below are 0 where p_j == 0 (a -inf logit: lp = -inf, and p * lp would be
// 0 * -inf). The select tests p != 0, not p > 0: in a row holding a NaN, lp and p are NaN
// and the gradient must stay NaN, as PyTorch's is (p > 0 would turn it into 0 and leave
// only the label's one-hot term, a finite gradient for a NaN row).

// ds_j of g_l * logp_y + g_H * H, leaving out the label's one-hot term g_l * [j == y];
// lp = log p_j and p = exp(lp).
RLHF_HD float logprob_entropy_grad(float lp, float p, float g_logp, float g_entropy, float entropy) {
  return p != 0.f ? -p * (g_logp + g_entropy * (lp + entropy)) : 0.f;
}

// ds_j of g * KL; lp = log p_j, lq = log q_j, p = exp(lp).
RLHF_HD float full_kl_grad(float lp, float lq, float p, float g, float kl) {
  return p != 0.f ? g * p * (lp - lq - kl) : 0.f;
}

}  // namespace rlhf
