"""The device a run uses (``device: auto | cpu | cuda``), checked before any model is loaded."""

import torch

from rlhf_trainer.config import ConfigError

# the algorithms that run on a GPU; best_of_n and expert_iteration stay on the CPU (toy task only)
ON_DEVICE = ("ppo", "grpo", "rloo", "reinforce_pp")


def resolve_device(device, algo="ppo"):
    """'auto' -> CUDA when torch sees a GPU, else the CPU; 'cuda' without a GPU is a ConfigError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA GPU (torch %s, built with CUDA %s); use device: "
                          "auto or cpu" % (torch.__version__, torch.version.cuda))
    if device == "cuda" and algo not in ON_DEVICE:
        raise ConfigError("device: cuda is for algo %s; %s runs on the CPU (device: auto or cpu)"
                          % (", ".join(ON_DEVICE), algo))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and algo in ON_DEVICE else "cpu"
    return torch.device(device)
