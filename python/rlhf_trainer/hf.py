"""Real models, prompts and rewards: what ``rlhf_trainer train`` and ``rlhf_trainer rm`` load.

- Models come from a local folder written by ``save_pretrained`` or a Hugging Face id already
  in the local cache; nothing is downloaded and ``trust_remote_code`` is off. Dropout is turned
  off in every model's config (PPO's first ratio must be exactly 1).
- Prompts come from a JSONL file (the prompt under ``data.key``: a string or a list of chat
  messages) or a text file (one prompt per line), through the tokenizer's chat template when it
  has one, left-padded with ``PROMPT_PAD``.
- The reward is a reward model's score at the last real token, a Python function over the
  decoded (prompt, response) pairs, or their sum.

Everything that can be checked before a model is loaded is (paths, the prompts file, the
reward function's import), and each error names the config key and the line or batch.
"""

import importlib
import json
import os
import sys
from types import SimpleNamespace

import torch

from rlhf_trainer.config import ConfigError, InputError, RewardFunctionError, RewardSection
from rlhf_trainer.models import HFScalarModel
from rlhf_trainer.sequences import PROMPT_PAD, response_mask


# ---------- models ----------
def resolve_model(key, name):
    """The local folder of ``name``: a folder on disk, or the snapshot of a Hugging Face id in
    the local cache. Raises InputError (naming ``key``) otherwise, before anything is loaded."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise InputError("%s: %s is a folder without config.json (save a model there with save_pretrained)"
                             % (key, name))
        return path
    hit = None
    if not os.path.isabs(path) and not name.startswith(".") and name.count("/") <= 1:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json")
    if isinstance(hit, str):
        return os.path.dirname(hit)
    raise InputError("%s: %r is neither a model folder nor a Hugging Face id in the local cache (nothing is "
                     "downloaded: fetch it first, e.g. `huggingface-cli download %s`)" % (key, name, name))


def _hf_quiet():
    """transformers' logging at error level inside (its notes on newly initialized heads are expected here)."""
    from transformers.utils import logging

    class Quiet:
        def __enter__(self):
            self.level = logging.get_verbosity()
            logging.set_verbosity_error()

        def __exit__(self, *exc):
            logging.set_verbosity(self.level)
    return Quiet()


def _config_without_dropout(path):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value:
            setattr(config, name, 0.0)
    return config


def _float32():
    """from_pretrained's keyword for float32 weights (``dtype`` since transformers 4.56, ``torch_dtype``
    before): without it transformers 5 loads a checkpoint in its own dtype."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def load_tokenizer(path, key, log=print):
    """The tokenizer saved with the model; without a pad token its EOS token pads (and we say so)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError("%s: the tokenizer has neither a pad token nor an EOS token to pad with" % key)
        tok.pad_token = tok.eos_token
        log("%s: the tokenizer has no pad token; padding with its EOS token %r (ids are masked out where padded)"
            % (key, tok.eos_token))
    return tok


def load_policy(path, tokenizer, seed):
    """A causal LM in float32 (bfloat16 runs under autocast) with a clean generation config:
    only what the trainer sets is used when sampling (a checkpoint's own top_k, repetition
    penalty and so on would make the samples' distribution differ from the log-probabilities)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, config=_config_without_dropout(path), **_float32(),
                                                 trust_remote_code=False, local_files_only=True)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=model.generation_config.bos_token_id)
    model.train()   # dropout is off; train mode matters only to gradient checkpointing
    return model


def load_scalar_model(path, key, tokenizer, seed, trained_head=False):
    """A sequence-classification model with one output (a reward model, or a value model from a
    causal LM's weights with a new head) as an HFScalarModel, float32. ``trained_head``: the
    checkpoint must hold the head (a reward model), else it is an InputError."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(seed)
    config = _config_without_dropout(path)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    with _hf_quiet():
        seqcls, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, **_float32(), trust_remote_code=False, local_files_only=True,
            output_loading_info=True)
    new = [k for k in info["missing_keys"] if k.startswith("score.")]
    if trained_head and new:
        raise InputError("%s: %s has no trained scalar head (%s would be random): it is not a reward model; "
                         "train one with `rlhf_trainer rm`" % (key, path, ", ".join(sorted(new))))
    if not isinstance(getattr(seqcls, "score", None), torch.nn.Linear):
        raise InputError("%s: %s has no linear `score` head (a decoder model's sequence classifier is expected)"
                         % (key, type(seqcls).__name__))
    return HFScalarModel(seqcls).train()


