"""One PPO step as `python -m rlhf_trainer bench` times it: the trainer's own step
(``ppo.PPOTrainer``'s rollout, ``score_rollout`` and ``update``), with the token ops of
``bench_ops`` (kernels on or off); everything else is the same code, so the two modes do the
same work.

The models are a Qwen2-style causal LM (policy), the trainer's frozen copy of it (reference)
and a value model of the same architecture with a scalar head, all randomly initialized from a
transformers config (no downloads), in the bench's dtype. A random-init model cannot judge
its samples, so the reward is a cheap deterministic function of the tokens
(``token_parity_reward``).
"""

import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from rlhf_trainer.bench_ops import OPS
from rlhf_trainer.config import Config, PPOConfig
from rlhf_trainer.models import ScalarHead
from rlhf_trainer.ppo import PPOTrainer


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
    response_len: int       # every response is this long (see BenchTask)
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
NO_TOKEN = -1   # the bench task's EOS: no sampled token has it, so every response is full length


def qwen2_config(cfg):
    return Qwen2Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.prompt_len + cfg.response_len,
                       tie_word_embeddings=True, attention_dropout=0.0, pad_token_id=0, bos_token_id=None,
                       eos_token_id=None)


class ValueModel(ScalarHead):
    """The policy's architecture with a scalar head: one value per position."""

    def __init__(self, config):
        super().__init__()
        self.backbone = Qwen2Model(config)
        self.head = nn.Linear(config.hidden_size, 1)


@dataclass
class TaskConfig:
    """What the trainer reads of a task's config."""
    response_len: int
    pad_token_id: int = 0
    eos_token_id: int = NO_TOKEN
    stop_at_eos: bool = False


class BenchTask:
    """The task ``PPOTrainer`` runs in the bench: a fixed pool of random prompts (``prompt_len``
    tokens, no padding), the models above, built on ``device`` in ``dtype`` with the same weights
    for every task with the same config. The stop token is off, so every response has
    ``response_len`` tokens: a random-init model would stop at random, and both modes must
    process the same amount of work."""
    top_p = 1.0

    def __init__(self, cfg, device, dtype, pool=64):
        self.bench, self.device, self.dtype = cfg, device, dtype
        g = torch.Generator().manual_seed(cfg.seed)
        self.prompts = torch.randint(1, cfg.vocab, (pool * cfg.prompts, cfg.prompt_len), generator=g)
        self.cfg = TaskConfig(cfg.response_len)

    @property
    def num_prompts(self):
        return self.prompts.shape[0]

    def build_policy(self, cfg):
        with torch.device(self.device):
            torch.manual_seed(self.bench.seed)
            policy = Qwen2ForCausalLM(qwen2_config(self.bench)).to(self.dtype)
        policy.generation_config.pad_token_id = 0
        policy.generation_config.eos_token_id = None
        return policy

    def build_value(self, cfg):
        with torch.device(self.device):
            torch.manual_seed(self.bench.seed + 1)
            return ValueModel(qwen2_config(self.bench)).to(self.dtype)

    def rule_reward(self, prompt_ids, responses):
        return None


def token_parity_reward(prompt_ids, responses):
    """The bench's reward function: the fraction of response tokens with an even id, minus 0.5
    -> [B] float32. Cheap, deterministic and sensitive to every token; stands in for a reward
    model, which a random-init bench cannot have."""
    return ((responses % 2) == 0).float().mean(1) - 0.5


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BenchTrainer(PPOTrainer):
    """``PPOTrainer`` with the bench's ops, ``prompts`` prompts x ``samples`` responses per
    rollout, the same sampling seed in both modes, and the log-prob passes timed."""

    def __init__(self, task, mode):
        self.ops, fused = OPS[mode]
        self.mode, self.bench = mode, task.bench
        super().__init__(trainer_config(task.bench, task.device, fused), task, reward_fn=token_parity_reward)
        self.logprob_seconds = 0.0

    def sample_prompts(self):
        b = self.bench
        ids = torch.randperm(self.task.num_prompts, generator=self.gen)[:b.prompts]
        return ids.repeat_interleave(b.samples)

    def rollout(self):
        torch.manual_seed(self.bench.seed * 1000 + self.step)
        return super().rollout()

    def _chunked(self, fn, prompts, responses, mask):
        """The log-prob passes (old policy, reference, values), timed."""
        sync(self.device)
        t = time.perf_counter()
        out = super()._chunked(fn, prompts, responses, mask)
        sync(self.device)
        self.logprob_seconds += time.perf_counter() - t
        return out


def trainer_config(cfg, device, fused_lm_head):
    """The trainer's Config for a BenchConfig (models in the bench's dtype, so no autocast)."""
    B = cfg.batch
    ppo = PPOConfig(steps=2 ** 30, rollout_batch=B, minibatch=-(-B // cfg.mini_batches), micro_batch=cfg.micro_batch,
                    epochs=cfg.ppo_epochs, lr=cfg.lr, value_lr=cfg.lr, clip_low=cfg.clip, value_clip=cfg.vf_clip,
                    gamma=cfg.gamma, lam=cfg.lam, entropy_coef=cfg.ent_coef, max_grad_norm=cfg.max_grad_norm,
                    temperature=cfg.temperature, fused_lm_head=fused_lm_head, kl_estimator="k1",
                    whiten_advantages=True, loss_agg="token-mean", approx_kl_warn=float("inf"), kl_warn=float("inf"))
    return Config(algo="ppo", beta=cfg.kl_coef, device=device.type, dtype="float32", seed=cfg.seed, ppo=ppo)


def build_trainer(cfg, device, dtype, mode):
    """The trainer of ``mode`` ("on" or "off"): the same models for every call with the same config."""
    return BenchTrainer(BenchTask(cfg, device, dtype), mode)


def ppo_step(trainer, mark=None):
    """One timed PPO step -> {"rollout", "logprobs", "update", "other", "step"} seconds and
    the step's loss figures. Each phase ends with a device synchronize. ``mark(name)``, if
    given, is called after the rollout ("rollout") and after the scoring ("scored"), outside
    the timed spans."""
    device = trainer.device
    sync(device)
    t0 = time.perf_counter()
    prompt_ids, prompts, responses = trainer.rollout()
    sync(device)
    t1 = time.perf_counter()
    untimed = _mark(mark, "rollout")
    trainer.logprob_seconds = 0.0
    batch = trainer.gather(trainer.score_rollout(prompt_ids, prompts, responses))   # torchrun: every rank's rows
    sync(device)
    t2 = time.perf_counter()
    untimed2 = _mark(mark, "scored")
    stats = trainer.update(batch)
    sync(device)
    t3 = time.perf_counter()
    trainer.step += 1
    lp = trainer.logprob_seconds
    return {"rollout": t1 - t0, "logprobs": lp, "update": t3 - t2 - untimed2, "other": t2 - t1 - untimed - lp,
            "step": t3 - t0 - untimed - untimed2,
            "policy_loss": stats["policy_loss"], "value_loss": stats["value_loss"],
            "score": float(batch["score"].mean())}


def _mark(mark, name):
    """mark(name) if given -> the seconds it took (0.0 without one)."""
    if mark is None:
        return 0.0
    t = time.perf_counter()
    mark(name)
    return time.perf_counter() - t
