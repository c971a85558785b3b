"""Iterated RLHF on real models (``rlhf_trainer train`` with an ``iterate:`` section): a tiny Llama
saved with save_pretrained, a labeler defined here, the reward model retrained by ``rlhf_trainer rm``'s
code on the pooled pairs each round."""

import json
import os
import traceback

import pytest
import torch
import yaml

from rlhf_trainer import iterate_hf
from rlhf_trainer.config import Config, ConfigError, InputError
from test_trainer_real import read_log, real_config, run_cli, strip, workdir  # noqa: F401 (the tiny Llama fixture)

LABELERS = '''
def longer(prompts, a, b):
    """Prefers the longer response; a tie: either, with probability 0.5."""
    return [1 if len(x) > len(y) else 0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]

def count_a(prompts, responses):
    return [r.count("a") for r in responses]

calls = []

def breaks_on_batch_2(prompts, a, b):
    calls.append(len(a))
    return [True] * len(a) if len(calls) == 1 else [0.5] * (len(a) + 1)

def raises(prompts, a, b):
    return {}["no such key"]
'''


@pytest.fixture(scope="module")
def wd(workdir):
    (workdir / "w25_labelers.py").write_text(LABELERS)
    return workdir


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the models are tiny


def iter_config(d, rounds=2, per_round=6, steps=2, reward=None, **it):
    """GRPO on the tiny Llama, rounds of `steps` steps; the reward model from the 8 pairs of pairs.jsonl."""
    cfg = real_config(d, steps=steps)
    if reward is None:
        del cfg["reward"]
    else:
        cfg["reward"] = reward
    cfg["rm"] = {"model": str(d / "tiny"), "data": str(d / "pairs.jsonl"), "epochs": 1, "batch_size": 4, "lr": 3e-3}
    cfg["iterate"] = {"rounds": rounds, "comparisons_per_round": per_round, "labeler": "w25_labelers:longer", **it}
    return cfg


def run_iterated(d, out, **kw):
    return iterate_hf.run(Config.from_dict(iter_config(d, **kw)), str(out), log=lambda *a: None, progress=False,
                          config_dir=str(d))


def lines(path):
    return [json.loads(x) for x in open(path)]


