"""rlhf_trainer: a thin PPO-RLHF trainer built only on the public rlhf_kernels API (to come)."""
