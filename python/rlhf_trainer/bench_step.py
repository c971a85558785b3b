"""One PPO step as `python -m rlhf_trainer bench` times it: models, rollout, experience,
update. The token math comes from ``bench_ops`` (kernels on or off); everything else is
shared, so the two modes do the same work.

The models are a Qwen2-style causal LM (policy), a frozen copy of it (reference) and a value
model of the same architecture with a scalar head, all randomly initialized from a
transformers config (no downloads). A random-init model cannot judge its samples, so the
reward is a cheap deterministic function of the tokens (``token_parity_reward``).
"""

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model


@dataclass
class BenchConfig:
    # model: a Qwen2 architecture
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    # work per step
    prompts: int
    samples: int            # responses per prompt
    prompt_len: int
    response_len: int       # every response is this long (see rollout)
    micro_batch: int
    mini_batches: int = 2   # optimizer steps per PPO epoch
    ppo_epochs: int = 1
    # PPO
    lr: float = 1e-6
    temperature: float = 1.0
    kl_coef: float = 0.05
    ent_coef: float = 0.01
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    seed: int = 0

    @property
    def batch(self):
        return self.prompts * self.samples


# Qwen2.5-0.5B's shape: 494M parameters, tied embeddings.
GPU_CONFIG = dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936,
                  prompts=8, samples=4, prompt_len=128, response_len=1024, micro_batch=8)
# Sized for a 2-core CPU: both modes in well under a minute.
SMALL_CONFIG = dict(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=32000,
                    prompts=4, samples=2, prompt_len=16, response_len=64, micro_batch=4)


def qwen2_config(cfg):
    return Qwen2Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.prompt_len + cfg.response_len,
                       tie_word_embeddings=True, attention_dropout=0.0, pad_token_id=0, bos_token_id=None,
                       eos_token_id=None)


class ValueModel(nn.Module):
    """The policy's architecture with a scalar head: one value per position."""

    def __init__(self, config):
        super().__init__()
        self.model = Qwen2Model(config)
        self.head = nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, response_len):
        """-> [B, T] float32 values at the positions that predict the response tokens."""
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(h[:, -response_len - 1:-1]).squeeze(-1).float()


@dataclass
class Models:
    policy: nn.Module
    ref: nn.Module
    value: nn.Module
    optimizer: torch.optim.Optimizer


def build_models(cfg, device, dtype):
    """Policy, frozen reference and value model on ``device`` in ``dtype``, the same weights for
    every call with the same config; AdamW over policy and value parameters (its state in the
    parameters' dtype, the same in both modes)."""
    config = qwen2_config(cfg)
    with torch.device(device):
        torch.manual_seed(cfg.seed)
        policy = Qwen2ForCausalLM(config).to(dtype)
        torch.manual_seed(cfg.seed + 1)
        value = ValueModel(config).to(dtype)
    policy.generation_config.pad_token_id = 0
    policy.generation_config.eos_token_id = None
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    params = list(policy.parameters()) + list(value.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    return Models(policy.train(), ref, value.train(), optimizer)


def token_parity_reward(prompts, responses, mask):
    """The bench's reward function: the fraction of valid response tokens with an even id,
    minus 0.5 -> [B] float32. Cheap, deterministic and sensitive to every token; stands in
    for a reward model, which a random-init bench cannot have."""
    even = ((responses % 2) == 0) & mask
    return even.sum(1).float() / mask.sum(1).clamp(min=1).float() - 0.5


@torch.no_grad()
def rollout(models, cfg, step):
    """Sample ``samples`` responses to each of ``prompts`` random prompts with HF ``generate``.
    The stop token is off so every response has ``response_len`` tokens: a random-init model
    would stop at random, and both modes must process the same amount of work."""
    device = next(models.policy.parameters()).device
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + step)
    prompts = torch.randint(1, cfg.vocab, (cfg.prompts, cfg.prompt_len), generator=g, device=device)
    prompts = prompts.repeat_interleave(cfg.samples, dim=0)
    torch.manual_seed(cfg.seed * 1000 + step)
    models.policy.eval()
    seqs = models.policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                  temperature=cfg.temperature, top_p=1.0, top_k=0, max_new_tokens=cfg.response_len,
                                  min_new_tokens=cfg.response_len)
    models.policy.train()
    return prompts, seqs[:, cfg.prompt_len:]


def sequences(prompts, responses, mask):
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompts, dtype=torch.bool), mask], dim=1).long()
    return input_ids, attention_mask