def test_two_rounds_label_pool_and_retrain(wd, tmp_path):
    """Round 2 continues round 1's policy against the same reference; the round's 6 pairs (batches of 4
    and 2) are labelled by the labeler, logged, and pooled with the 8 initial pairs for reward model 2."""
    summary, rows = run_iterated(wd, tmp_path, true_reward="w25_labelers:count_a")
    assert lines(tmp_path / "rounds.jsonl") == rows and all(list(r) == iterate_hf.ROUND_KEYS for r in rows)
    assert [r["comparisons"] for r in rows] == [8, 14]
    for k, row in enumerate(rows, 1):
        rm = json.load(open(tmp_path / ("rm_%d" % k) / "summary.json"))
        assert rm["comparisons"] == row["comparisons"] and rm["eval_accuracy"] == row["rm_accuracy_initial"]
        assert len(read_log(tmp_path / ("round_%d" % k))) == 2
        pairs = lines(tmp_path / ("round_%d" % k) / "pairs.jsonl")
        assert len(pairs) == 6
        # the labeler's order: the chosen response is never the shorter
        assert all(len(p["chosen"]) >= len(p["rejected"]) for p in pairs)
        assert any(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
        # the true reward is iterate.true_reward's mean over the round's 12 responses
        texts = [p[x] for p in pairs for x in ("chosen", "rejected")]
        assert row["true_reward"] == pytest.approx(sum(t.count("a") for t in texts) / 12)
        assert row["policy_pairs"] == sum(p["chosen"] != p["rejected"] for p in pairs)
        assert row["rm_accuracy_policy"] is None or 0 <= row["rm_accuracy_policy"] <= 1
        assert 0 <= row["labeler_mean"] <= 1 and row["proxy_reward"] == row["proxy_reward"]
    # reward model 2 was trained on the initial pairs and round 1's, in that order
    pooled = open(tmp_path / "rm_2" / "data.jsonl").read().splitlines()
    initial = open(wd / "pairs.jsonl").read().splitlines()
    assert pooled == initial + open(tmp_path / "round_1" / "pairs.jsonl").read().splitlines()
    assert yaml.safe_load(open(tmp_path / "rm_2" / "config.yaml"))["rm"]["model"] == str(wd / "tiny")   # scratch
    # round 1 starts at the reference (KL 0); round 2 where round 1 ended, against the same reference
    r1, r2 = read_log(tmp_path / "round_1"), read_log(tmp_path / "round_2")
    assert r1[0]["kl_seq_sum"] == pytest.approx(0, abs=1e-5) and abs(r2[0]["kl_seq_sum"]) > 1e-4
    assert summary["comparisons"] == 14 and summary["samples_drawn"] == 2 * 2 * 8
    assert summary["true_reward_end"] == rows[-1]["true_reward"]
    assert os.path.exists(tmp_path / "policy" / "config.json") and os.path.exists(tmp_path / "round_2" / "curves.png")


def test_one_round_is_the_plain_run(wd, tmp_path):
    """rounds: 1 trains exactly what `train` trains with reward.model = the run's rm_1/model (and the same
    reward.fn, added to its score): the same per-step log."""
    from rlhf_trainer import train
    _, rows = run_iterated(wd, tmp_path / "iter", rounds=1, steps=3, reward={"fn": "w14_rewards:letters"})
    plain = real_config(wd, steps=3)
    plain["reward"]["model"] = str(tmp_path / "iter" / "rm_1" / "model")
    os.makedirs(tmp_path / "plain")
    train.run(Config.from_dict(plain), str(tmp_path / "plain"), log=lambda *a: None, progress=False,
              config_dir=str(wd))
    a, b = strip(read_log(tmp_path / "iter" / "round_1")), strip(read_log(tmp_path / "plain"))
    assert len(a) == 3 and a == b
    assert rows[0]["score_end"] == b[-1]["score_mean"] and rows[0]["true_reward"] is None


def test_finetune_through_the_command_line(wd, tmp_path, capsys, monkeypatch):
    """`train --config` with iterate: the rounds' table; finetune starts reward model 2 from reward model 1;
    --resume is refused."""
    cfg = iter_config(wd, steps=1, per_round=2, rm_update="finetune")
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(wd)
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "--config", str(tmp_path / "it.yaml"), "--out", str(out),
                              "--no-progress")
    assert rc == 0, err
    assert "| round | comparisons |" in stdout and "| 2 | 10 |" in stdout and "run directory: %s" % out in stdout
    assert yaml.safe_load(open(out / "rm_2" / "config.yaml"))["rm"]["model"] == str(out / "rm_1" / "model")
    saved = Config.load(out / "config.yaml")
    assert saved.to_dict() == Config.from_dict(cfg).to_dict() and "label_noise" not in saved.to_dict()["iterate"]
    rc, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "it.yaml"), "--out", str(out), "--resume")
    assert rc == 2 and err == "config error: iterate: an iterated run is not checkpointed, so --resume cannot " \
                              "continue it\n"


@pytest.mark.parametrize("out,words", [
    ([1, 0], "returned shape (2,): it must return one number in [0, 1] per pair"),
    ([0.5, 1.5, 0], "returned 1.5 for pair 1"),
    ([0, float("nan"), 0], "returned nan for pair 1"),
    (["a", "b", "a"], "not numbers"),
    (None, "not numbers"),
])
def test_labeler_output_is_checked(out, words):
    with pytest.raises(InputError) as info:
        iterate_hf.label(lambda p, a, b: out, "m:f", ["p"] * 3, ["x"] * 3, ["y"] * 3, "2 of round 3",
                         torch.Generator())
    assert str(info.value).startswith("iterate.labeler m:f on batch 2 of round 3 (3 pairs) returned ")
    assert words in str(info.value)


