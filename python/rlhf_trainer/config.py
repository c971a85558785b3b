"""Configuration: dataclasses with YAML load/save, checked when built.

Sizes are checked up front (a trainer that dies at step 300 because a minibatch does
not divide the rollout batch wastes an afternoon), and the batch accounting is printed
so a reader sees what one step does.

One key, ``algo``, picks the algorithm; each algorithm has its own section holding exactly
the options that act on it (``ppo:``, ``grpo:``, ``rloo:``, ``reinforce_pp:``, ``best_of_n:``,
``expert_iteration:``), with that algorithm's tuned defaults. A section, or a top-level
option, that would have no effect on the chosen algorithm is refused, not ignored.
``beta``, the KL coefficient of the objective J = E[r] - beta KL(pi || pi_ref), is
top-level: every algorithm is evaluated on the same J.
"""

import dataclasses
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """An inconsistent configuration."""


ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "best_of_n", "expert_iteration")
# the critic-free algorithms and the rk.group_advantages mode each uses
GROUP_MODES = {"grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce++"}
POLICY_GRADIENT = ("ppo",) + tuple(GROUP_MODES)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


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

    def check(self, algo):
        if self.loss not in ("bt", "ranking"):
            raise ConfigError("reward_model.loss must be 'bt' or 'ranking', got %r" % self.loss)
        if self.loss == "ranking" and self.k < 2:
            raise ConfigError("reward_model.k must be >= 2 for a ranking loss, got %d" % self.k)
        if self.batch_size > self.num_train:
            raise ConfigError("reward_model.batch_size=%d exceeds num_train=%d" % (self.batch_size, self.num_train))


