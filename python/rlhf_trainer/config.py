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

Two kinds of run share this file. The toy task (the demo, ``compare``) has the sections
``model``, ``task`` and ``reward_model``. A run on real models (``rlhf_trainer train``) has a
``policy`` section instead, with ``data``, ``reward``, ``generation`` and optionally ``value``
and ``rm`` (read by ``rlhf_trainer rm``, and by ``rlhf_trainer train`` with an ``iterate`` section);
the toy sections are then refused. ``device``,
``dtype`` and ``gradient_checkpointing`` are top-level and act on both.
"""

import dataclasses
import functools
import typing
from dataclasses import dataclass

import pydantic
import yaml

from rlhf_kernels._layout import KL_KINDS, LOSS_AGGS, SCORE_KINDS


class ConfigError(ValueError):
    """An inconsistent configuration."""


class InputError(ValueError):
    """A model, tokenizer, data file, reward function or run directory the configuration or the
    command line points at is unusable (raised before any model is loaded where possible)."""


class RewardFunctionError(InputError):
    """A reward function raised or returned something unusable. The message names the config key,
    the function, the batch and (once the trainer adds it, ``step``) the step; when the function
    raised, its exception is the cause (``raise ... from``), so its traceback is kept."""

    def __init__(self, where, what):
        super().__init__(where, what)
        self.where, self.what, self.step = where, what, None

    def __str__(self):
        return "%s%s %s" % (self.where, "" if self.step is None else " at step %d" % self.step, self.what)


ALGOS = ("ppo", "grpo", "rloo", "reinforce_pp", "best_of_n", "expert_iteration")
# the critic-free algorithms and the rk.group_advantages mode each uses
GROUP_MODES = {"grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce++"}
POLICY_GRADIENT = ("ppo",) + tuple(GROUP_MODES)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
RM_LOSSES = ("bt", "ranking", "regression", "ordinal")   # the toy reward model: comparisons, then ratings
SCORE_LOSSES = SCORE_KINDS   # rk.score_loss's kinds
RM_UPDATES = ("scratch", "finetune")   # iterate.rm_update


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
    """The toy task's reward model, from comparisons (``bt`` pairs or ``ranking`` lists) or from
    1..7 Likert ratings (``regression`` or ``ordinal``, rk.score_loss); ``noise``: the simulated
    annotator's (rlhf_trainer/scores.py), on the training data only."""
    loss: str = "bt"                  # "bt" (pairwise), "ranking" (K-way), "regression" or "ordinal" (ratings)
    num_train: int = 16384            # comparisons (pairs, or rankings of `k`), or rated responses
    num_eval: int = 1024
    k: int = 4                        # responses per ranking when loss="ranking"
    batch_size: int = 128
    steps: int = 300
    lr: float = 3e-3
    label_smoothing: float = 0.0
    center_coef: float = 0.0
    noise: float = 0.0                # sd of the annotator's latent quality (0: exact labels)

    def check(self, algo):
        if self.loss not in RM_LOSSES:
            raise ConfigError("reward_model.loss must be one of %s, got %r" % (", ".join(RM_LOSSES), self.loss))
        if not self.noise >= 0:
            raise ConfigError("reward_model.noise must be >= 0, got %r" % self.noise)
        if self.loss in SCORE_LOSSES:
            for name in ("label_smoothing", "center_coef"):
                if getattr(self, name) != 0:
                    raise ConfigError("reward_model.%s has no effect with reward_model.loss: %s (a loss of "
                                      "comparisons: bt)" % (name, self.loss))
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
    fused_lm_head: bool = True        # from hidden states: linear_token_logprobs, and linear_policy_loss
                                      # for the policy update (token-mean, or no entropy term)
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
            raise ConfigError("%s.loss_agg must be one of %s, got %r" % (s, ", ".join(LOSS_AGGS), self.loss_agg))
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
        if self.kl_estimator not in KL_KINDS:
            raise ConfigError("ppo.kl_estimator must be %s, got %r" % (" or ".join([", ".join(KL_KINDS[:-1]),
                                                                                     KL_KINDS[-1]]),
                                                                         self.kl_estimator))


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


