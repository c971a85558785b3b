"""Critic-free advantages: each sequence's reward against the rewards of its group (its prompt).

    grpo         (r - mean_g) / (std_g + eps)
    dr_grpo      r - mean_g
    rloo         r - (sum_g - r) / (n_g - 1)       the mean of the group's other members
    reinforce++  x = r - mean_g, then (x - mean(x)) / (std(x) + eps) over the batch

std is the unbiased (n - 1) standard deviation, as torch.std. A group of one gets advantage 0
and stays out of reinforce++'s batch statistics; so does a group holding a NaN or infinite
reward, whose advantages are all NaN.
"""

import torch


def group_numbers(rewards, group_index=None, group_size=None):
    """Each sequence's group as a number in [0, groups), and the number of groups."""
    B = rewards.shape[0]
    if group_size is not None:
        return torch.arange(B, device=rewards.device) // group_size, B // group_size
    ids, number = torch.unique(group_index, return_inverse=True)
    return number, ids.numel()


def group_advantages(rewards, group_index=None, group_size=None, mode="grpo", eps=1e-6):
    """rewards: [B] float; group_index: [B] int ids, or group_size: groups of consecutive
    sequences. Returns the advantages [B] in the dtype of ``rewards``."""
    number, groups = group_numbers(rewards, group_index, group_size)

    def group_sum(values):  # per group
        return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, number, values)

    def of_group(per_group):  # per sequence
        return per_group.index_select(0, number)

    n = of_group(group_sum(torch.ones_like(rewards)))
    total = of_group(group_sum(rewards))
    x = rewards - total / n
    if mode == "grpo":
        std = (of_group(group_sum(x * x)) / (n - 1)).sqrt()
        adv = x / (std + eps)
    elif mode == "rloo":
        adv = rewards - (total - rewards) / (n - 1)
    elif mode in ("dr_grpo", "reinforce++"):
        adv = x
    else:
        raise ValueError("unknown mode %r" % (mode,))
    finite, alone = torch.isfinite(total), n < 2
    adv = torch.where(alone, torch.zeros_like(adv), adv)
    adv = torch.where(finite, adv, torch.full_like(adv, float("nan")))
    if mode == "reinforce++":
        counted = finite & ~alone
        xs = x[counted]
        if xs.numel() > 0:
            adv = torch.where(counted, (x - xs.mean()) / (xs.std() + eps), adv)
    return adv


def masked(adv, mask):
    """[B] advantages over the tokens of a [B, T] bool mask: adv where mask, 0 elsewhere."""
    return torch.where(mask, adv[:, None], torch.zeros((), dtype=adv.dtype, device=adv.device))
