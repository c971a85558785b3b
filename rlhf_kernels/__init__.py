"""rlhf-kernels: fused kernels for RLHF training.

Every op takes ``backend="auto"`` ("cuda", "triton", "cpu", "torch"), also settable with
the environment variable RLHF_KERNELS_BACKEND. Outputs are float32. See
``python -m rlhf_kernels.info`` for what is built and usable here.
"""

__version__ = "0.1.0"

from rlhf_kernels._backend import BACKENDS, BackendUnavailable, available as available_backends
from rlhf_kernels.ops.gae import gae, gae_packed, masked_whiten
from rlhf_kernels.ops.logprobs import full_kl, kl_penalty, token_entropy, token_logprobs
from rlhf_kernels.ops.linear_logprobs import linear_token_logprobs
from rlhf_kernels.ops.linear_policy import linear_policy_loss
from rlhf_kernels.ops.ppo import ppo_policy_loss, ppo_value_loss
from rlhf_kernels.ops.bt import bt_loss, ranking_loss
from rlhf_kernels.ops.score import score_loss
from rlhf_kernels.ops.group_advantages import group_advantages

__all__ = [
    "BACKENDS", "BackendUnavailable", "available_backends",
    "gae", "gae_packed", "masked_whiten",
    "token_logprobs", "token_entropy", "kl_penalty", "full_kl",
    "linear_token_logprobs", "linear_policy_loss",
    "ppo_policy_loss", "ppo_value_loss",
    "bt_loss", "ranking_loss", "score_loss",
    "group_advantages",
]