def micro_batches(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def experience(models, ops, cfg, prompts, responses, mask):
    """The log-prob passes over micro-batches -> {"old_logp", "ref_logp", "values"}, each
    [B, T] float32 (log-probabilities 0 where ``mask`` is false)."""
    input_ids, attention_mask = sequences(prompts, responses, mask)
    T = responses.shape[1]
    old, ref, values = [], [], []
    for s in micro_batches(input_ids.shape[0], cfg.micro_batch):
        args = (input_ids[s], attention_mask[s], responses[s], mask[s], cfg.temperature)
        old.append(ops.logprobs(models.policy, *args))
        ref.append(ops.logprobs(models.ref, *args))
        values.append(models.value(input_ids[s], attention_mask[s], T))
    return {"old_logp": torch.cat(old), "ref_logp": torch.cat(ref), "values": torch.cat(values)}


@torch.no_grad()
def advantages(ops, cfg, prompts, responses, mask, exp):
    """Reward at each response's last valid token, minus kl_coef * KL per token; GAE; whitening."""
    score = token_parity_reward(prompts, responses, mask)
    rewards = -cfg.kl_coef * ops.kl(exp["old_logp"], exp["ref_logp"])
    last = mask.long().cumsum(1).argmax(1)  # index of the last valid token
    rewards = torch.where(mask, rewards, 0.0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += score
    adv, returns = ops.advantages(rewards, exp["values"], mask, cfg.gamma, cfg.lam)
    return dict(exp, score=score, advantages=adv, returns=returns)


def update_micro(models, ops, cfg, input_ids, attention_mask, responses, mask, exp, s, num_tokens):
    """Forward and backward of one micro-batch: the policy objective, then the value loss
    (two backward passes, so only one model's activations are alive at a time)."""
    loss, stats = ops.policy_objective(models.policy, input_ids[s], attention_mask[s], responses[s], mask[s],
                                       exp["old_logp"][s], exp["advantages"][s], num_tokens, cfg)
    loss.backward()
    values = models.value(input_ids[s], attention_mask[s], responses.shape[1])
    vloss, vstats = ops.value_loss(values, exp["values"][s], exp["returns"][s], mask[s], num_tokens, cfg)
    (cfg.vf_coef * vloss).backward()
    return loss.detach(), vloss.detach(), dict(stats, **vstats)


def update(models, ops, cfg, prompts, responses, mask, exp):
    """ppo_epochs x mini_batches optimizer steps, each accumulating its micro-batches, with the
    token-mean normalizer of the whole mini-batch (split-invariant). -> list of per-micro stats."""
    input_ids, attention_mask = sequences(prompts, responses, mask)
    params = [p for group in models.optimizer.param_groups for p in group["params"]]
    log = []
    B = input_ids.shape[0]
    for _ in range(cfg.ppo_epochs):
        for mini in micro_batches(B, -(-B // cfg.mini_batches)):
            num_tokens = mask[mini].sum()
            for s in micro_batches(mini.stop - mini.start, cfg.micro_batch):
                s = slice(mini.start + s.start, mini.start + s.stop)
                log.append(update_micro(models, ops, cfg, input_ids, attention_mask, responses, mask, exp, s,
                                        num_tokens))
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            models.optimizer.step()
            models.optimizer.zero_grad(set_to_none=True)
    return log


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ppo_step(models, ops, cfg, step):
    """One timed PPO step -> {"rollout", "logprobs", "update", "other", "step"} seconds and
    the step's loss figures. Each phase ends with a device synchronize."""
    device = next(models.policy.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    prompts, responses = rollout(models, cfg, step)
    mask = torch.ones_like(responses, dtype=torch.bool)  # no stop token: every sampled token counts
    sync(device)
    t1 = time.perf_counter()
    exp = experience(models, ops, cfg, prompts, responses, mask)
    sync(device)
    t2 = time.perf_counter()
    exp = advantages(ops, cfg, prompts, responses, mask, exp)
    sync(device)
    t3 = time.perf_counter()
    log = update(models, ops, cfg, prompts, responses, mask, exp)
    sync(device)
    t4 = time.perf_counter()
    n = len(log)
    return {"rollout": t1 - t0, "logprobs": t2 - t1, "update": t4 - t3, "other": t3 - t2, "step": t4 - t0,
            "policy_loss": sum(float(l[0]) for l in log) / n, "value_loss": sum(float(l[1]) for l in log) / n,
            "score": float(exp["score"].mean())}