@dataclass
class PolicyGradientConfig:
    """Options every policy-gradient algorithm (ppo, grpo, rloo, reinforce_pp) acts on.
    The KL coefficient is the top-level ``beta`` (the initial one when adaptive)."""
    steps: int = 100
    rollout_batch: int = 256          # responses generated per step
    minibatch: int = 64               # responses per optimizer step
    micro_batch: int = 32             # responses per forward/backward (gradient accumulation)
    epochs: int = 2                   # passes over each rollout batch
    lr: float = 2e-3
    clip_low: float = 0.2
    clip_high: float = None
    dual_clip: float = None
    loss_agg: str = "token-mean"
    adaptive_kl: bool = False
    kl_target: float = 6.0            # per-sequence KL sum the adaptive controller aims for
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    fused_lm_head: bool = True        # log-probabilities from hidden states with linear_token_logprobs
    missing_eos_penalty: float = None  # added to the score of responses without EOS (stop_at_eos only)
    approx_kl_warn: float = 0.5       # warn when a step's approx_kl exceeds this
    kl_warn: float = 50.0             # warn when the per-sequence KL exceeds this

    def check(self, algo):
        s = algo
        for name in ("steps", "rollout_batch", "minibatch", "micro_batch", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError("%s.%s must be >= 1, got %d" % (s, name, getattr(self, name)))
        if self.rollout_batch % self.minibatch:
            raise ConfigError("%s.rollout_batch=%d is not divisible by %s.minibatch=%d"
                              % (s, self.rollout_batch, s, self.minibatch))
        if self.minibatch % self.micro_batch:
            raise ConfigError("%s.minibatch=%d is not divisible by %s.micro_batch=%d"
                              % (s, self.minibatch, s, self.micro_batch))
        if self.loss_agg not in LOSS_AGGS:
            raise ConfigError("%s.loss_agg %r is not one of the four modes (%s)" % (s, self.loss_agg,
                                                                                   ", ".join(LOSS_AGGS)))
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError("%s.dual_clip must be > 1, got %g" % (s, self.dual_clip))
        if self.lr <= 0:
            raise ConfigError("%s.lr must be > 0, got %g" % (s, self.lr))

    def accounting(self):
        mbs = self.rollout_batch // self.minibatch
        acc = self.minibatch // self.micro_batch
        return ("batch accounting: %d rollouts -> %d minibatches of %d -> %d micro-batches of %d each "
                "(gradient accumulation %d); %d epochs = %d optimizer steps per PPO step"
                % (self.rollout_batch, mbs, self.minibatch, acc, self.micro_batch, acc, self.epochs,
                   mbs * self.epochs))


@dataclass
class PPOConfig(PolicyGradientConfig):
    """PPO with a value model, GAE and a per-token KL penalty in the reward."""
    value_lr: float = 2e-3
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"
    whiten_advantages: bool = True

    def check(self, algo):
        super().check(algo)
        if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
            raise ConfigError("ppo.kl_estimator must be k1, k2, k3 or abs, got %r" % self.kl_estimator)


@dataclass
class GroupConfig(PolicyGradientConfig):
    """A critic-free algorithm: ``group_size`` responses per prompt, advantages from
    ``rk.group_advantages`` over each group, no value model. The KL penalty is the
    sequence-level k1 estimate in the reward, so there is no kl_estimator option."""
    group_size: int = 8

    def check(self, algo):
        super().check(algo)
        if self.group_size < 2:
            why = ("the group baseline needs at least two responses per prompt" if algo != "reinforce_pp" else
                   "REINFORCE++ here is its group-baseline form: rk.group_advantages gives a group of one advantage 0")
            raise ConfigError("%s.group_size must be >= 2 (%s), got %d" % (algo, why, self.group_size))
        if self.rollout_batch % self.group_size:
            raise ConfigError("%s.rollout_batch=%d is not divisible by %s.group_size=%d"
                              % (algo, self.rollout_batch, algo, self.group_size))

    def accounting(self):
        return ("%d prompts x %d responses each; " % (self.rollout_batch // self.group_size, self.group_size)
                + super().accounting().replace("PPO step", "step"))


# Tuned defaults of the critic-free algorithms (docs/algorithms.md says what was tried): twice
# PPO's rollout batch (64 prompts x 8) and half its learning rate. Group-normalized advantages
# do not shrink as the policy nears the optimum, so the step size sets a noise floor.
@dataclass
class _TunedGroupConfig(GroupConfig):
    steps: int = 150
    rollout_batch: int = 512
    minibatch: int = 128
    lr: float = 1e-3


@dataclass
class GRPOConfig(_TunedGroupConfig):
    loss_agg: str = "seq-mean-token-mean"   # DeepSeekMath's 1/|o_i| sum_t, then the mean over the group


@dataclass
class RLOOConfig(_TunedGroupConfig):
    loss_agg: str = "seq-mean-token-sum"    # REINFORCE on the sequence's log-probability


@dataclass
class ReinforcePPConfig(_TunedGroupConfig):
    loss_agg: str = "token-mean"            # as OpenRLHF's REINFORCE++


@dataclass
class BestOfNConfig:
    """A decoding policy, not a training run: n samples from pi_ref, the reward model's best."""
    n: int = 2048                     # the n of largest exact J on the toy task (the curve in docs/compare.md)
    sample_queries: int = 128         # prompts actually served by sampling, to check the exact figures (0: none)

    def check(self, algo):
        if self.n < 1:
            raise ConfigError("best_of_n.n must be >= 1, got %d" % self.n)
        if self.sample_queries < 0:
            raise ConfigError("best_of_n.sample_queries must be >= 0, got %d" % self.sample_queries)

    def accounting(self):
        return ("best-of-%d from the reference: %d samples per query, no training" % (self.n, self.n))


@dataclass
class ExpertIterationConfig:
    """Rounds of best-of-n sampling from the current policy, then supervised fine-tuning
    (cross-entropy) of the policy on the winners."""
    rounds: int = 20
    prompts_per_round: int = 1024     # best-of-n queries per round
    n: int = 4                        # samples per query
    epochs: int = 2                   # SFT passes over the round's winners
    minibatch: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    fused_lm_head: bool = True

    def check(self, algo):
        for name in ("rounds", "prompts_per_round", "n", "epochs", "minibatch"):
            if getattr(self, name) < 1:
                raise ConfigError("expert_iteration.%s must be >= 1, got %d" % (name, getattr(self, name)))
        if self.prompts_per_round % self.minibatch:
            raise ConfigError("expert_iteration.prompts_per_round=%d is not divisible by "
                              "expert_iteration.minibatch=%d" % (self.prompts_per_round, self.minibatch))
        if self.lr <= 0:
            raise ConfigError("expert_iteration.lr must be > 0, got %g" % self.lr)

    def accounting(self):
        return ("expert iteration: %d rounds x %d prompts x best-of-%d = %d samples per round; SFT on the %d "
                "winners, %d epochs of %d minibatches of %d"
                % (self.rounds, self.prompts_per_round, self.n, self.prompts_per_round * self.n,
                   self.prompts_per_round, self.epochs, self.prompts_per_round // self.minibatch, self.minibatch))


SECTIONS = {"ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig, "reinforce_pp": ReinforcePPConfig,
            "best_of_n": BestOfNConfig, "expert_iteration": ExpertIterationConfig}
COMMON = {"model": ModelConfig, "task": TaskConfig, "reward_model": RewardModelConfig}
# top-level options and the algorithms they act on (the others act on all)
TOP_LEVEL_FOR = {"checkpoint_every": POLICY_GRADIENT + ("expert_iteration",), "eval_every": POLICY_GRADIENT}


@dataclass
class Config:
    algo: str = "ppo"                 # ppo | grpo | rloo | reinforce_pp | best_of_n | expert_iteration
    beta: float = 0.1                 # KL coefficient of J = E[r] - beta KL(pi || pi_ref), in reward-model units
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    # the section of the chosen algorithm (built with its defaults when absent); the others stay None
    ppo: PPOConfig = None
    grpo: GRPOConfig = None
    rloo: RLOOConfig = None
    reinforce_pp: ReinforcePPConfig = None
    best_of_n: BestOfNConfig = None
    expert_iteration: ExpertIterationConfig = None
    seed: int = 0
    checkpoint_every: int = 0         # steps (rounds) between checkpoints (0: only at the end)
    eval_every: int = 10              # steps between exact evaluations of J

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ConfigError("algo must be one of %s, got %r" % (", ".join(ALGOS), self.algo))
        if not self.beta >= 0:
            raise ConfigError("beta must be >= 0, got %r" % self.beta)
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if name == self.algo:
                if section is None:
                    setattr(self, name, cls())
                elif type(section) is not cls:
                    raise ConfigError("%s: expected a %s, got %s" % (name, cls.__name__, type(section).__name__))
            elif section is not None:
                raise ConfigError("a %s section has no effect with algo: %s (give only the %s section)"
                                  % (name, self.algo, self.algo))
        for name, algos in TOP_LEVEL_FOR.items():
            if self.algo not in algos and getattr(self, name) != _default(Config, name):
                raise ConfigError("%s has no effect with algo: %s" % (name, self.algo))
        self.task.steps = tuple(self.task.steps)
        for part in (self.model, self.task):
            part.check()
        self.reward_model.check(self.algo)
        self.section.check(self.algo)
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1, got %d" % self.eval_every)
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0, got %d" % self.checkpoint_every)

    @property
    def section(self):
        """The chosen algorithm's options."""
        return getattr(self, self.algo)

    def accounting(self):
        return self.section.accounting()

    def to_dict(self):
        """Every option that acts on the chosen algorithm (and none that does not)."""
        d = dataclasses.asdict(self)
        d["task"]["steps"] = list(d["task"]["steps"])
        for name in SECTIONS:
            if name != self.algo:
                del d[name]
        for name, algos in TOP_LEVEL_FOR.items():
            if self.algo not in algos:
                del d[name]
        return d

    def save(self, path):
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_dict(cls, d):
        d = dict(d or {})
        algo = d.get("algo", _default(cls, "algo"))
        top = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in COMMON or key in SECTIONS:
                part = COMMON.get(key) or SECTIONS[key]
                if key in SECTIONS and key != algo:
                    raise ConfigError("a %s section has no effect with algo: %s (give only the %s section)"
                                      % (key, algo, algo))
                if not isinstance(value, dict):
                    raise ConfigError("%s must be a mapping of options, got %r" % (key, value))
                known = {f.name for f in dataclasses.fields(part)}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(_unknown_options(key, unknown))
                kwargs[key] = part(**value)
            elif key in top:
                if key in TOP_LEVEL_FOR and algo not in TOP_LEVEL_FOR[key]:
                    raise ConfigError("%s has no effect with algo: %s" % (key, algo))
                kwargs[key] = value
            else:
                raise ConfigError("unknown config section %r" % key)
        return cls(**kwargs)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))


def _unknown_options(section, unknown):
    """The message for options a section does not have: those another algorithm acts on are
    named as such (they would have no effect here), the others as unknown."""
    elsewhere, really = [], []
    for name in sorted(unknown):
        owners = [a for a, cls in SECTIONS.items()
                  if a != section and name in {f.name for f in dataclasses.fields(cls)}]
        if name == "beta" and section in SECTIONS:
            elsewhere.append("beta is the top-level option (the objective's KL coefficient, shared by every algo)")
        elif owners and section in SECTIONS:
            elsewhere.append("%s has no effect with algo: %s (it is an option of %s)"
                             % (name, section, ", ".join(owners)))
        else:
            really.append(name)
    parts = elsewhere + (["unknown %s option(s): %s" % (section, ", ".join(really))] if really else [])
    return "%s: %s" % (section, "; ".join(parts)) if elsewhere else parts[0]


def _default(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default


def algo_config(algo, **top):
    """The tuned default configuration of ``algo`` (top-level options may be overridden)."""
    return Config(algo=algo, **top)