def test_labeler_numbers_are_drawn():
    """1/True: a, 0/False: b, p between: a with probability p."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    a_wins, p = iterate_hf.label(lambda pr, a, b: [True, 0, 1.0, False] * (n // 4), "m:f", ["p"] * n, ["x"] * n,
                                 ["y"] * n, 1, gen)
    assert a_wins.tolist() == [True, False, True, False] * (n // 4) and p.dtype == torch.float64
    a_wins, _ = iterate_hf.label(lambda pr, a, b: torch.full((n,), 0.25), "m:f", ["p"] * n, ["x"] * n, ["y"] * n, 1,
                                 gen)
    assert abs(a_wins.double().mean().item() - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5


def test_labeler_errors_in_a_run_name_the_round_and_batch(wd, tmp_path):
    """A bad answer in batch 2 is one line naming iterate.labeler, the round and the batch; an exception
    raised inside the labeler keeps its type and traceback, with a note naming them."""
    with pytest.raises(InputError) as info:
        run_iterated(wd, tmp_path / "a", rounds=1, steps=1, per_round=6, labeler="w25_labelers:breaks_on_batch_2")
    assert str(info.value).startswith("iterate.labeler w25_labelers:breaks_on_batch_2 on batch 2 of round 1 "
                                      "(2 pairs) returned shape (3,)")
    with pytest.raises(KeyError) as info:
        run_iterated(wd, tmp_path / "b", rounds=1, steps=1, labeler="w25_labelers:raises")
    assert info.value.__notes__ == ["raised in iterate.labeler w25_labelers:raises on batch 1 of round 1 (4 pairs)"]
    assert traceback.extract_tb(info.tb)[-1].name == "raises"


def test_bad_labeler_or_data_fails_before_training(wd, tmp_path):
    with pytest.raises(InputError, match="iterate.labeler: cannot import module 'no_such_module_w25'"):
        run_iterated(wd, tmp_path / "a", labeler="no_such_module_w25:f")
    with pytest.raises(InputError, match="iterate.true_reward: module 'w25_labelers' has no function 'nope'"):
        run_iterated(wd, tmp_path / "b", true_reward="w25_labelers:nope")
    cfg = iter_config(wd)
    cfg["rm"]["data"] = str(wd / "ranked.jsonl")
    with pytest.raises(InputError, match=r"rm.data: .*ranked.jsonl holds rankings; an iterated run pools the "
                                         r"labeler's pairs with it, so it must hold pairs"):
        iterate_hf.run(Config.from_dict(cfg), str(tmp_path / "c"), log=lambda *a: None, progress=False)
    assert not os.path.exists(tmp_path / "c" / "rm_1")


REAL = {"policy": {"model": "m"}, "data": {"prompts": "p"}, "rm": {"model": "m", "data": "d"}}


@pytest.mark.parametrize("d,words", [
    (dict(REAL, iterate={}), "iterate.labeler must be \"module:function\" on real models (a function labelling "
                             "pairs of responses; 'rule' is the toy task's hidden rule), got 'rule'"),
    (dict(REAL, iterate={"labeler": "nocolon"}), "iterate.labeler must be \"module:function\" on real models"),
    ({"policy": {"model": "m"}, "data": {"prompts": "p"}, "iterate": {"labeler": "a:b"}},
     "iterate: on real models the reward model is trained in the run: give an rm section"),
    (dict(REAL, reward={"model": "r"}, iterate={"labeler": "a:b"}), "reward.model has no effect with iterate"),
    (dict(REAL, iterate={"labeler": "a:b", "label_noise": 0.1}), "iterate.label_noise has no effect on real models"),
    (dict(REAL, iterate={"labeler": "a:b", "true_reward": "x"}),
     "iterate.true_reward must be \"module:function\" or null, got 'x'"),
    (dict(REAL, iterate={"labeler": "a:b", "rm_update": "warm"}),
     "iterate.rm_update must be one of scratch, finetune, got 'warm'"),
    ({"iterate": {"true_reward": "a:b"}}, "iterate.true_reward has no effect on the toy task"),
])
def test_iterate_config_errors_on_real_models(d, words):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_real_iterate_config_round_trip(tmp_path):
    cfg = Config.from_dict(dict(REAL, algo="grpo", iterate={"labeler": "a:b", "true_reward": "c:d"}))
    assert cfg.reward is None and cfg.iterate.true_reward == "c:d"
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    assert "true_reward" not in Config.from_dict({"iterate": {}}).to_dict()["iterate"]   # the toy task's


def test_documented_real_iterate_config_loads():
    """The real-model iterate config of docs/iterate_overopt.md, with the policy and data sections it
    refers to, is valid."""
    import re
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "iterate_overopt.md")).read()
    section = doc.split("## Iterated RLHF", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if "my_labels:judge" in b)
    cfg = Config.from_dict(dict(yaml.safe_load(block), policy={"model": "m"}, data={"prompts": "p"}))
    assert cfg.real and cfg.iterate.labeler == "my_labels:judge" and cfg.rm.eval_data == "prefs-heldout.jsonl"
