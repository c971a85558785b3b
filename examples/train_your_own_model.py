"""Train your own model, end to end, on a CPU in about a minute.

    python examples/train_your_own_model.py --out runs/own-model

Writes into OUT everything `python -m rlhf_trainer rm|train` need, then runs the two commands as
you would (see docs/train_your_own_model.md for every key):

    OUT/tiny-llama/      a tiny Llama and its byte-level BPE tokenizer (save_pretrained): your "SFT model"
    OUT/prompts.jsonl    {"prompt": ...} per line
    OUT/my_rewards.py    a reward function, fn(prompts, responses) -> one number per pair
    OUT/prefs.jsonl      preference pairs {"prompt", "chosen", "rejected"} (and prefs-heldout.jsonl)
    OUT/rm.yaml          -> python -m rlhf_trainer rm --config rm.yaml --out rm
    OUT/train.yaml       -> python -m rlhf_trainer train --config train.yaml --out train
                            (GRPO against the reward model just trained plus my_rewards:letters)

The model is random and tiny (2 layers, hidden size 32), so the run shows the plumbing, not a
useful policy: swap in your own model folder, prompts, reward and preferences. Needs the trainer's
dependencies (`pip install 'rlhf-kernels[trainer]'`: transformers, which brings tokenizers, tqdm,
pyyaml, matplotlib). OUT must not exist yet.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REWARDS = '''"""The reward function: train.yaml names it as my_rewards:letters."""


def letters(prompts, responses):
    """+1 per 'a' in the response, -0.1 per character."""
    return [r.count("a") - 0.1 * len(r) for r in responses]
'''

PROMPTS = ["a cat", "the mat", "banana", "sat on", "ate a", "an", "cat sat on a", "b"]

RM_YAML = """device: cpu
dtype: float32
rm:
  model: tiny-llama              # a new scalar head on this model's weights
  data: prefs.jsonl
  eval_data: prefs-heldout.jsonl
  epochs: 3
  batch_size: 4                  # comparisons per step
  lr: 3.0e-03
  max_len: 64
"""

TRAIN_YAML = """algo: grpo
beta: 0.05
device: cpu
dtype: float32
seed: 0
policy:
  model: tiny-llama
reward:
  model: rm/model                # written by the rm command
  fn: my_rewards:letters         # added to the reward model's score
data:
  prompts: prompts.jsonl
  key: prompt
generation:
  temperature: 0.9               # also the temperature of every log-probability
  top_p: 1.0
  max_new_tokens: 8
grpo:
  steps: {steps}
  rollout_batch: 8               # 2 prompts x group_size 4
  group_size: 4
  minibatch: 4
  micro_batch: 2
  epochs: 1
  lr: 1.0e-02
"""


def save_tiny_llama(folder):
    """A random 2-layer Llama (hidden size 32) and a byte-level BPE tokenizer trained on one
    sentence (272 tokens, EOS but no pad token), saved with save_pretrained into ``folder``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a cat sat on a mat and ate a banana"] * 8, vocab_size=272,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                                         bos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def write_inputs(out, steps):
    """The model, tokenizer, prompts, reward module, preferences and the two configs."""
    save_tiny_llama(os.path.join(out, "tiny-llama"))

    def jsonl(name, rows):
        with open(os.path.join(out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    jsonl("prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    jsonl("prefs.jsonl", [{"prompt": p, "chosen": "a banana a cat", "rejected": "the mat"} for p in PROMPTS])
    jsonl("prefs-heldout.jsonl", [{"prompt": p, "chosen": "a cat ate a banana", "rejected": "on the mat"}
                                  for p in PROMPTS[:4]])
    for name, text in (("my_rewards.py", REWARDS), ("rm.yaml", RM_YAML), ("train.yaml", TRAIN_YAML.format(steps=steps))):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


def trainer(out, *args):
    """`python -m rlhf_trainer ARGS` in OUT (the reward module is imported from the working
    directory). From a checkout, the checkout's rlhf_kernels and rlhf_trainer come first."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    if os.path.isdir(os.path.join(root, "python", "rlhf_trainer")):
        env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python")]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "rlhf_trainer", *args, "--no-progress"]
    print("$ (cd %s && python -m rlhf_trainer %s)" % (out, " ".join(args)), flush=True)
    subprocess.run(cmd, cwd=out, env=env, check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/own-model", help="a new folder for the inputs and both runs")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps (default 4)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        p.error("--out %s exists: give a new folder" % args.out)
    os.makedirs(out)
    t0 = time.perf_counter()
    write_inputs(out, args.steps)
    trainer(out, "rm", "--config", "rm.yaml", "--out", "rm")
    trainer(out, "train", "--config", "train.yaml", "--out", "train")
    with open(os.path.join(out, "train", "summary.json")) as f:
        s = json.load(f)
    print("done in %.0f s: %d GRPO steps, mean reward %.3f -> %.3f; the policy is in %s"
          % (time.perf_counter() - t0, s["steps"], s["score_start"], s["score_end"], s["policy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
