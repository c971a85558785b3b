"""rlhf_trainer: a thin RLHF trainer (PPO, GRPO, RLOO, REINFORCE++, best-of-n, expert iteration) built only
on the public rlhf_kernels API: the toy task with its exact optimum (`demo`, `compare`), and your own models,
prompts and rewards (`train`, `rm`). `python -m rlhf_trainer --help` lists the commands."""
