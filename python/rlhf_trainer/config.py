"""Configuration: dataclasses with YAML load/save, checked when built.

Sizes are checked up front (a trainer that dies at step 300 because a minibatch does
not divide the rollout batch wastes an afternoon), and the batch accounting is printed
so a reader sees what one PPO step does.
"""

import dataclasses
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """An inconsistent configuration."""


@dataclass
class ModelConfig:
    """A tiny GPT-2 built from a config (no downloads)."""
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    seed: int = 0

    def check(self):
        if self.n_layer < 1 or self.n_embd < 1 or self.n_head < 1:
            raise ConfigError("model: n_layer, n_embd and n_head must be positive, got %d, %d, %d"
                              % (self.n_layer, self.n_embd, self.n_head))
        if self.n_embd % self.n_head:
            raise ConfigError("model: n_embd=%d must be divisible by n_head=%d" % (self.n_embd, self.n_head))


@dataclass
class TaskConfig:
    """The toy task: prompts a, a+d, a+2d (mod `modulus`) and responses of exactly
    `response_len` tokens; the hidden rule rewards each response token that continues
    the pattern. Token ids: 0..modulus-1 are numbers, then PAD and EOS."""
    modulus: int = 8
    steps: tuple = (1, 2, 3)          # the strides d the prompts use
    prompt_len: int = 3
    response_len: int = 3
    pad_token_id: int = 8
    eos_token_id: int = 9
    vocab_size: int = 10
    stop_at_eos: bool = False         # the toy's responses have a fixed length

    def check(self):
        if self.pad_token_id == self.eos_token_id:
            raise ConfigError("task: pad_token_id and eos_token_id are both %d; padding would be read as "
                              "end of sequence" % self.pad_token_id)
        for name in ("pad_token_id", "eos_token_id"):
            tid = getattr(self, name)
            if not self.modulus <= tid < self.vocab_size:
                raise ConfigError("task: %s=%d must be a special token in [modulus=%d, vocab_size=%d)"
                                  % (name, tid, self.modulus, self.vocab_size))
        if self.prompt_len < 2 or self.response_len < 1:
            raise ConfigError("task: prompt_len must be >= 2 and response_len >= 1, got %d and %d"
                              % (self.prompt_len, self.response_len))
        if self.vocab_size ** self.response_len > 200_000:
            raise ConfigError("task: vocab_size**response_len = %d responses per prompt is too many to "
                              "enumerate for the exact optimum" % self.vocab_size ** self.response_len)


@dataclass
class RewardModelConfig:
    loss: str = "bt"                  # "bt" (pairwise) or "ranking" (K-way)
    num_train: int = 16384            # comparisons (pairs, or rankings of `k`)
    num_eval: int = 1024
    k: int = 4                        # responses per ranking when loss="ranking"
    batch_size: int = 128
    steps: int = 300
    lr: float = 3e-3
    label_smoothing: float = 0.0
    center_coef: float = 0.0

    def check(self):
        if self.loss not in ("bt", "ranking"):
            raise ConfigError("reward_model.loss must be 'bt' or 'ranking', got %r" % self.loss)
        if self.loss == "ranking" and self.k < 2:
            raise ConfigError("reward_model.k must be >= 2 for a ranking loss, got %d" % self.k)
        if self.batch_size > self.num_train:
            raise ConfigError("reward_model.batch_size=%d exceeds num_train=%d" % (self.batch_size, self.num_train))


@dataclass
class PPOConfig:
    steps: int = 100
    rollout_batch: int = 256          # responses generated per PPO step
    minibatch: int = 64               # responses per optimizer step
    micro_batch: int = 32             # responses per forward/backward (gradient accumulation)
    epochs: int = 2                   # passes over each rollout batch
    lr: float = 2e-3
    value_lr: float = 2e-3
    clip_low: float = 0.2
    clip_high: float = None
    dual_clip: float = None
    value_clip: float = 0.2
    loss_agg: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    beta: float = 0.1                 # KL coefficient (initial, when adaptive), in reward-model score units
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0            # per-sequence KL sum the adaptive controller aims for
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    fused_lm_head: bool = True        # log-probabilities from hidden states with linear_token_logprobs
    missing_eos_penalty: float = None  # added to the score of responses without EOS (stop_at_eos only)
    whiten_advantages: bool = True
    approx_kl_warn: float = 0.5       # warn when a step's approx_kl exceeds this
    kl_warn: float = 50.0             # warn when the per-sequence KL exceeds this

    def check(self):
        for name in ("steps", "rollout_batch", "minibatch", "micro_batch", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError("ppo.%s must be >= 1, got %d" % (name, getattr(self, name)))
        if self.rollout_batch % self.minibatch:
            raise ConfigError("ppo.rollout_batch=%d is not divisible by ppo.minibatch=%d"
                              % (self.rollout_batch, self.minibatch))
        if self.minibatch % self.micro_batch:
            raise ConfigError("ppo.minibatch=%d is not divisible by ppo.micro_batch=%d"
                              % (self.minibatch, self.micro_batch))
        if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
            raise ConfigError("ppo.kl_estimator must be k1, k2, k3 or abs, got %r" % self.kl_estimator)
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"):
            raise ConfigError("ppo.loss_agg %r is not one of the four modes" % self.loss_agg)
        if self.beta < 0:
            raise ConfigError("ppo.beta must be >= 0, got %g" % self.beta)
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError("ppo.dual_clip must be > 1, got %g" % self.dual_clip)

    def accounting(self):
        mbs = self.rollout_batch // self.minibatch
        acc = self.minibatch // self.micro_batch
        return ("batch accounting: %d rollouts -> %d minibatches of %d -> %d micro-batches of %d each "
                "(gradient accumulation %d); %d epochs = %d optimizer steps per PPO step"
                % (self.rollout_batch, mbs, self.minibatch, acc, self.micro_batch, acc, self.epochs,
                   mbs * self.epochs))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    seed: int = 0
    checkpoint_every: int = 0         # PPO steps between checkpoints (0: only at the end)
    eval_every: int = 10              # PPO steps between exact evaluations of J

    def __post_init__(self):
        self.task.steps = tuple(self.task.steps)
        for part in (self.model, self.task, self.reward_model, self.ppo):
            part.check()
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1, got %d" % self.eval_every)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["task"]["steps"] = list(d["task"]["steps"])
        return d

    def save(self, path):
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_dict(cls, d):
        parts = {"model": ModelConfig, "task": TaskConfig, "reward_model": RewardModelConfig, "ppo": PPOConfig}
        kwargs = {}
        for key, value in (d or {}).items():
            if key in parts:
                known = {f.name for f in dataclasses.fields(parts[key])}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError("unknown %s option(s): %s" % (key, ", ".join(sorted(unknown))))
                kwargs[key] = parts[key](**value)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ConfigError("unknown config section %r" % key)
        return cls(**kwargs)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))