@dataclass
class IterateSection:
    """Iterated RLHF: ``rounds`` of (train the policy for the algorithm's ``steps``; sample
    ``comparisons_per_round`` pairs from it; label them; train the reward model on every comparison
    so far, the initial ones included). ``rm_update``: the reward model is retrained from its
    initialization (``scratch``) or fine-tuned from the previous round's (``finetune``).

    On the toy task (``iterate.py``, ``rlhf_trainer demo``) ``labeler`` is ``rule``, the hidden rule
    with Bradley-Terry noise: a labeler prefers a over b with probability sigmoid((n_a - n_b) /
    label_noise), n the number of rule-following tokens (0: always the rule's order; a tie is a coin
    flip). On real models (``iterate_hf.py``, ``rlhf_trainer train``) it is ``"module:function"``,
    called as fn(prompts, responses_a, responses_b) -> one number in [0, 1] per pair, the probability
    that a is preferred (``iterate_hf.label``); the reward model is trained in the run from ``rm.model``
    on ``rm.data``, and ``true_reward``, a ``"module:function"`` like ``reward.fn`` that is logged each
    round but never trained on, is optional."""
    rounds: int = 3
    comparisons_per_round: int = 1024
    labeler: str = "rule"
    label_noise: float = 0.5          # the toy task's labeler only
    rm_update: str = "scratch"
    true_reward: str = None           # real models only

    def check(self, cfg):
        """Checked against the whole config (cfg): the toy task's options or the real models'."""
        if cfg.algo not in POLICY_GRADIENT:
            raise ConfigError("iterate: iterated RLHF trains a policy: algo must be one of %s, got %r"
                              % (", ".join(POLICY_GRADIENT), cfg.algo))
        for name in ("rounds", "comparisons_per_round"):
            if getattr(self, name) < 1:
                raise ConfigError("iterate.%s must be >= 1, got %d" % (name, getattr(self, name)))
        if self.rm_update not in RM_UPDATES:
            raise ConfigError("iterate.rm_update must be one of %s, got %r" % (", ".join(RM_UPDATES), self.rm_update))
        if cfg.real:
            self._check_real(cfg)
            return
        if self.labeler != "rule":
            raise ConfigError("iterate.labeler must be 'rule' on the toy task (the hidden rule; a \"module:function\" "
                              "labeler is for real models), got %r" % (self.labeler,))
        if not self.label_noise >= 0:
            raise ConfigError("iterate.label_noise must be >= 0, got %r" % self.label_noise)

    def _check_real(self, cfg):
        if not _module_function(self.labeler):
            raise ConfigError("iterate.labeler must be \"module:function\" on real models (a function labelling "
                              "pairs of responses; 'rule' is the toy task's hidden rule), got %r" % (self.labeler,))
        if self.true_reward is not None and not _module_function(self.true_reward):
            raise ConfigError("iterate.true_reward must be \"module:function\" or null, got %r" % (self.true_reward,))
        if cfg.rm is None:
            raise ConfigError("iterate: on real models the reward model is trained in the run: give an rm section "
                              "(rm.model, and rm.data with the initial preference pairs)")
        if cfg.reward is not None and cfg.reward.model is not None:
            raise ConfigError("reward.model has no effect with iterate (the reward model is trained in the run from "
                              "rm.model on rm.data and the labelled pairs); leave it out (reward.fn, if given, is "
                              "added to its score)")


def _module_function(spec):
    return isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))


# ---------- runs on real models (rlhf_trainer train / rm) ----------
@dataclass
class PolicySection:
    """The policy: a causal LM saved with save_pretrained (a local folder) or a Hugging Face id
    already in the local cache (nothing is downloaded; trust_remote_code is off). Its tokenizer
    is the one saved with it. The reference is a frozen copy of it."""
    model: str = None

    def check(self, algo):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("policy.model is required: a local model folder or a cached Hugging Face id")


@dataclass
class ValueSection:
    """The value model of PPO: by default the policy's architecture and weights with a new scalar head."""
    model: str = None

    def check(self, algo):
        pass


@dataclass
class RewardSection:
    """The reward: a reward model (a sequence-classification model with one output, such as
    ``rlhf_trainer rm`` saves), a Python function ``fn: "module:function"`` called as
    fn(prompts: list[str], responses: list[str]) -> one number per pair, or both (summed)."""
    model: str = None
    fn: str = None

    def check(self, algo):
        if self.model is None and self.fn is None:
            raise ConfigError("reward: give reward.model (a reward model) or reward.fn (\"module:function\"), or both")
        if self.fn is not None and not _module_function(self.fn):
            raise ConfigError("reward.fn must be \"module:function\", got %r" % (self.fn,))


