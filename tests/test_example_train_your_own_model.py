"""examples/train_your_own_model.py runs as a user would run it: it writes a tiny model and
tokenizer, prompts, a reward module and preference pairs, then `rlhf_trainer rm` and `train`
succeed on them and leave what docs/train_your_own_model.md says they leave."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("transformers", reason="the trainer's dependencies are not installed")


@pytest.mark.slow  # about 40 s of CPU time: three processes that import torch and transformers
def test_example_trains_a_reward_model_then_the_policy(tmp_path):
    out = tmp_path / "own"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_your_own_model.py"), "--out", str(out),
                        "--steps", "3"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rm = json.load(open(out / "rm" / "summary.json"))
    assert rm["kind"] == "bt" and rm["eval_accuracy"] is not None and os.path.isdir(out / "rm" / "model")
    train = json.load(open(out / "train" / "summary.json"))
    assert set(train) == {"algo", "steps", "score_start", "score_end", "kl_seq_sum_end", "samples_drawn", "device",
                          "dtype", "train_s", "wall_s", "policy", "world_size"}   # the fields docs/trainer.md lists
    assert train["algo"] == "grpo" and train["steps"] == 3 and train["samples_drawn"] == 3 * 8
    log = [json.loads(line) for line in open(out / "train" / "log.jsonl")]
    assert len(log) == 3 and [r["step"] for r in log] == [1, 2, 3]
    for f in ("config.yaml", "checkpoint.pt", "curves.png", "policy/config.json"):
        assert os.path.exists(out / "train" / f), f
    assert "done in" in p.stdout and "GRPO steps" in p.stdout
    # an existing --out is refused, not written over
    again = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_your_own_model.py"), "--out",
                            str(out)], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "exists" in again.stderr
