"""`rlhf_trainer train` / `rm` on real models: a tiny Llama saved with save_pretrained, a prompts
file, a reward function and a reward model; exact resume; bad input; the command line."""

import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch
import yaml

from rlhf_trainer.config import Config, ConfigError
from rlhf_trainer.hf import InputError
from rlhf_trainer.ppo import TIME_KEYS
from tests._helpers import toy_config

REWARDS = '''
def letters(prompts, responses):
    """+1 per 'a' in the response, -0.1 per character: a reward that moves quickly."""
    return [r.count("a") - 0.1 * len(r) for r in responses]

def wrong_shape(prompts, responses):
    return [0.0] * (len(responses) + 1)

def nan(prompts, responses):
    return [float("nan")] * len(responses)

def words(prompts, responses):
    return ["good"] * len(responses)
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama and its byte-level BPE tokenizer (no pad token) saved with save_pretrained (by
    examples/train_your_own_model.py's own function), a prompts file, a reward module and preference data."""
    d = tmp_path_factory.mktemp("real")
    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "train_your_own_model.py"))
    example["save_tiny_llama"](str(d / "tiny"))
    prompts = ["a cat", "the mat", "banana", "sat on", "ate a", "an", "cat sat on a", "b"]
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (d / "w14_rewards.py").write_text(REWARDS)
    pairs = [{"prompt": p, "chosen": "a banana a cat", "rejected": "the mat"} for p in prompts]
    (d / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    ranked = [{"prompt": p, "ranked": ["a a a", "a cat", "mat"][:2 + i % 2]} for i, p in enumerate(prompts)]
    (d / "ranked.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ranked))
    return d


def real_config(d, algo="grpo", steps=4, **top):
    section = dict(steps=steps, rollout_batch=8, minibatch=4, micro_batch=2, epochs=1, lr=1e-2)
    if algo != "ppo":
        section["group_size"] = 4
    cfg = {"algo": algo, "beta": 0.05, "device": "cpu", "seed": 3,
           "policy": {"model": str(d / "tiny")}, "data": {"prompts": str(d / "prompts.jsonl")},
           "reward": {"fn": "w14_rewards:letters"},
           "generation": {"temperature": 0.9, "top_p": 1.0, "max_new_tokens": 6}, algo: section}
    cfg.update(top)
    return cfg


def trainer_for(cfg, d, run_dir, log=lambda *a: None):
    from rlhf_trainer import hf
    from rlhf_trainer.algos import trainer_class
    from rlhf_trainer.devices import resolve_device
    task, pieces = hf.prepare(cfg, str(d), log)
    reward = hf.build_reward(cfg, task, pieces, resolve_device(cfg.device, cfg.algo), log)
    os.makedirs(run_dir, exist_ok=True)
    return trainer_class(cfg.algo)(cfg, task, reward_fn=reward, run_dir=str(run_dir), log=log)


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def read_log(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "log.jsonl"))]


def check_resume_is_exact(d, tmp_path, cfg_dict, half=2):
    """2 * half steps straight, or half, a checkpoint, lost work, and a fresh trainer's half more: one log."""
    cfg = Config.from_dict(cfg_dict)
    straight = trainer_for(cfg, d, tmp_path / "a")
    for _ in range(2 * half):
        straight.train_step()
    first = trainer_for(cfg, d, tmp_path / "b")
    for _ in range(half):
        first.train_step()
    first.save(str(tmp_path / "b" / "ckpt.pt"))
    first.train_step()                     # lost
    torch.manual_seed(999)
    resumed = trainer_for(cfg, d, tmp_path / "b")
    resumed.load(str(tmp_path / "b" / "ckpt.pt"))
    for _ in range(half):
        resumed.train_step()
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert len(a) == 2 * half and strip(a) == strip(b)
    assert all(r["rule_reward_mean"] is None and r["J"] is None for r in a)
    assert a[0]["first_ratio_max_dev"] < 1e-5
    return straight


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_from_a_saved_model_and_resume_exactly(workdir, tmp_path, dtype):
    """A tiny Llama from save_pretrained, prompts from JSONL, reward.fn; GRPO resumes exactly
    (bfloat16: autocast on the CPU, float32 parameters and optimizer state)."""
    # bfloat16 autocast is slow on a CPU: fewer steps
    trainer = check_resume_is_exact(workdir, tmp_path, real_config(workdir, dtype=dtype),
                                    half=2 if dtype == "float32" else 1)
    assert trainer.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    # the reward function saw the decoded responses: it is what score_mean reports
    assert any(r["score_std"] > 0 for r in read_log(tmp_path / "a"))


@pytest.mark.cuda
def test_train_on_cuda_in_bfloat16_resumes_exactly(workdir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    trainer = check_resume_is_exact(workdir, tmp_path, real_config(workdir, device="cuda", dtype="bfloat16",
                                                                   gradient_checkpointing=True))
    assert trainer.device.type == "cuda"
    assert next(trainer.policy.parameters()).is_cuda and next(trainer.ref.parameters()).is_cuda


@pytest.mark.cuda
def test_toy_demo_on_cuda_closes_the_gap(tmp_path):
    """The CI-sized demo on a GPU: the same checks as on the CPU (test_trainer_ppo)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from rlhf_trainer import demo
    summary = demo.run(demo.small_config(Config(device="cuda")), str(tmp_path), progress=False)
    assert summary["rm_accuracy"] >= 0.9 and summary["gap_closed"] >= 0.8
    assert summary["rule_reward_end"] > summary["rule_reward_start"] + 0.2


def test_ppo_with_a_value_model_from_the_policy_and_token_sum(workdir, tmp_path):
    """PPO: the value model is the policy's architecture and weights with a scalar head; loss_agg
    token-sum passes through; gradient checkpointing gives the same log."""
    logs = []
    for i, gc in enumerate((False, True)):
        d = real_config(workdir, algo="ppo", steps=2, gradient_checkpointing=gc)
        d["ppo"]["loss_agg"] = "token-sum"
        trainer = trainer_for(Config.from_dict(d), workdir, tmp_path / str(i))
        # the value model starts as the policy's backbone (the reference is the untouched copy)
        torch.testing.assert_close(trainer.value.backbone.embed_tokens.weight, trainer.ref.model.embed_tokens.weight,
                                   rtol=0, atol=0)
        for _ in range(2):
            trainer.train_step()
        logs.append(strip(read_log(tmp_path / str(i))))
    from rlhf_trainer.models import HFScalarModel
    assert isinstance(trainer.value, HFScalarModel)
    for a, b in zip(*logs):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
            else:
                assert a[k] == b[k], k


@pytest.mark.parametrize("loss_agg", ["token-sum", "seq-mean-token-mean"])
def test_update_does_not_depend_on_the_micro_batch_split(loss_agg):
    """Gradient accumulation: the accumulated gradient of a minibatch is the same whether it is
    one micro-batch or four (token-sum sums, the per-sequence modes are weighted). Gradients, not
    parameters: Adam's step would hide a wrong constant scale."""
    from rlhf_trainer.ppo import PPOTrainer
    from rlhf_trainer.toy import ToyTask
    grads = []
    for micro in (32, 8):
        cfg = toy_config("ppo", dict(steps=1, rollout_batch=32, minibatch=32, micro_batch=micro, epochs=1,
                                     loss_agg=loss_agg, max_grad_norm=1e9))
        task = ToyTask(cfg.task)
        trainer = PPOTrainer(cfg, task, reward_fn=task.rule_reward, log=lambda *a: None)
        trainer.train_step()            # one minibatch: .grad holds its accumulated gradient
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def run_cli(capsys, *args):
    """python -m rlhf_trainer ARGS, in this process (the imports cost seconds per subprocess):
    (exit code, stdout, stderr)."""
    from rlhf_trainer.__main__ import main
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_rm_then_train_with_reward_model_and_function(workdir, tmp_path, capsys, monkeypatch):
    """`rm` trains a reward model from pairs and saves it; `train` uses it plus reward.fn, writes the
    run directory and the final policy (save_pretrained); an existing run directory is refused."""
    rm_cfg = {"device": "cpu", "rm": {"model": str(workdir / "tiny"), "data": str(workdir / "pairs.jsonl"),
                                      "eval_data": str(workdir / "pairs.jsonl"), "epochs": 3, "batch_size": 4,
                                      "lr": 3e-3}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm_cfg))
    rc, _, err = run_cli(capsys, "rm", "--config", str(tmp_path / "rm.yaml"), "--out", str(tmp_path / "rm"),
                         "--no-progress")
    assert rc == 0, err
    s = json.load(open(tmp_path / "rm" / "summary.json"))
    assert s["kind"] == "bt" and s["steps"] == 6 and s["eval_accuracy"] == 1.0
    cfg = real_config(workdir, steps=2)
    cfg["reward"]["model"] = str(tmp_path / "rm" / "model")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    monkeypatch.chdir(workdir)   # reward.fn is imported from the working directory (or the config's folder)
    rc, stdout, err = run_cli(capsys, "train", "--config", str(tmp_path / "train.yaml"), "--out", str(out),
                              "--no-progress")
    assert rc == 0, err
    assert "final policy: %s" % (out / "policy") in stdout
    assert len(read_log(out)) == 2
    for f in ("config.yaml", "checkpoint.pt", "summary.json", "curves.png", "policy/config.json"):
        assert os.path.exists(out / f), f
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(out / "policy")
    trained = torch.load(out / "checkpoint.pt", weights_only=False)["policy"]
    torch.testing.assert_close(saved.state_dict()["lm_head.weight"], trained["lm_head.weight"])
    rc, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "train.yaml"), "--out", str(out))
    assert rc == 2
    assert err == "error: --out %s already holds a run: --resume continues it, --overwrite replaces it\n" % out


def test_rm_ranked_lists(workdir, tmp_path):
    from rlhf_trainer import rm
    cfg = Config.from_dict({"device": "cpu", "rm": {"model": str(workdir / "tiny"), "epochs": 2, "batch_size": 4,
                                                    "data": str(workdir / "ranked.jsonl"), "lr": 3e-3}})
    s = rm.run(cfg, str(tmp_path), log=lambda *a: None, progress=False)
    assert s["kind"] == "ranking" and s["steps"] == 4
    rows = read_log(tmp_path)
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").config.num_labels == 1


# ---------- bad input ----------
def prepare(workdir, log=lambda *a: None, **changes):
    from rlhf_trainer import hf
    d = real_config(workdir)
    for k, v in changes.items():
        section, key = k.split("__")
        d[section][key] = v
    return hf.prepare(Config.from_dict(d), str(workdir), log)


def test_missing_model_path_fails_before_loading(workdir):
    with pytest.raises(InputError, match=r"policy.model: '/nonexistent/model' is neither a model folder"):
        prepare(workdir, policy__model="/nonexistent/model")


def test_a_cached_hugging_face_id_is_found_offline(workdir, tmp_path, monkeypatch):
    """An id is looked up in the local Hugging Face cache (its snapshot folder), never downloaded."""
    import shutil
    from huggingface_hub import constants
    from rlhf_trainer.hf import resolve_model
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(workdir / "tiny", snapshot)
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("policy.model", "someone/tiny-llama") == str(snapshot)
    task, _ = prepare(workdir, policy__model="someone/tiny-llama")
    assert task.policy_path == str(snapshot)
    with pytest.raises(InputError, match="'someone/other' is neither a model folder nor a Hugging Face id in the "
                                         "local cache"):
        resolve_model("policy.model", "someone/other")


def test_a_bfloat16_checkpoint_loads_in_float32_without_dropout(workdir, tmp_path):
    from transformers import AutoModelForCausalLM
    from rlhf_trainer.hf import load_policy, load_tokenizer
    m = AutoModelForCausalLM.from_pretrained(workdir / "tiny", attention_dropout=0.1).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    policy = load_policy(str(tmp_path), load_tokenizer(str(workdir / "tiny"), "policy.model", lambda *a: None), 0)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert policy.config.attention_dropout == 0.0 and policy.training
    assert policy.generation_config.top_k is None and policy.generation_config.pad_token_id is not None


def test_tokenizer_without_pad_token_is_given_one_and_says_so(workdir):
    said = []
    task, _ = prepare(workdir, log=said.append)
    assert task.tokenizer.pad_token == task.tokenizer.eos_token
    assert any("no pad token" in s for s in said)


@pytest.mark.parametrize("content,words", [
    ('{"prompt": "a"}\n\n{"prompt": "b"}\n', "line 2 is empty"),
    ('{"prompt": "a"}\n{"prompt": "b"\n', "line 2 is not valid JSON"),
    ('{"prompt": "a"}\n{"text": "b"}\n', "line 2 has no 'prompt' field"),
    ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
    ('{"prompt": [{"role": "user", "content": "hi"}]}\n', "line 1 is a list of chat messages, but the tokenizer"),
    ('', "holds no prompt"),
])
def test_bad_prompts_file_names_the_line(workdir, tmp_path, content, words):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        prepare(workdir, data__prompts=str(path))
    assert words in str(info.value) and "data.prompts" in str(info.value)


def test_response_mask_with_several_eos_ids():
    """A model may stop on any of several ids (Qwen's <|im_end|> and <|endoftext|>)."""
    from rlhf_trainer.sequences import response_mask
    r = torch.tensor([[5, 7, 9, 7], [8, 5, 5, 5], [5, 5, 5, 5]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(response_mask(r, [7, 8], True), expected)
    assert torch.equal(response_mask(r, 7, True)[0], expected[0])


def test_prompts_text_file_and_chat_template(workdir, tmp_path):
    from rlhf_trainer import hf
    from rlhf_trainer.sequences import PROMPT_PAD
    (tmp_path / "p.txt").write_text("a cat\nbanana banana\n")
    task, _ = prepare(workdir, data__prompts=str(tmp_path / "p.txt"))
    assert task.texts == ["a cat", "banana banana"]
    tok = task.tokenizer
    rows = [tok("a cat").input_ids, tok("banana banana").input_ids]
    P = max(map(len, rows))
    for row, ids in zip(task.prompts.tolist(), rows):
        assert row == [PROMPT_PAD] * (P - len(ids)) + ids
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    enc = hf.encode_prompts(["a cat"], tok, True, 64, "p")
    assert enc[0].tolist() == tok("<user>a cat<assistant>", add_special_tokens=False).input_ids
    with pytest.raises(InputError, match=r"p line 2 is \d+ tokens, more than data.max_prompt_len=2"):
        hf.encode_prompts(["a", "a cat sat on a mat"], tok, False, 2, "p")


@pytest.mark.parametrize("fn,words", [
    ("wrong_shape", "returned shape (9,)"),
    ("nan", "returned nan for pair 0"),
    ("words", "not numbers"),
])
def test_bad_reward_function_names_itself_and_the_batch(workdir, tmp_path, fn, words):
    d = real_config(workdir, steps=1)
    d["reward"]["fn"] = "w14_rewards:" + fn
    trainer = trainer_for(Config.from_dict(d), workdir, tmp_path)
    with pytest.raises(InputError) as info:
        trainer.train_step()
    assert words in str(info.value) and "reward.fn w14_rewards:%s on batch 1" % fn in str(info.value)


def test_a_reward_model_without_a_trained_head_is_refused(workdir):
    """A causal LM given as reward.model would score with a random head: refused, named."""
    from rlhf_trainer import hf
    d = real_config(workdir)
    d["reward"]["model"] = str(workdir / "tiny")
    cfg = Config.from_dict(d)
    task, pieces = hf.prepare(cfg, str(workdir), lambda *a: None)
    with pytest.raises(InputError, match="reward.model: .* has no trained scalar head"):
        hf.build_reward(cfg, task, pieces, torch.device("cpu"), lambda *a: None)


def test_reward_function_that_cannot_be_imported(workdir):
    with pytest.raises(InputError, match="reward.fn: cannot import module 'no_such_module_w14'"):
        prepare(workdir, reward__fn="no_such_module_w14:f")
    with pytest.raises(InputError, match="reward.fn: module 'w14_rewards' has no function 'nope'"):
        prepare(workdir, reward__fn="w14_rewards:nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line_naming_the_key(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("device: cuda\n")
    rc, out, err = run_cli(capsys, "demo", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"))
    assert rc == 2 and out == ""
    assert err.startswith("config error: device: cuda, but torch sees no CUDA GPU")
    assert len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("text,words", [
    ("device: gpu\n", "device must be one of auto, cpu, cuda, got 'gpu'"),
    ("dtype: float16\n", "dtype must be one of float32, bfloat16, got 'float16'"),
    ("algo: dpo\n", "algo must be one of ppo, grpo"),
    ("ppo: {steps: many}\n", "ppo.steps must be an integer, got 'many'"),
    ("devise: cpu\n", "unknown config key 'devise': the top-level keys are"),
    ("ppo: {lrr: 1}\n", "unknown ppo option(s): lrr (the ppo options are steps, rollout_batch"),
    ("policy: {model: m}\ndata: {prompts: p}\nreward: {fn: f}\n", "reward.fn must be \"module:function\""),
    ("policy: {model: m}\nmodel: {n_layer: 1}\n", "model: a section of the toy task"),
    ("algo: best_of_n\npolicy: {model: m}\n", "on real models algo must be one of ppo, grpo, rloo, reinforce_pp"),
    ("algo: grpo\nvalue: {model: m}\n", "value has no effect with algo: grpo"),
    ("policy: {model: m}\nppo: {temperature: 0.5}\n", "on real models the temperature is generation.temperature"),
])
def test_config_errors_are_one_line_with_the_accepted_values(tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        Config.load(tmp_path / "c.yaml")
    assert words in str(info.value)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("ppo: {lr: 1e-4, clip_high: 3e-1}\n")
    cfg = Config.load(tmp_path / "c.yaml")
    assert cfg.ppo.lr == 1e-4 and cfg.ppo.clip_high == 0.3


def test_config_error_on_the_command_line_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("algo: dpo\n")
    rc, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"))
    assert rc == 2
    assert err == ("config error: algo must be one of ppo, grpo, rloo, reinforce_pp, best_of_n, "
                   "expert_iteration, got 'dpo'\n")


def test_demo_refuses_a_config_for_real_models_and_train_one_for_the_toy(tmp_path, capsys):
    (tmp_path / "real.yaml").write_text("policy: {model: m}\ndata: {prompts: p}\nreward: {fn: 'a:b'}\n")
    rc, _, err = run_cli(capsys, "demo", "--config", str(tmp_path / "real.yaml"), "--out", str(tmp_path / "d"))
    assert rc == 2 and err.startswith("config error: policy: the demo runs the toy task")
    (tmp_path / "toy.yaml").write_text("algo: ppo\n")
    rc, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "toy.yaml"), "--out", str(tmp_path / "t"))
    assert rc == 2 and err.startswith("config error: policy: train needs a run on real models")
    assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "d")


def test_out_of_memory_is_caught_once_with_the_sizes_and_what_to_lower(workdir, tmp_path, monkeypatch):
    from rlhf_trainer import ppo, train
    calls = []

    def oom(self, evaluate=False):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ppo.PPOTrainer, "train_step", oom)
    with pytest.raises(InputError) as info:
        train.run(Config.from_dict(real_config(workdir)), str(tmp_path), log=lambda *a: None, progress=False,
                  config_dir=str(workdir))
    msg = str(info.value)
    assert len(calls) == 1
    for words in ("out of memory at step 1", "grpo.rollout_batch=8", "grpo.micro_batch=2",
                  "generation.max_new_tokens=6", "lower grpo.micro_batch first"):
        assert words in msg


def test_run_directory_is_not_overwritten(tmp_path):
    from rlhf_trainer.train import prepare_run_dir
    run = tmp_path / "run"
    assert prepare_run_dir(str(run), False, False, "x") == str(run)
    (run / "config.yaml").write_text("{}")
    with pytest.raises(InputError, match="already holds a run: --resume continues it, --overwrite replaces it"):
        prepare_run_dir(str(run), False, False, "x")
    assert prepare_run_dir(str(run), True, False, "x") == str(run) and os.path.exists(run / "config.yaml")
    prepare_run_dir(str(run), False, True, "x")
    assert os.listdir(run) == [".run"]            # emptied, and claimed by this run (rundir.MARKER)
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a run directory"):
        prepare_run_dir(str(other), False, True, "x")
    assert os.path.exists(other / "notes.txt")


# ---------- the command line ----------
def test_help_lists_every_command_one_line_each():
    """In a subprocess: argparse wraps to the terminal's width, which pytest's capture changes."""
    from rlhf_trainer.__main__ import COMMANDS
    p = subprocess.run([sys.executable, "-m", "rlhf_trainer", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="80"))
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0] == "usage: python -m rlhf_trainer <command> [options]"
    for name, text in COMMANDS:
        assert sum(1 for line in lines if re.match(r"\s+%s\s+%s$" % (name, re.escape(text)), line)) == 1, name


def test_missing_trainer_dependencies_name_the_extra(monkeypatch, capsys):
    from rlhf_trainer import __main__ as cli
    monkeypatch.setitem(cli.TRAINER_DEPS, "no_such_module_w14", "tqdm")
    assert cli.main(["plot", "x"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'rlhf-kernels[trainer]'" in err and "missing: tqdm" in err


def test_documented_train_and_rm_configs_load():
    """The "Train your own model" configs (train, rm) of docs/train_your_own_model.md are valid configs."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "train_your_own_model.md")).read()
    section = doc.split("## Train your own model", 1)[1].split("\n## ", 1)[0]
    train, rm = (Config.from_dict(yaml.safe_load(b)) for b in re.findall(r"```yaml\n(.*?)```", section, re.S))
    assert train.real and train.policy.model and train.data.prompts and train.reward.model and train.reward.fn
    assert train.algo == "grpo" and train.dtype == "bfloat16" and train.gradient_checkpointing
    assert rm.rm.data == "prefs.jsonl"