@dataclass
class DataSection:
    """The prompts: a JSONL file (one object per line, the prompt under ``key``: a string, or a
    list of chat messages) or a text file (one prompt per line). With a tokenizer that has a chat
    template, string prompts become a user message with the generation prompt added."""
    prompts: str = None
    key: str = "prompt"
    chat_template: bool = True        # apply the tokenizer's chat template when it has one
    max_prompt_len: int = 512         # tokens; a longer prompt is an error that names its line

    def check(self, algo):
        if not isinstance(self.prompts, str) or not self.prompts:
            raise ConfigError("data.prompts is required: a .jsonl file or a text file with one prompt per line")
        if self.max_prompt_len < 1:
            raise ConfigError("data.max_prompt_len must be >= 1, got %d" % self.max_prompt_len)


@dataclass
class GenerationSection:
    """Sampling settings of the rollouts. ``temperature`` is also the temperature of every
    log-probability the trainer computes, so they are those of the distribution sampled from
    (before top-p truncation: with top_p < 1 the rollouts are slightly off-policy, as in other
    trainers)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def check(self, algo):
        if not self.temperature > 0:
            raise ConfigError("generation.temperature must be > 0, got %r" % self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError("generation.top_p must be in (0, 1], got %r" % self.top_p)
        if self.max_new_tokens < 1:
            raise ConfigError("generation.max_new_tokens must be >= 1, got %d" % self.max_new_tokens)


@dataclass
class RMSection:
    """Reward-model training (``rlhf_trainer rm``): from ``model`` (a causal LM or a sequence
    classifier; a new scalar head is added) on ``data``, a JSONL of {"prompt", "chosen",
    "rejected"} (Bradley-Terry, rk.bt_loss) or {"prompt", "ranked": [best, ..., worst]}
    (rk.ranking_loss), or {"prompt", "response", "score"} (rk.score_loss, ``score_loss`` regression or
    ordinal, the scores in [``score_min``, ``score_max``]); ``eval_data`` in the same format gives the
    held-out accuracy."""
    model: str = None
    data: str = None
    eval_data: str = None
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-5
    max_len: int = 1024
    label_smoothing: float = 0.0
    center_coef: float = 0.0
    score_min: float = None           # the range of the scores of {"prompt", "response", "score"} lines
    score_max: float = None
    score_loss: str = "regression"    # regression | ordinal (integer levels score_min..score_max)

    def check(self, algo):
        for name in ("model", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError("rm.%s is required" % name)
        for name in ("epochs", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError("rm.%s must be >= 1, got %d" % (name, getattr(self, name)))
        if self.lr <= 0:
            raise ConfigError("rm.lr must be > 0, got %g" % self.lr)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("rm.label_smoothing must be in [0, 0.5), got %g" % self.label_smoothing)
        if self.score_loss not in SCORE_LOSSES:
            raise ConfigError("rm.score_loss must be one of %s, got %r" % (", ".join(SCORE_LOSSES), self.score_loss))
        if (self.score_min is None) != (self.score_max is None):
            raise ConfigError("rm.score_min and rm.score_max are given together (the scores' range), got %r and %r"
                              % (self.score_min, self.score_max))
        if self.score_min is not None:
            if not self.score_min < self.score_max:
                raise ConfigError("rm.score_min must be < rm.score_max, got %g and %g" % (self.score_min,
                                                                                          self.score_max))
            if self.score_loss == "ordinal" and not (float(self.score_min).is_integer()
                                                     and float(self.score_max).is_integer()):
                raise ConfigError("rm.score_min and rm.score_max must be integers with rm.score_loss: ordinal "
                                  "(its levels are score_min, score_min + 1, ..., score_max), got %g and %g"
                                  % (self.score_min, self.score_max))

    def check_data(self, kind):
        """The score options against the kind of rm.data ('bt', 'ranking' or 'score')."""
        if kind == "score" and self.score_min is None:
            raise ConfigError("rm.score_min and rm.score_max are required with score lines in rm.data (the "
                              "scores' range, e.g. score_min: 1, score_max: 7)")
        if kind != "score":
            for name in ("score_min", "score_max", "score_loss"):
                if getattr(self, name) != _default(RMSection, name):
                    raise ConfigError("rm.%s has no effect on rm.data of %s (it acts on score lines)"
                                      % (name, "pairs" if kind == "bt" else "rankings"))
        elif self.label_smoothing or self.center_coef:
            raise ConfigError("rm.%s has no effect on score lines (it acts on pairs)"
                              % ("label_smoothing" if self.label_smoothing else "center_coef"))


SECTIONS = {"ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig, "reinforce_pp": ReinforcePPConfig,
            "best_of_n": BestOfNConfig, "expert_iteration": ExpertIterationConfig}
COMMON = {"model": ModelConfig, "task": TaskConfig, "reward_model": RewardModelConfig}   # the toy task's
@dataclass
class ParallelSection:
    """Data parallelism under torchrun (ignored by a one-process run): FSDP2's options."""
    reshard_after_forward: bool = True   # free each layer's gathered weights after its forward (less memory,
                                         # one more all-gather in the backward)
    offload_reference: bool = False      # keep the frozen reference's shards on the CPU


