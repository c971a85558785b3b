"""The models: a causal LM policy (and its frozen reference), and a scalar-head model
used both as the value model (a value per token) and the reward model (a score read at
the last real token). Dropout is off everywhere: PPO's first ratio must be exactly 1."""

import copy

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model


def gpt2_config(model_cfg, task_cfg):
    return GPT2Config(
        vocab_size=task_cfg.vocab_size,
        n_positions=4 * (task_cfg.prompt_len + task_cfg.response_len),  # room for test padding
        n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=task_cfg.eos_token_id, eos_token_id=task_cfg.eos_token_id,
        # no pad_token_id: the toy's PAD is a token the policy may sample like any other, so a model
        # that knew it as padding would warn about every sequence holding one (generation is told
        # the pad id in build_policy, and attention masks are always passed)
    )


def position_ids(attention_mask):
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_policy(model_cfg, task_cfg):
    torch.manual_seed(model_cfg.seed)
    policy = GPT2LMHeadModel(gpt2_config(model_cfg, task_cfg))
    gc = policy.generation_config
    gc.pad_token_id = task_cfg.pad_token_id
    gc.eos_token_id = task_cfg.eos_token_id if task_cfg.stop_at_eos else None
    gc.bos_token_id = None
    return policy


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class ScalarHead(nn.Module):
    """A backbone (``self.backbone``, returning last_hidden_state) with a linear head
    (``self.head``) giving one number per position: the value model reads every position,
    the reward model the last real token."""

    def forward(self, input_ids, attention_mask=None):
        """-> [B, S] one value per position."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask)).last_hidden_state
        return self.head(h).squeeze(-1)

    def score(self, input_ids, attention_mask=None):
        """The value at the last real token of each row: the reward model's score. -> [B]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self(input_ids, attention_mask)
        S = attention_mask.shape[1]
        last = S - 1 - attention_mask.long().flip(-1).argmax(-1)   # index of the last real token
        return values.gather(1, last[:, None]).squeeze(1)


class ScalarHeadModel(ScalarHead):
    """A GPT-2 backbone with a linear head giving one number per position."""

    def __init__(self, model_cfg, task_cfg, seed_offset=1):
        super().__init__()
        torch.manual_seed(model_cfg.seed + seed_offset)
        self.backbone = GPT2Model(gpt2_config(model_cfg, task_cfg))
        self.head = nn.Linear(model_cfg.n_embd, 1)

    @torch.no_grad()
    def standardize_(self, mean, std):
        """Fold (value - mean) / std into the head: same ordering, scores on a unit scale,
        so one KL coefficient means the same thing whatever scale training produced."""
        self.head.weight.div_(std)
        self.head.bias.sub_(mean).div_(std)


class HFScalarModel(ScalarHead):
    """A Hugging Face sequence-classification model with one label (``self.hf``, saved with
    save_pretrained) read as a backbone (its base model) and a scalar head (its ``score`` layer)."""

    def __init__(self, seqcls):
        super().__init__()
        self.hf = seqcls

    @property
    def backbone(self):
        return self.hf.base_model

    @property
    def head(self):
        return self.hf.score


def enable_checkpointing(model):
    """Recompute each layer's activations in the backward (transformers' activation, formerly
    gradient, checkpointing), non-reentrant; the KV cache stays for generate() alone."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
