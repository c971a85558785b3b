"""Prompt + response sequences: response masks up to EOS, the model inputs over left-padded
prompts, the response tokens' log-probabilities (fused LM head or logits), sampling, and the
reward's score of a response."""

import contextlib

import torch

import rlhf_kernels as rk
from rlhf_trainer.models import position_ids


def is_eos(responses, eos_token_id):
    """responses == eos_token_id, for one id or a list of them (a model may stop on several)."""
    if isinstance(eos_token_id, (list, tuple)):
        return torch.isin(responses, torch.tensor(eos_token_id, device=responses.device))
    return responses == eos_token_id


def response_mask(responses, eos_token_id, stop_at_eos):
    """True on real response tokens: all of them, or up to and including the first EOS."""
    if not stop_at_eos:
        return torch.ones_like(responses, dtype=torch.bool)
    eos = is_eos(responses, eos_token_id).long()
    after_eos = (eos.cumsum(-1) - eos) > 0
    return ~after_eos


# Prompts of different lengths are left-padded with this id, which no tokenizer gives: the
# attention masks are read from it, and it becomes a valid id (0) where a model sees it.
PROMPT_PAD = -1


def sequences(prompts, responses, mask):
    """Prompt + response ids and the attention mask over real tokens: [B, P + L] each.
    prompts [B, P] may be left-padded with PROMPT_PAD."""
    real = prompts != PROMPT_PAD
    ids = torch.cat([prompts.clamp(min=0), responses], 1)
    attn = torch.cat([real.long(), mask.long()], 1)
    return ids, attn


def response_logprobs(model, prompts, responses, mask, *, temperature=1.0, fused_lm_head=True, with_entropy=False,
                      ops=rk):
    """log-probabilities (and entropies) of the response tokens under ``model``: [B, L].

    With ``fused_lm_head`` the backbone's last hidden states go straight into
    ``linear_token_logprobs`` with the LM head's weight (and bias): the [B, L, V] logits are
    never built. Otherwise the model's logits at the response positions (only those are kept)
    go into ``token_logprobs``. ``ops``: where those two come from (rlhf_kernels)."""
    labels = responses.masked_fill(~mask, -100)
    kw = dict(temperature=temperature, return_entropy=with_entropy)
    if fused_lm_head:
        def fused(model):
            hidden, weight, bias = response_hidden(model, prompts, responses, mask)
            return ops.linear_token_logprobs(hidden, weight, labels, bias=bias, **kw)
        return root_call(model, fused)
    L = responses.shape[1]
    logits = model(**_model_inputs(prompts, responses, mask), logits_to_keep=L + 1).logits[:, :-1]
    return ops.token_logprobs(logits, labels, **kw)


def root_call(model, fn, *args, **kwargs):
    """fn(model, ...), as a forward of the model when it is sharded (FSDP2 gathers the root's
    parameters, the embeddings and the LM head, only around forward methods)."""
    call = getattr(model, "rlhf_call", None)
    return call(fn, *args, **kwargs) if call is not None else fn(model, *args, **kwargs)


def _model_inputs(prompts, responses, mask):
    ids, attn = sequences(prompts, responses, mask)
    return dict(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn))


def response_hidden(model, prompts, responses, mask):
    """What the fused LM head ops take instead of the logits: the backbone's last hidden states at
    the positions that predict the response tokens [B, L, H], and the LM head's weight and bias,
    in the autocast dtype when autocast is on (the LM head's matmul runs in it, as it would in the
    model)."""
    hidden = model.base_model(**_model_inputs(prompts, responses, mask)).last_hidden_state[:, prompts.shape[1] - 1:-1]
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias = hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
    return hidden, weight, bias


@torch.no_grad()
def generate(model, prompts, task_cfg, temperature=1.0, top_p=1.0):
    """Sampled responses [B, L] (no top-k; top-p truncation when top_p < 1), padded to L after an
    early EOS. prompts [B, P] may be left-padded with PROMPT_PAD. On a sharded model every rank
    runs a forward per token until all ranks are done (``synced_gpus``): FSDP2 gathers one layer
    at a time."""
    from rlhf_trainer import parallel
    kw = {"synced_gpus": True} if parallel.sharded(model) else {}
    out = model.generate(input_ids=prompts.clamp(min=0), attention_mask=(prompts != PROMPT_PAD).long(),
                         do_sample=True, max_new_tokens=task_cfg.response_len, min_new_tokens=0, top_k=0,
                         top_p=top_p, temperature=temperature, **kw)
    responses = out[:, prompts.shape[1]:]
    L = task_cfg.response_len
    if responses.shape[1] < L:   # every row stopped at EOS early: pad to L
        pad = torch.full((responses.shape[0], L - responses.shape[1]), task_cfg.pad_token_id,
                         dtype=responses.dtype, device=responses.device)
        responses = torch.cat([responses, pad], 1)
    return responses


@contextlib.contextmanager
def _eval_mode(model, enabled):
    """model.eval() inside (HF models turn their KV cache off in train mode under gradient checkpointing)."""
    was = model.training
    if enabled:
        model.eval()
    try:
        yield
    finally:
        model.train(was)


def score_function(task, reward_model=None, reward_fn=None):
    """(prompt_ids [B], responses [B, L]) -> [B] float: the reward model's score at the last
    real token, or reward_fn's."""
    if (reward_model is None) == (reward_fn is None):
        raise ValueError("give exactly one of reward_model and reward_fn")
    if reward_fn is not None:
        return lambda prompt_ids, responses: reward_fn(prompt_ids, responses).float().to(responses.device)
    tc = task.cfg

    def score(prompt_ids, responses):
        dev = next(reward_model.parameters()).device
        r = responses.to(dev)
        mask = response_mask(r, tc.eos_token_id, tc.stop_at_eos)
        return reward_model.score(*sequences(task.prompts[prompt_ids].to(dev), r, mask)).to(responses.device)
    return score