# sections that are absent unless given (they switch a feature on)
OPTIONAL = {"iterate": IterateSection, "parallel": ParallelSection}
REAL = {"policy": PolicySection, "value": ValueSection, "reward": RewardSection, "data": DataSection,
        "generation": GenerationSection, "rm": RMSection}
# the algorithms `rlhf_trainer train` runs on real models (best_of_n and expert_iteration need the toy
# task's exact enumeration or its fixed-length responses)
REAL_ALGOS = POLICY_GRADIENT
# Which option acts on which algorithm and kind of run, stated once. An algorithm's section acts on
# that algorithm only (SECTIONS); these options act only where the table says: key (a top-level
# option or section, or "section.option"; "<algo>" is the chosen algorithm's section) -> (the
# algorithms it acts on, or None: all; the kind of run, "toy" or "real", or None: both; why it has
# no effect elsewhere, said of the kind of run where one is named, else of the algorithm). Every
# other option acts on every algorithm and run (value makes a run one on real models). Config
# refuses an option given where it has no effect (from_dict: a key given; __post_init__: a value
# other than the default) and to_dict leaves it out, all from this table (``_no_effect``).
ACTS_ON = {
    "checkpoint_every": (POLICY_GRADIENT + ("expert_iteration",), None, ""),
    "eval_every": (POLICY_GRADIENT, "toy", " (J is evaluated exactly on the toy task only)"),
    "value": (("ppo",), None, " (only ppo has a value model)"),
    "<algo>.temperature": (None, "toy", " (on real models the temperature is generation.temperature: the sampling "
                                        "and the log-probability temperature)"),
    "iterate.label_noise": (None, "toy", " (it is the toy labeler's noise; iterate.labeler may return "
                                         "probabilities instead of 0 or 1)"),
    "iterate.true_reward": (None, "real", " (its hidden rule is the true reward, logged exactly as J_rule)"),
}
RUN_NAMES = {"toy": "the toy task", "real": "real models"}


def _no_effect(key, algo, real):
    """Why ``key`` (as in ACTS_ON, or an algorithm's section) has no effect on a run of ``algo``
    (on real models or not; None: either), or None where it acts."""
    if key in SECTIONS:
        if key != algo:
            return "a %s section has no effect with algo: %s (give only the %s section)" % (key, algo, algo)
        return None
    section, _, option = key.partition(".")
    algos, run, why = ACTS_ON.get("<algo>." + option if option and section == algo else key, (None, None, ""))
    if algos is not None and algo not in algos:
        return "%s has no effect with algo: %s%s" % (key, algo, "" if run else why)
    if run is not None and real is not None and run != ("real" if real else "toy"):
        return "%s has no effect on %s%s" % (key, RUN_NAMES["real" if real else "toy"], why)
    return None


