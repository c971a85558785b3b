"""Tolerances, named and justified in one place.

Outputs are float32; references run in float64 on the same (upcast) inputs.
"""

# GAE and whitening: float64 carries, one rounding to float32 at the end; the
# remaining error is the float32 rounding of inputs already exact in float32 plus
# the output's own rounding: a few ulps relative to the magnitude of the row.
GAE_RTOL = 1e-6
GAE_ATOL = 1e-6

# PPO and BT losses: per-token math in float32 (exp of a float32 log-ratio of up to 30 is
# off by |d| * 2^-24 relative, 2e-6), sums in float64. Losses are compared relative to the
# aggregate of an upper bound of |l| (cancellation between signs is not a kernel error),
# gradients elementwise relative to their own size plus this fraction of the largest one.
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
