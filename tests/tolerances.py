"""Tolerances, named and justified in one place.

Outputs are float32; references run in float64 on the same (upcast) inputs.
"""

# GAE and whitening: float64 carries, one rounding to float32 at the end; the
# remaining error is the float32 rounding of inputs already exact in float32 plus
# the output's own rounding: a few ulps relative to the magnitude of the row.
GAE_RTOL = 1e-6
GAE_ATOL = 1e-6

# logprobs family. Forward outputs are float32 statistics of the float64-exact inputs:
# the bound, 1e-4 absolute vs float64 for logp, entropy and full KL, in every dtype
# (the inputs are upcast to float64 for the reference, so the dtype adds no error here).
LOGPROB_ATOL = 1e-4
# ...plus the rounding of the float32 output itself: logp of a token far below the max can
# be -4e4 (logits near 1e4), where one float32 ulp is 4e-3. Two ulps of the exact value.
LOGPROB_OUTPUT_ULPS = 2
# Around V = 262144 float32 sums of ~2.6e5 terms can miss 1e-4; there the bound is twice
# PyTorch's own float32 error, but never tighter than LOGPROB_ATOL.
LOGPROB_TORCH_ERR_FACTOR = 2.0
# Gradients: no worse than twice PyTorch's own error in that dtype (its reference run in
# the low dtype vs float64)...
GRAD_TORCH_ERR_FACTOR = 2.0
# ...plus the rounding of the stored gradient itself: a few ulps of the largest entry in
# the output dtype (PyTorch's own error can be 0 by luck on tiny cases).
GRAD_ULPS = 4
# PPO and BT losses: per-token math in float32 (exp of a float32 log-ratio of up to 30 is
# off by |d| * 2^-24 relative, 2e-6), sums in float64 (the CPU PPO kernels first add 16 terms
# per lane in float32: at most 15 * 2^-24 ~ 1e-6 of the sum of |terms| more). Losses are
# compared relative to the aggregate of an upper bound of |l| (cancellation between signs is
# not a kernel error), gradients elementwise relative to their own size plus this fraction of
# the largest one.
LOSS_RTOL = 2e-5
GRAD_RTOL = 2e-5
GRAD_ATOL_FRAC = 1e-6
# Statistics: fractions are exact counts over float64; means of float32 terms with float64
# sums; approx_kl = (r - 1) - log r cancels in float32 near r = 1 (absolute 1e-7 per token).
STAT_RTOL = 2e-5
STAT_ATOL = 1e-6
# BT and ranking: float32 logsigmoid/sigmoid per pair (a few ulps), float64 sums; losses
# compared relative to the mean of |d| + 1, an upper bound of each pair's loss.
BT_RTOL = 1e-5
# score_loss: the same float32 per-element math (logsigmoid, expm1, a square) and float64 sums;
# losses compared relative to the mean of an upper bound of each term (regression: the term
# itself; ordinal: |pred| + |t_y| + |t_{y-1}| + 1).
SCORE_RTOL = 1e-5