# ---------- prompts ----------
def read_prompts(path, key="prompt"):
    """The prompts of a JSONL file (``key`` of each object: a string or a list of chat messages)
    or a text file (one per line). Raises InputError naming the line of an empty or invalid one."""
    if not os.path.isfile(path):
        raise InputError("data.prompts: no such file %r" % path)
    jsonl = path.endswith((".jsonl", ".json"))
    prompts = []
    lines = read_lines(path, "data.prompts")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError("data.prompts: %s line %d is empty" % (path, n))
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError("data.prompts: %s line %d is not valid JSON (%s)" % (path, n, e.msg)) from None
        if not isinstance(obj, dict) or key not in obj:
            raise InputError("data.prompts: %s line %d has no %r field (data.key)" % (path, n, key))
        p = obj[key]
        if isinstance(p, str) and p.strip():
            prompts.append(p)
        elif isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in p):
            prompts.append(p)
        else:
            raise InputError("data.prompts: %s line %d: %r must be a non-empty string or a list of "
                             "{\"role\", \"content\"} messages, got %s" % (path, n, key, json.dumps(p)[:80]))
    if not prompts:
        raise InputError("data.prompts: %s holds no prompt" % path)
    return prompts


def read_lines(path, key):
    """The lines of a UTF-8 text file; InputError naming ``key``, the file and the line of a byte
    that is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError("%s: %s line %d is not UTF-8 text (byte 0x%02x at column %d)"
                         % (key, path, line, data[e.start], column)) from None


def _messages(prompt):
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def encode_prompts(prompts, tokenizer, use_template, max_len, path):
    """Token ids of each prompt, left-padded with PROMPT_PAD: [N, P] int64."""
    template = use_template and bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for n, p in enumerate(prompts, 1):
        if template:
            try:
                text = tokenizer.apply_chat_template(_messages(p), add_generation_prompt=True, tokenize=False)
            except Exception as e:   # the template's own checks (roles, their order) raise here
                raise InputError("data.prompts: %s line %d: the tokenizer's chat template refused it (%s: %s)"
                                 % (path, n, type(e).__name__, e)) from e
            ids = tokenizer(text, add_special_tokens=False).input_ids
        elif isinstance(p, list):
            raise InputError("data.prompts: %s line %d is a list of chat messages, but the tokenizer has no chat "
                             "template%s" % (path, n, "" if use_template else " in use (data.chat_template: false)"))
        else:
            ids = tokenizer(p).input_ids
        if not ids:
            raise InputError("data.prompts: %s line %d gives no tokens" % (path, n))
        if len(ids) > max_len:
            raise InputError("data.prompts: %s line %d is %d tokens, more than data.max_prompt_len=%d"
                             % (path, n, len(ids), max_len))
        rows.append(ids)
    P = max(len(r) for r in rows)
    out = torch.full((len(rows), P), PROMPT_PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, P - len(r):] = torch.tensor(r)
    return out


class PromptTask:
    """Prompts for real models, with the interface the trainers use of the toy task: ``prompts``
    [N, P] (left-padded with PROMPT_PAD), ``num_prompts``, ``cfg`` (pad and EOS ids,
    ``response_len`` = max_new_tokens, ``stop_at_eos``), ``top_p``, ``build_policy`` /
    ``build_value``, and ``rule_reward`` (None: there is no hidden rule)."""

    def __init__(self, cfg, tokenizer, texts, policy_path, value_path=None):
        self.tokenizer, self.texts = tokenizer, texts
        self.policy_path, self.value_path = policy_path, value_path or policy_path
        self.prompts = encode_prompts(texts, tokenizer, cfg.data.chat_template, cfg.data.max_prompt_len,
                                      cfg.data.prompts)
        self.top_p = cfg.generation.top_p
        self.cfg = SimpleNamespace(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   stop_at_eos=True, response_len=cfg.generation.max_new_tokens)

    @property
    def num_prompts(self):
        return self.prompts.shape[0]

    def build_policy(self, cfg):
        policy = load_policy(self.policy_path, self.tokenizer, cfg.seed)
        self.cfg.eos_token_id = policy.generation_config.eos_token_id   # the ids generation stops at
        return policy

    def build_value(self, cfg):
        return load_scalar_model(self.value_path, "value.model", self.tokenizer, cfg.seed + 1)

    def rule_reward(self, prompt_ids, responses):
        return None

    def decode(self, prompt_ids, responses):
        """The prompts as given in data.prompts and the responses' text (up to and including EOS,
        special tokens dropped)."""
        mask = response_mask(responses, self.cfg.eos_token_id, True).cpu()
        rows = responses.cpu()
        return ([self.texts[i] for i in prompt_ids.tolist()],
                [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(rows, mask)])


# ---------- rewards ----------
def import_reward_fn(spec, search_dir=None, key="reward.fn"):
    """The function ``module:function``, imported from the working directory, ``search_dir``
    (the config's folder) or sys.path. Raises InputError naming ``key`` (the config key)."""
    module_name, fn_name = spec.split(":")
    for d in (search_dir, os.getcwd()):
        if d and d not in sys.path:
            sys.path.insert(0, d)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError("%s: cannot import module %r (%s)" % (key, module_name, e)) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError("%s: module %r has no function %r" % (key, module_name, fn_name))
    return fn


def _ids(prompt_ids):
    """Prompt ids -> 'prompt ids 3..17' (their range; ids are 0-based lines of data.prompts)."""
    ids = [int(i) for i in prompt_ids]
    return "prompt ids %d..%d" % (min(ids), max(ids)) if ids else "no prompt"


def call_reward_fn(fn, name, prompts, responses, batch_no, key="reward.fn", prompt_ids=None):
    """fn(prompts, responses) checked: one finite number per pair -> [B] float64 tensor.
    batch_no: the batch's number (or words such as "2 of round 1"), for the errors; prompt_ids:
    the pairs' prompt ids, named in the errors too. Raises RewardFunctionError."""
    ids = "" if prompt_ids is None else ", " + _ids(prompt_ids)
    where = "%s %s on batch %s (%d pairs%s)" % (key, name, batch_no, len(prompts), ids)
    try:
        out = fn(prompts, responses)
    except Exception as e:   # the user's code: its traceback stays attached as the cause
        raise RewardFunctionError(where, "raised %s: %s" % (type(e).__name__, e)) from e
    try:
        t = torch.as_tensor(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise RewardFunctionError(where, "returned %s, not numbers: it must return one number per (prompt, "
                                         "response) pair" % repr(out)[:80]) from None
    if t.shape != (len(prompts),):
        raise RewardFunctionError(where, "returned shape %s: it must return one number per (prompt, response) "
                                         "pair, shape (%d,)" % (tuple(t.shape), len(prompts)))
    bad = (~torch.isfinite(t)).nonzero()
    if len(bad):
        i = bad[0].item()
        raise RewardFunctionError(where, "returned %s for pair %d (response %r)" % (t[i].item(), i, responses[i][:60]))
    return t


def rm_encode(tokenizer, prompt, response):
    """The token ids a reward model reads for (prompt, response): the conversation through its
    chat template when it has one, else the prompt's text followed by the response. The same for
    training (``rlhf_trainer rm``) and scoring."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(_messages(prompt) + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    prompt_text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tokenizer(prompt_text + response).input_ids


def pad_right(rows, pad_id, device):
    """Lists of ids -> (ids [B, S], attention mask [B, S]), right-padded."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
    return ids.to(device), attn.to(device)


class Reward:
    """reward(prompt_ids [B], responses [B, L]) -> [B]: the reward model's score at the last real
    token plus reward.fn's number, on the decoded pairs (either alone when the other is not set).
    The reward model has its own tokenizer: the pair is re-encoded for it (``rm_encode``)."""

    def __init__(self, task, fn=None, fn_name=None, reward_model=None, rm_tokenizer=None, micro_batch=32):
        self.task, self.fn, self.fn_name = task, fn, fn_name
        self.model, self.rm_tokenizer, self.micro_batch = reward_model, rm_tokenizer, micro_batch
        self.calls = 0

    def __call__(self, prompt_ids, responses):
        self.calls += 1
        prompts, texts = self.task.decode(prompt_ids, responses)
        total = torch.zeros(len(texts), dtype=torch.float64)
        if self.model is not None:
            dev = next(self.model.parameters()).device
            scores = []
            with torch.no_grad():
                for s in range(0, len(texts), self.micro_batch):
                    rows = [rm_encode(self.rm_tokenizer, p, r)
                            for p, r in zip(prompts[s:s + self.micro_batch], texts[s:s + self.micro_batch])]
                    scores.append(self.model.score(*pad_right(rows, self.rm_tokenizer.pad_token_id, dev)).float())
            total += torch.cat(scores).double().cpu()
        if self.fn is not None:
            total += call_reward_fn(self.fn, self.fn_name, prompts, texts, self.calls, prompt_ids=prompt_ids)
        return total.float().to(responses.device)


def prepare(cfg, config_dir=None, log=print):
    """Everything a run on real models needs but the models: checked in the order that fails
    fastest (paths, the prompts file, the reward function), then the tokenizer and the prompts.
    Returns (task, reward pieces as a dict)."""
    # an iterated run trains its reward model (the rm section): the reward section is optional there
    required = ("policy", "data") + (("reward",) if cfg.iterate is None else ())
    if any(getattr(cfg, name) is None for name in required):
        missing = [name for name in required if getattr(cfg, name) is None]
        raise ConfigError("%s: required to train on real models (policy.model, data.prompts, and reward.model "
                          "or reward.fn)" % ", ".join(missing))
    policy_path = resolve_model("policy.model", cfg.policy.model)
    value_path = None
    if cfg.value is not None and cfg.value.model is not None:
        value_path = resolve_model("value.model", cfg.value.model)
    reward = cfg.reward or RewardSection()
    rm_path = resolve_model("reward.model", reward.model) if reward.model is not None else None
    texts = read_prompts(cfg.data.prompts, cfg.data.key)
    fn = import_reward_fn(reward.fn, config_dir) if reward.fn is not None else None
    tokenizer = load_tokenizer(policy_path, "policy.model", log)
    task = PromptTask(cfg, tokenizer, texts, policy_path, value_path)
    template = cfg.data.chat_template and getattr(tokenizer, "chat_template", None)
    log("prompts: %d from %s, up to %d tokens (%s)" % (task.num_prompts, cfg.data.prompts, task.prompts.shape[1],
                                                       "chat template" if template else "no chat template"))
    return task, {"fn": fn, "fn_name": reward.fn, "rm_path": rm_path}


def build_reward(cfg, task, pieces, device, log=print):
    """The Reward of a run (loads the reward model, if any, frozen on ``device``)."""
    from rlhf_trainer import parallel
    model = rm_tok = None
    if pieces["rm_path"] is not None:
        rm_tok = load_tokenizer(pieces["rm_path"], "reward.model", log)

        def load():   # frozen; under torchrun sharded without gradients, loaded by one rank at a time
            m = load_scalar_model(pieces["rm_path"], "reward.model", rm_tok, cfg.seed, trained_head=True).to(device)
            m.eval().requires_grad_(False)
            return parallel.shard(m, cfg.dtype)
        model = parallel.one_at_a_time(load)
    return Reward(task, pieces["fn"], pieces["fn_name"], model, rm_tok, cfg.section.micro_batch)
