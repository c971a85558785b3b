"""End to end: TRL's own GRPOTrainer, on a tiny randomly initialized Llama on the CPU, runs 3
steps unpatched and 3 steps patched (rlhf_kernels.integrations.trl) from the same seed, and
gives the same losses, KL, entropies and parameters.

The trainer is examples/trl_grpo_with_rlhf_kernels.py's, in float32 (bf16=False: under TRL's
default bf16 autocast TRL rounds each tile of logits to bfloat16 and ours does not, a
difference test_integrations_trl.py holds to float64 instead). GRPO samples its completions,
so the two runs see the same tokens only while the policies agree: the parameters after each
step differ by float32 rounding, far below what would flip a sample (the test checks the token
counts match). What patched means here: every log-probability and entropy of the policy and
the reference model goes through rk.linear_token_logprobs (counted), and nothing falls through
to TRL's function (a FallThroughWarning would fail the test).
"""

import os
import warnings

import pytest
import torch

from test_integrations_kit import require
from tests._helpers import load_script

require("trl.trainer.grpo_trainer")
require("datasets")
import rlhf_kernels as rk  # noqa: E402
import rlhf_kernels.integrations.trl as rk_trl  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "trl_grpo_with_rlhf_kernels.py")
# Tolerances, from what was measured (torch 2.14.1, trl 1.16.0, 2-core CPU) with room: the
# per-step loss, entropy, grad norm and reward came out identical and the KL within 6e-9 (losses
# are ~0.1 and less, entropies ~3.5); the parameters, moved by up to 1.0 in 3 Adam steps at
# lr 1e-2, within 1.2e-5 (Adam divides each gradient by its running RMS, so a float32 difference
# in a near-zero gradient entry moves that entry's step by much more than the difference).
METRIC_ATOL, METRIC_RTOL = 1e-6, 1e-5
PARAM_ATOL = 1e-4


def train(example, model_dir, output_dir, patched, monkeypatch):
    calls = []
    fused = rk.linear_token_logprobs
    monkeypatch.setattr(rk, "linear_token_logprobs", lambda *a, **k: calls.append(1) or fused(*a, **k))
    trainer = example.make_trainer(model_dir, output_dir, steps=3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rk_trl.FallThroughWarning)
        if patched:
            with rk_trl.patch():
                trainer.train()
        else:
            trainer.train()
    monkeypatch.setattr(rk, "linear_token_logprobs", fused)
    steps = [row for row in trainer.state.log_history if "loss" in row]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return steps, params, len(calls)


@pytest.mark.filterwarnings("ignore::UserWarning:trl")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trl_grpo_three_steps_unpatched_vs_patched(tmp_path, monkeypatch):
    example = load_script(EXAMPLE, "trl_grpo_with_rlhf_kernels")
    model_dir = example.tiny_model(str(tmp_path / "model"))
    theirs, their_params, their_calls = train(example, model_dir, str(tmp_path / "a"), False, monkeypatch)
    ours, our_params, our_calls = train(example, model_dir, str(tmp_path / "b"), True, monkeypatch)
    assert their_calls == 0 and our_calls > 0  # patched: the fused head ran on rlhf_kernels
    assert len(theirs) == len(ours) == 3
    for step, (a, b) in enumerate(zip(theirs, ours), 1):
        assert a["num_tokens"] == b["num_tokens"], "step %d sampled different completions" % step
        for key in ("loss", "kl", "entropy", "grad_norm", "reward"):
            assert b[key] == pytest.approx(a[key], rel=METRIC_RTOL, abs=METRIC_ATOL), (step, key, a[key], b[key])
    assert their_params.keys() == our_params.keys()
    initial = load_example_initial(model_dir)
    for name, p in their_params.items():
        assert not torch.equal(p, initial[name]) or "embed" in name, "%s did not train" % name
        diff = (our_params[name] - p).abs().max().item()
        assert diff <= PARAM_ATOL, "%s differs by %.3g after 3 steps" % (name, diff)


def load_example_initial(model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: p.detach() for name, p in model.named_parameters()}