@dataclass
class Config:
    algo: str = "ppo"                 # ppo | grpo | rloo | reinforce_pp | best_of_n | expert_iteration
    beta: float = 0.1                 # KL coefficient of J = E[r] - beta KL(pi || pi_ref), in reward-model units
    device: str = "auto"              # auto (CUDA when available) | cpu | cuda
    dtype: str = "float32"            # float32 | bfloat16 (autocast; parameters and optimizer state stay float32)
    gradient_checkpointing: bool = False
    # the toy task's sections (built with their defaults unless the run is on real models)
    model: ModelConfig = None
    task: TaskConfig = None
    reward_model: RewardModelConfig = None
    # a run on real models (rlhf_trainer train / rm)
    policy: PolicySection = None
    value: ValueSection = None
    reward: RewardSection = None
    data: DataSection = None
    generation: GenerationSection = None
    rm: RMSection = None
    iterate: IterateSection = None    # iterated RLHF (absent: one run against one reward model)
    parallel: ParallelSection = None  # FSDP2 options under torchrun (absent: the defaults)
    # the section of the chosen algorithm (built with its defaults when absent); the others stay None
    ppo: PPOConfig = None
    grpo: GRPOConfig = None
    rloo: RLOOConfig = None
    reinforce_pp: ReinforcePPConfig = None
    best_of_n: BestOfNConfig = None
    expert_iteration: ExpertIterationConfig = None
    seed: int = 0
    checkpoint_every: int = 0         # steps (rounds) between checkpoints (0: only at the end)
    eval_every: int = 10              # steps between exact evaluations of J (toy task only)

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ConfigError("algo must be one of %s, got %r" % (", ".join(ALGOS), self.algo))
        if self.device not in DEVICES:
            raise ConfigError("device must be one of %s, got %r" % (", ".join(DEVICES), self.device))
        if self.dtype not in DTYPES:
            raise ConfigError("dtype must be one of %s, got %r" % (", ".join(DTYPES), self.dtype))
        if not self.beta >= 0:
            raise ConfigError("beta must be >= 0, got %r" % self.beta)
        if self.real:
            given = [name for name in COMMON if getattr(self, name) is not None]
            if given:
                raise ConfigError("%s: a section of the toy task, which has no effect on a run on real models "
                                  "(a config with %s)" % (given[0], ", ".join(n for n in REAL if getattr(self, n))))
            if self.algo not in REAL_ALGOS:
                raise ConfigError("algo: %s runs on the toy task only; on real models algo must be one of %s"
                                  % (self.algo, ", ".join(REAL_ALGOS)))
            if self.generation is None:
                self.generation = GenerationSection()
        else:
            for name, cls in COMMON.items():
                if getattr(self, name) is None:
                    setattr(self, name, cls())
        cls = SECTIONS[self.algo]
        if self.section is None:
            setattr(self, self.algo, cls())
        elif type(self.section) is not cls:
            raise ConfigError("%s: expected a %s, got %s" % (self.algo, cls.__name__, type(self.section).__name__))
        for key, value, default in self._inert():
            if value != default:
                raise ConfigError(_no_effect(key, self.algo, self.real))
        if self.real:
            for name in REAL:
                if getattr(self, name) is not None:
                    getattr(self, name).check(self.algo)
        else:
            self.task.steps = tuple(self.task.steps)
            for part in (self.model, self.task):
                part.check()
            self.reward_model.check(self.algo)
        self.section.check(self.algo)
        if self.iterate is not None:
            if type(self.iterate) is not IterateSection:
                raise ConfigError("iterate: expected an IterateSection, got %s" % type(self.iterate).__name__)
            self.iterate.check(self)
            if self.checkpoint_every:
                raise ConfigError("checkpoint_every has no effect with iterate (an iterated run is not checkpointed)")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1, got %d" % self.eval_every)
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0, got %d" % self.checkpoint_every)

    @property
    def real(self):
        """A run on real models (a policy, value, reward, data, generation or rm section is given)."""
        return any(getattr(self, name) is not None for name in REAL)

    @property
    def section(self):
        """The chosen algorithm's options."""
        return getattr(self, self.algo)

    @property
    def temperature(self):
        """The sampling temperature, also that of every log-probability."""
        return self.generation.temperature if self.real else self.section.temperature

    def accounting(self):
        return self.section.accounting()

    def _inert(self):
        """(key, value, default) of each option or section of this config that has no effect on
        it (``_no_effect``), among those present (a section absent is None, its default)."""
        out = []
        for key in list(SECTIONS) + list(ACTS_ON):
            section, _, option = key.replace("<algo>", self.algo).partition(".")
            if _no_effect(key.replace("<algo>", self.algo), self.algo, self.real) is None:
                continue
            if not option:
                out.append((section, getattr(self, section), _default(Config, section)))
            elif hasattr(getattr(self, section), option):
                part = getattr(self, section)
                out.append((section + "." + option, getattr(part, option), _default(type(part), option)))
        return out

    def to_dict(self):
        """Every option that acts on the chosen algorithm and kind of run (and none that does not)."""
        d = dataclasses.asdict(self)
        for name in list(SECTIONS) + list(COMMON) + list(REAL) + list(OPTIONAL):
            if d[name] is None:
                del d[name]
        for key, _, _ in self._inert():
            section, _, option = key.partition(".")
            if option:
                del d[section][option]
            else:
                d.pop(section, None)
        if not self.real:
            d["task"]["steps"] = list(d["task"]["steps"])
        return d

    def save(self, path):
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_dict(cls, d):
        if d is not None and not isinstance(d, dict):
            raise ConfigError("a config is a mapping of sections and options, got %s" % type(d).__name__)
        d = dict(d or {})
        algo = d.get("algo", _default(cls, "algo"))
        top = {f.name for f in dataclasses.fields(cls)} - set(COMMON) - set(REAL) - set(SECTIONS) - set(OPTIONAL)
        kwargs = {}
        for key, value in d.items():
            if key in ACTS_ON or key in SECTIONS:
                why = _no_effect(key, algo, None) if algo in ALGOS else None
                if why and (key in SECTIONS or key in top):   # a section or top-level key given
                    raise ConfigError(why)
            if key in COMMON or key in SECTIONS or key in REAL or key in OPTIONAL:
                part = COMMON.get(key) or REAL.get(key) or OPTIONAL.get(key) or SECTIONS[key]
                if not isinstance(value, dict):
                    raise ConfigError("%s must be a mapping of options, got %r" % (key, value))
                known = {f.name for f in dataclasses.fields(part)}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(_unknown_options(key, unknown))
                value = {name: _check_type("%s.%s" % (key, name), v, _field(part, name)) for name, v in value.items()}
                kwargs[key] = part(**value)
            elif key in top:
                kwargs[key] = _check_type(key, value, _field(cls, key))
            else:
                raise ConfigError("unknown config key %r: the top-level keys are %s; the sections %s"
                                  % (key, ", ".join(sorted(top)),
                                     ", ".join(list(COMMON) + list(REAL) + list(OPTIONAL) + list(SECTIONS))))
        return cls(**kwargs)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError("--config: no such file %r" % str(path)) from None
        except yaml.YAMLError as e:
            raise ConfigError("%s is not valid YAML: %s" % (path, " ".join(str(e).split()))) from None
        return cls.from_dict(data)


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_STRICT = pydantic.ConfigDict(strict=True)


