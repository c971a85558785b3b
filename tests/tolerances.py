"""Tolerances, named and justified in one place.

Outputs are float32; references run in float64 on the same (upcast) inputs.
"""

# GAE and whitening: float64 carries, one rounding to float32 at the end; the
# remaining error is the float32 rounding of inputs already exact in float32 plus
# the output's own rounding: a few ulps relative to the magnitude of the row.
GAE_RTOL = 1e-6
GAE_ATOL = 1e-6
