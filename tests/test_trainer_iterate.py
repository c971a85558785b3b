"""Iterated RLHF (``iterate:``) and the over-optimization sweep (``rlhf_trainer overopt``) on a
tiny toy task (12 prompts, 64 responses each), every figure exact."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf_trainer import iterate
from rlhf_trainer.config import Config, ConfigError
from rlhf_trainer.toy import ToyTask
from tests._helpers import run_small, toy_config


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the models are tiny


def tiny(iterate_section=None, ppo_steps=30, num_train=64, algo="ppo", **top):
    """A 1-layer, 32-wide GPT-2 on responses of 2 tokens over 8 (64 per prompt, 12 prompts); a weak first
    reward model: num_train comparisons."""
    if iterate_section is not None:
        top["iterate"] = iterate_section
    return toy_config(algo, {"steps": ppo_steps, "rollout_batch": 64, "minibatch": 32, "micro_batch": 32},
                      device="cpu", model={"n_layer": 1, "n_embd": 32, "n_head": 2},
                      task={"modulus": 6, "steps": [1, 5], "response_len": 2, "pad_token_id": 6, "eos_token_id": 7,
                            "vocab_size": 8},
                      reward_model={"num_train": num_train, "num_eval": 256, "batch_size": 64, "steps": 300},
                      eval_every=100, **top)


@pytest.mark.slow
def test_rounds_raise_the_true_reward_above_one_round(tmp_path):
    """A first reward model from 64 comparisons (held-out accuracy about 0.8): PPO against it reaches a
    hidden-rule reward of about 0.23, and no amount of training on it more than its exact optimum's, about
    0.34. Two more rounds of 512 policy pairs labelled by the rule reach about 0.47 (measured: 0.229, 0.341
    and 0.471). Asserted margins: 0.1 above round 1, and above round 1's reward model's own optimum."""
    cfg = tiny({"rounds": 3, "comparisons_per_round": 512, "label_noise": 0.0})
    summary, rows = iterate.run(cfg, str(tmp_path), log=print, progress=False)
    print(json.dumps(rows, indent=1))
    first, last = rows[0], rows[-1]
    assert last["J_rule"] > first["J_rule"] + 0.1
    # the later reward models judge the policy's own pairs better than the first did
    assert last["rm_accuracy_policy"] > first["rm_accuracy_policy"]
    assert [r["comparisons"] for r in rows] == [64, 64 + 512, 64 + 1024]
    # the log: one line per round with the documented keys, and each round's per-step log
    lines = [json.loads(line) for line in open(tmp_path / "rounds.jsonl")]
    assert lines == rows and all(list(r) == iterate.ROUND_KEYS for r in lines)
    for k in (1, 2, 3):
        assert len(open(tmp_path / ("round_%d" % k) / "log.jsonl").read().splitlines()) == 30
    assert summary["J_rule_end"] == last["J_rule"] and summary["samples_drawn"] == 3 * 30 * 64
    # the initial comparisons are the first reward model's own: its held-out accuracy is reproduced
    assert first["rm_accuracy_initial"] == summary["rm_accuracy_first"]
    # exact: J <= J*, and the proxy reward and KL give J
    for r in rows:
        assert r["J"] <= r["J_star"] + 1e-9
        assert r["J"] == pytest.approx(r["proxy_reward"] - cfg.beta * r["exact_kl"], abs=1e-9)


def test_one_round_is_the_plain_run(tmp_path):
    """rounds: 1 trains exactly what the demo trains: the same J and hidden-rule reward, bit for bit."""
    from rlhf_trainer.demo import run
    plain = run(tiny(ppo_steps=6), str(tmp_path / "plain"), log=print, progress=False)
    _, rows = iterate.run(tiny({"rounds": 1}, ppo_steps=6), str(tmp_path / "iter"), log=print, progress=False)
    assert rows[0]["J"] == plain["J_end"] and rows[0]["J_rule"] == plain["rule_reward_end"]
    assert rows[0]["J_start"] == plain["J_start"] and rows[0]["exact_kl"] == plain["kl_end"]


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce_pp"])
def test_every_rl_algorithm_iterates(tmp_path, algo):
    """Two short rounds of a critic-free algorithm: the second round continues the first's policy
    (its start is the first's end, scored by the new reward model) and its reward model saw the pool."""
    _, rows = iterate.run(tiny({"rounds": 2, "comparisons_per_round": 64, "rm_update": "finetune"}, ppo_steps=2,
                               algo=algo), str(tmp_path), log=print, progress=False)
    assert [r["comparisons"] for r in rows] == [64, 128]
    assert rows[1]["exact_kl"] > 0 and rows[1]["J"] <= rows[1]["J_star"] + 1e-9
    # round 1 starts at pi_ref, round 2 where round 1 ended (the same policy: the same exact KL)
    assert rows[0]["exact_kl_start"] == pytest.approx(0, abs=1e-9)
    assert rows[1]["exact_kl_start"] == pytest.approx(rows[0]["exact_kl"], rel=1e-6)


def test_labeler_follows_the_rule_with_its_noise():
    task = ToyTask(tiny().task)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    pid = torch.randint(0, task.num_prompts, (n,), generator=gen)
    a = task.responses_with_score(pid, torch.full((n,), 2), gen)     # both tokens follow the rule
    b = task.responses_with_score(pid, torch.full((n,), 1), gen)     # one does
    chosen, _ = iterate.label_pairs(task, pid, a, b, 0.0, gen)
    assert torch.equal(chosen, a)
    chosen, _ = iterate.label_pairs(task, pid, a, b, 0.5, gen)
    frac = (chosen == a).all(-1).double().mean().item()
    p = torch.sigmoid(torch.tensor(2.0)).item()                     # sigmoid(1 token / 0.5)
    assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5
    c = task.responses_with_score(pid, torch.full((n,), 1), gen)     # ties with b: a coin flip
    differ = (b != c).any(-1)
    chosen, _ = iterate.label_pairs(task, pid, b, c, 0.0, gen)
    frac = (chosen[differ] == b[differ]).all(-1).double().mean().item()
    assert differ.sum() > n / 4 and abs(frac - 0.5) < 4 * (0.25 / differ.sum().item()) ** 0.5


@pytest.mark.parametrize("d,words", [
    ({"algo": "best_of_n", "iterate": {}}, "iterate: iterated RLHF trains a policy: algo must be one of ppo, grpo, "
                                           "rloo, reinforce_pp, got 'best_of_n'"),
    ({"iterate": {"rounds": 0}}, "iterate.rounds must be >= 1, got 0"),
    ({"iterate": {"comparisons_per_round": 0}}, "iterate.comparisons_per_round must be >= 1, got 0"),
    ({"iterate": {"rm_update": "warm"}}, "iterate.rm_update must be one of scratch, finetune, got 'warm'"),
    ({"iterate": {"labeler": "mod:fn"}}, "iterate.labeler must be 'rule' on the toy task"),
    ({"iterate": {"label_noise": -1.0}}, "iterate.label_noise must be >= 0"),
    ({"iterate": {"round": 2}}, "unknown iterate option(s): round (the iterate options are rounds, "
                                "comparisons_per_round, labeler, label_noise, rm_update, true_reward)"),
    ({"iterate": {}, "checkpoint_every": 5}, "checkpoint_every has no effect with iterate"),
    ({"iterate": 3}, "iterate must be a mapping of options, got 3"),
])
def test_iterate_config_errors_name_the_key(d, words):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert words in str(info.value)


def test_iterate_config_round_trip(tmp_path):
    cfg = Config.from_dict({"algo": "grpo", "iterate": {"rounds": 2, "rm_update": "finetune"}})
    assert cfg.iterate.rounds == 2 and cfg.iterate.comparisons_per_round == 1024
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    assert "iterate" not in Config().to_dict()         # absent unless given: a plain run's config is unchanged


# ---------- python -m rlhf_trainer overopt --small ----------

def test_peak_and_fall_of_a_curve():
    from rlhf_trainer.overopt import peak
    curve = [{"exact_kl": k, "true_reward": t} for k, t in [(0, 0.1), (1, 0.3), (2, 0.5), (3, 0.2), (4, 0.25)]]
    p = peak(curve)
    assert (p["exact_kl"], p["true_reward"], p["low"], p["low_kl"]) == (2, 0.5, 0.2, 3)
    assert p["fall"] == pytest.approx(0.3)
    assert peak(curve[:3])["fall"] == 0                       # peaks at its end: no fall


def test_biased_comparisons_pair_the_spurious_token_with_the_better_response():
    from rlhf_trainer.overopt import SPURIOUS, biased_comparisons
    task = ToyTask(tiny().task)
    pid, resp, valid = biased_comparisons(task, 4000, torch.Generator().manual_seed(0))
    L = task.cfg.response_len
    better, worse = task.rule_reward(pid, resp[:, 0]) * L, task.rule_reward(pid, resp[:, 1]) * L
    assert (better > worse).all() and valid.all()             # labelled by the rule
    off = resp != task.targets[pid][:, None]                  # positions that do not follow the rule
    assert (resp[:, 0][off[:, 0]] == SPURIOUS).all()          # the better one: the spurious token there
    assert not (resp[:, 1][off[:, 1]] == SPURIOUS).any()      # the worse one: never


@pytest.fixture(scope="module")
def overopt_small(tmp_path_factory):
    return run_small("overopt", tmp_path_factory.mktemp("overopt"))


def test_overopt_small_writes_its_figure_and_table(overopt_small):
    import csv
    from rlhf_trainer.overopt import BETAS, COLUMNS
    out, stdout = overopt_small
    for name in ("overopt.png", "overopt.csv", "overopt.json", "config.yaml"):
        assert os.path.getsize(out / name) > 200, name
    rows = list(csv.DictReader(open(out / "overopt.csv")))
    assert list(rows[0]) == COLUMNS
    assert {r["curve"] for r in rows} == {"exact", "ppo", "iterated"}
    assert {float(r["beta"]) for r in rows if r["curve"] == "ppo"} == set(BETAS)
    assert "true reward" in stdout and "peaks at" in stdout and "CPU" in stdout


def test_overopt_small_curves_are_exact(overopt_small):
    """Along the exact curve pi*_beta (beta decreasing) the KL and the proxy reward only rise (the proxy's
    optimum trades KL for reward), from pi_ref (KL 0) to the proxy's argmax; the peak is the curve's
    highest true reward; trained runs never beat J* of their beta."""
    out, _ = overopt_small
    res = json.load(open(out / "overopt.json"))
    exact = [p for p in res["points"] if p["curve"] == "exact" and p["round"] == 1]
    assert exact[0]["beta"] is None and exact[0]["exact_kl"] == pytest.approx(0, abs=1e-12)
    assert exact[-1]["beta"] == 0
    for a, b in zip(exact, exact[1:]):
        assert b["exact_kl"] >= a["exact_kl"] - 1e-9 and b["proxy_reward"] >= a["proxy_reward"] - 1e-9
    assert res["peak"]["true_reward"] == max(p["true_reward"] for p in exact) and res["peak"]["fall"] >= 0
    # a trained policy's proxy reward at a given KL is at most the curve's: pi*_beta maximizes E[r] - beta KL
    import numpy as np
    kl = np.array([p["exact_kl"] for p in exact])
    proxy = np.array([p["proxy_reward"] for p in exact])
    for p in (p for p in res["points"] if p["curve"] == "ppo"):
        assert p["proxy_reward"] <= np.interp(p["exact_kl"], kl, proxy) + 1e-2
    assert [r["round"] for r in res["rounds"]] == [1, 2] and len(res["round_peaks"]) == 2


def test_finetune_starts_from_the_previous_reward_model():
    """rm_update: finetune continues the given model (one tiny step keeps its scores), scratch does not."""
    cfg = tiny()
    cfg.reward_model.steps, cfg.reward_model.lr = 1, 1e-6
    task = ToyTask(cfg.task)
    train, held_out = iterate.initial_comparisons(task, cfg.reward_model, 0)
    pool, scale_on = iterate.as_pairs(*train), tuple(t[:256] for t in train)
    gen = torch.Generator().manual_seed(1)
    big = tiny()      # a trained model to continue from
    first = iterate.fit_reward_model(task, big, pool, scale_on, gen, torch.device("cpu"))
    tuned = iterate.fit_reward_model(task, cfg, pool, scale_on, gen, torch.device("cpu"), init=first)
    fresh = iterate.fit_reward_model(task, cfg, pool, scale_on, gen, torch.device("cpu"))
    pid, resp = held_out[0], held_out[1]
    s_first, s_tuned, s_fresh = (torch.stack(iterate._pair_scores(m, task, pid, resp[:, 0], resp[:, 1]))
                                 for m in (first, tuned, fresh))
    torch.testing.assert_close(s_tuned, s_first, rtol=0, atol=1e-2)
    assert (s_fresh - s_first).abs().max() > 0.5
    assert all(not p.requires_grad for p in tuned.parameters())


def test_demo_runs_an_iterate_config(tmp_path):
    """`rlhf_trainer demo --config` with an iterate section: the rounds' table; --resume is refused."""
    import yaml
    d = tiny({"rounds": 2, "comparisons_per_round": 64}, ppo_steps=2).to_dict()
    d["reward_model"].update(steps=20)
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-m", "rlhf_trainer", "demo", "--config", str(tmp_path / "it.yaml"), "--no-progress"]
    p = subprocess.run(cmd + ["--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| round | comparisons |" in p.stdout and "\n| 2 | 128 |" in p.stdout
    assert len(open(tmp_path / "run" / "rounds.jsonl").read().splitlines()) == 2
    p = subprocess.run(cmd + ["--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True)
    assert p.returncode == 2 and "iterate: an iterated run is not checkpointed" in p.stderr