@functools.lru_cache(maxsize=None)
def _adapter(want, nullable):
    """pydantic's strict validator of one option's type: an int is a float, a bool is not an int,
    nothing is converted; None as well when ``nullable``."""
    return pydantic.TypeAdapter(typing.Optional[want] if nullable else want, config=_STRICT)


def _check_type(key, value, f):
    """YAML gives the value its type: refuse one that is not the option's (``_adapter``); None
    only where the default is None. Returns the value, with a number YAML 1.1 reads as a string
    (``1e-6``: no dot) made a float."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    want = _TYPES.get(kind)
    if want is None:
        return value
    if want is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    try:
        _adapter(want, f.default is None).validate_python(value)
        return value
    except pydantic.ValidationError:
        pass
    choices = {"device": DEVICES, "dtype": DTYPES, "algo": ALGOS}.get(key)
    accepted = ("one of " + ", ".join(choices)) if choices else (
        "true or false" if want is bool else "a number" if want is float else "an integer" if want is int
        else "a string")
    raise ConfigError("%s must be %s%s, got %r" % (key, accepted, " or null" if f.default is None else "", value))


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
    cls = COMMON.get(section) or REAL.get(section) or OPTIONAL.get(section) or SECTIONS.get(section)
    options = ", ".join(f.name for f in dataclasses.fields(cls))
    parts = elsewhere + (["unknown %s option(s): %s (the %s options are %s)" % (section, ", ".join(really), section,
                                                                                 options)] if really else [])
    return "%s: %s" % (section, "; ".join(parts)) if elsewhere else parts[0]


def _default(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default


def algo_config(algo, **top):
    """The tuned default configuration of ``algo`` (top-level options may be overridden)."""
    return Config(algo=algo, **top)
