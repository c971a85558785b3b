"""The trainer's algorithms (grpo, rloo, reinforce_pp, best_of_n, expert_iteration next to ppo),
each measured exactly on the toy task; the exact best-of-n distribution; `compare --small`."""

import csv
import json
import math
import os

import pytest
import torch

import rlhf_kernels as rk
from rlhf_trainer.algos import GroupTrainer, trainer_class
from rlhf_trainer.best_of_n import best_of_n_log_ratio, exact_best_of_n, kl_bound, sample_best_of_n
from rlhf_trainer.config import ALGOS, Config, ConfigError, PPOConfig
from rlhf_trainer.expert_iteration import ExpertIterationTrainer
from rlhf_trainer.models import build_policy, frozen_copy
from rlhf_trainer.ppo import LOG_KEYS
from rlhf_trainer.toy import ExactEvaluator, ToyTask, all_response_logprobs, sequence_logprobs
from tests._helpers import run_small, toy_config


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the models are tiny


# ---------- the exact best-of-n distribution ----------

def monte_carlo_best_of_n(ref_logp, scores, n, draws, gen):
    """Draw n responses from pi_ref, keep the best (the first drawn among ties): frequencies [P, R]."""
    P, R = ref_logp.shape
    freq = torch.zeros(P, R, dtype=torch.float64)
    for i in range(P):
        idx = torch.multinomial(ref_logp[i].exp(), draws * n, replacement=True, generator=gen).view(draws, n)
        best = idx.gather(1, scores[i][idx].argmax(1, keepdim=True)).squeeze(1)
        freq[i] = torch.bincount(best, minlength=R).double() / draws
    return freq


def chi2_critical(k, z=2.782):
    """The chi-square quantile with k degrees of freedom at the one-sided normal level z
    (2.782: p = 0.0027, the two-sided three-sigma level), Wilson-Hilferty."""
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_best_of_n_distribution_matches_monte_carlo(n):
    """P_n(y) = F(y)^n - F(y-)^n, ties sharing in proportion to pi_ref, against drawing n from pi_ref
    and keeping the best. Per prompt: E[r] and the probability of the top response within three
    standard errors, and the whole distribution by a chi-square test at the same (three-sigma) level
    (one test per distribution rather than one per response, which would fail by multiplicity alone)."""
    gen = torch.Generator().manual_seed(n)
    P, R, draws = 3, 9, 40000
    ref_logp = torch.log_softmax(torch.randn(P, R, generator=gen, dtype=torch.float64), -1)
    scores = torch.randint(0, 5, (P, R), generator=gen).double()           # many ties on purpose
    scores[0] = torch.randn(R, generator=gen, dtype=torch.float64)         # and a prompt without any
    log_g, logp = best_of_n_log_ratio(ref_logp, scores, n)
    exact = (logp + log_g).exp()
    torch.testing.assert_close(exact.sum(-1), torch.ones(P, dtype=torch.float64), rtol=0, atol=1e-12)
    mc = monte_carlo_best_of_n(ref_logp, scores, n, draws, gen)
    for i in range(P):
        mean = (exact[i] * scores[i]).sum()
        se = (((exact[i] * scores[i] ** 2).sum() - mean ** 2) / draws).sqrt()
        assert abs((mc[i] * scores[i]).sum() - mean) <= 3 * se
        top = scores[i].argmax()
        p = exact[i, top]
        assert abs(mc[i, top] - p) <= 3 * (p * (1 - p) / draws).sqrt()
        expected, observed = exact[i] * draws, mc[i] * draws
        small = expected < 5                                               # pool the rare responses
        e = torch.cat([expected[~small], expected[small].sum().view(1)])
        o = torch.cat([observed[~small], observed[small].sum().view(1)])
        keep = e > 0
        chi2 = ((o[keep] - e[keep]) ** 2 / e[keep]).sum().item()
        dof = int(keep.sum()) - 1
        if dof > 0:
            assert chi2 <= chi2_critical(dof), (i, chi2, dof)
        else:
            assert torch.equal(o, e)


def test_best_of_n_ties_share_in_proportion_to_the_reference():
    ref_logp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    scores = torch.tensor([[0.0, 1.0, 1.0, 0.5]], dtype=torch.float64)     # responses 1 and 2 tie at the top
    log_g, logp = best_of_n_log_ratio(ref_logp, scores, 3)
    p = (logp + log_g).exp()[0]
    top = 1 - (1 - 0.5) ** 3                                               # some draw lands in the top group
    torch.testing.assert_close(p[1:3], torch.tensor([0.2, 0.3], dtype=torch.float64) / 0.5 * top)
    torch.testing.assert_close(p[3], torch.tensor(0.5 ** 3 - 0.1 ** 3, dtype=torch.float64))
    # every response tied: best-of-n is pi_ref itself, KL 0, whatever n
    log_g, _ = best_of_n_log_ratio(ref_logp, torch.zeros_like(scores), 7)
    assert log_g.abs().max().item() < 1e-12


def test_best_of_n_kl_is_under_the_bound_and_zero_at_one():
    gen = torch.Generator().manual_seed(0)
    ref_logp = torch.log_softmax(2 * torch.randn(4, 1000, generator=gen, dtype=torch.float64), -1)
    scores = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    flat = torch.full((1, 100000), -math.log(100000), dtype=torch.float64)  # near the continuous limit
    for n in [1, 2, 3, 4, 8, 16, 64, 256, 4096]:
        log_g, logp = best_of_n_log_ratio(ref_logp, scores, n)
        kl = ((logp + log_g).exp() * log_g).sum(-1)
        if n == 1:
            assert log_g.eq(0).all() and kl.eq(0).all()                    # exactly pi_ref, exactly 0
        assert (kl <= kl_bound(n) + 1e-12).all(), (n, kl, kl_bound(n))
        log_g, logp = best_of_n_log_ratio(flat, torch.randn(1, 100000, generator=gen, dtype=torch.float64), n)
        kl_flat = ((logp + log_g).exp() * log_g).sum().item()
        assert kl_flat <= kl_bound(n) + 1e-12
        assert kl_flat == pytest.approx(kl_bound(n), abs=5e-3 if n < 4096 else 0.05)


def test_sampled_best_of_n_matches_the_exact_expectation():
    """The real sampler (generate from a GPT-2 reference, score, keep the best) on the toy task."""
    cfg = Config()
    task = ToyTask(cfg.task)
    ref = frozen_copy(build_policy(cfg.model, cfg.task))
    table = torch.randn(task.num_prompts, 1000, generator=torch.Generator().manual_seed(2))
    powers = cfg.task.vocab_size ** torch.arange(cfg.task.response_len - 1, -1, -1)

    def score(pid, responses):
        return table[pid, (responses * powers).sum(-1)]

    ev = ExactEvaluator(task, ref, score, beta=0.1)
    n, Q = 8, 3000
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    pid = torch.randint(0, task.num_prompts, (Q,), generator=gen)
    best, best_scores, responses, all_scores = sample_best_of_n(ref, score, task, pid, n)
    assert responses.shape == (Q, n, cfg.task.response_len) and all_scores.shape == (Q, n)
    torch.testing.assert_close(best_scores, all_scores.max(-1).values)
    # exact E[r] of best-of-n for the sampled prompts
    log_g, logp = best_of_n_log_ratio(ev.ref_logp, ev.scores, n)
    per_prompt = ((logp + log_g).exp() * ev.scores.double()).sum(-1)
    expected = per_prompt[pid].mean().item()
    se = best_scores.double().std().item() / math.sqrt(Q)
    assert abs(best_scores.double().mean().item() - expected) <= 3 * se
    res = exact_best_of_n(ev, n)
    assert res["exact_kl"] <= kl_bound(n) and res["J"] == pytest.approx(res["reward"] - 0.1 * res["exact_kl"])


def test_all_response_logprobs_is_the_per_sequence_sum():
    cfg = Config()
    task = ToyTask(cfg.task)
    policy = build_policy(cfg.model, cfg.task)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    fast = all_response_logprobs(policy, task)
    R = task.all_responses.shape[0]
    slow = sequence_logprobs(policy, task.prompts.repeat_interleave(R, 0),
                             task.all_responses.repeat(task.num_prompts, 1))
    torch.testing.assert_close(fast, slow.view(task.num_prompts, R), rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.double().exp().sum(-1), torch.ones(task.num_prompts, dtype=torch.float64),
                               rtol=0, atol=1e-5)


# ---------- the objective the critic-free algorithms optimize ----------

def test_sequence_k1_penalty_in_the_reward_gives_the_gradient_of_J():
    """grad J(pi) = E_pi[grad log pi(y) (r(y) - beta log pi(y)/pi_ref(y))], exactly, for a softmax
    policy over a few responses: the estimator GroupTrainer follows is unbiased for J."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), -1)
    r = torch.randn(6, generator=gen, dtype=torch.float64)
    beta = 0.3
    logp = torch.log_softmax(theta, -1)
    p = logp.exp()
    J = (p * r).sum() - beta * (p * (logp - ref_logp)).sum()
    (grad_J,) = torch.autograd.grad(J, theta, retain_graph=True)
    R = (r - beta * (logp - ref_logp)).detach()                         # the reward with the k1 penalty
    baseline = (p.detach() * R).sum()                                    # any y-independent baseline
    surrogate = (p.detach() * logp * (R - baseline)).sum()              # E_pi[log pi * A], gradient only via log pi
    (grad_pg,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    torch.testing.assert_close(grad_pg, grad_J, rtol=1e-12, atol=1e-12)
    # GRPO paper's alternative, a k3 term in the loss, has the gradient of the other KL, KL(pi_ref || pi)
    log_ratio = ref_logp - logp
    k3 = (p.detach() * (log_ratio.exp() - 1 - log_ratio)).sum()          # samples from pi, gradient via log pi
    (grad_k3,) = torch.autograd.grad(k3, theta, retain_graph=True)
    (grad_reverse,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), theta, retain_graph=True)
    (grad_forward,) = torch.autograd.grad((p * (logp - ref_logp)).sum(), theta)
    torch.testing.assert_close(grad_k3, grad_reverse, rtol=1e-12, atol=1e-12)
    assert (grad_k3 - grad_forward).abs().max() > 1e-3
    # and at the optimum pi* = pi_ref exp(r / beta) / Z, R is the same for every response
    star = torch.log_softmax(ref_logp + r / beta, -1)
    R_star = r - beta * (star - ref_logp)
    torch.testing.assert_close(R_star, R_star.mean().expand(6), rtol=0, atol=1e-12)


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce_pp"])
def test_group_rollout_rewards_and_advantages(algo):
    cfg = toy_config(algo, dict(steps=2, rollout_batch=32, minibatch=16, micro_batch=8, group_size=4), beta=0.2)
    task = ToyTask(cfg.task)
    trainer = GroupTrainer(cfg, task, reward_fn=task.rule_reward, log=lambda *a: None)
    assert not hasattr(trainer, "value")                                # no value model
    prompt_ids, prompts, responses = trainer.rollout()
    assert (prompt_ids.view(8, 4) == prompt_ids.view(8, 4)[:, :1]).all()   # 8 prompts x 4 responses
    batch = trainer.score_rollout(prompt_ids, prompts, responses)
    kl_seq = (batch["old_logp"] - batch["ref_logp"]).sum(-1)
    torch.testing.assert_close(batch["rewards"], task.rule_reward(prompt_ids, responses) - 0.2 * kl_seq)
    mode = {"grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce++"}[algo]
    adv = rk.group_advantages(batch["rewards"], group_size=4, mode=mode)
    torch.testing.assert_close(batch["advantages"], adv[:, None].expand(-1, cfg.task.response_len))
    if algo != "reinforce_pp":
        assert batch["advantages"][:, 0].view(8, 4).sum(-1).abs().max() < 1e-5
    row = trainer.train_step(evaluate=True)
    assert list(row) == LOG_KEYS and row["value_loss"] is None and row["kl_estimator"] == "k1"
    assert row["first_ratio_max_dev"] == 0.0


def small_run(algo, steps):
    """A few steps of ``algo`` on a reward of four times the hidden rule's (no reward model, and
    sharp enough that a few steps move J): (J before, J after, trainer)."""
    pg = dict(steps=steps, rollout_batch=128, minibatch=64, micro_batch=64, lr=5e-3)
    section = {"expert_iteration": dict(rounds=steps, prompts_per_round=128, n=8, minibatch=32, lr=2e-3)}.get(algo, pg)
    cfg = toy_config(algo, section)
    task = ToyTask(cfg.task)
    cls = ExpertIterationTrainer if algo == "expert_iteration" else trainer_class(algo)
    trainer = cls(cfg, task, reward_fn=lambda pid, resp: 4 * task.rule_reward(pid, resp), log=lambda *a: None)
    start = trainer.evaluate()
    for i in range(steps):
        row = trainer.train_step(evaluate=i == steps - 1)
    return start, row, trainer


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo", "reinforce_pp", "expert_iteration"])
def test_each_algorithm_improves_J(algo):
    start, end, trainer = small_run(algo, 3 if algo == "expert_iteration" else 10)
    print(algo, start["J"], end["J"], start["J_star"])
    # J is exact (no sampling noise in the measurement), so any rise is the policy's
    assert end["J"] > start["J"] + 0.01, (start, end)
    assert end["J"] <= end["J_star"]
    if algo == "expert_iteration":   # the KL to the reference is evaluated and logged at every round
        assert all(r["exact_kl"] is not None and r["exact_kl"] > 0 for r in trainer.history)
        assert [r["samples"] for r in trainer.history] == [128 * 8 * (i + 1) for i in range(3)]


def test_group_trainer_resumes_exactly(tmp_path):
    from rlhf_trainer.ppo import TIME_KEYS
    cfg = toy_config("grpo", dict(steps=4, rollout_batch=32, minibatch=16, micro_batch=8, group_size=4))
    task = ToyTask(cfg.task)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]

    a = GroupTrainer(cfg, task, reward_fn=task.rule_reward)
    for i in range(4):
        a.train_step(evaluate=i % 2 == 1)
    b = GroupTrainer(cfg, task, reward_fn=task.rule_reward)
    for i in range(2):
        b.train_step(evaluate=i % 2 == 1)
    b.save(str(tmp_path / "ckpt.pt"))
    torch.manual_seed(123)
    c = GroupTrainer(cfg, task, reward_fn=task.rule_reward)
    c.load(str(tmp_path / "ckpt.pt"))
    for i in range(2, 4):
        c.train_step(evaluate=i % 2 == 1)
    assert strip(a.history) == strip(c.history)


# ---------- configuration ----------

@pytest.mark.parametrize("d,words", [
    ({"algo": "dpo"}, "algo must be one of ppo, grpo, rloo, reinforce_pp, best_of_n, expert_iteration"),
    ({"algo": "grpo", "grpo": {"group_size": 1}}, "grpo.group_size must be >= 2"),
    ({"algo": "rloo", "rloo": {"group_size": 1}}, "rloo.group_size must be >= 2"),
    ({"algo": "reinforce_pp", "reinforce_pp": {"group_size": 1}}, "reinforce_pp.group_size must be >= 2"),
    ({"algo": "grpo", "grpo": {"rollout_batch": 100, "minibatch": 50, "micro_batch": 25}},
     "grpo.rollout_batch=100 is not divisible by grpo.group_size=8"),
    ({"algo": "grpo", "ppo": {"lr": 1e-3}}, "a ppo section has no effect with algo: grpo"),
    ({"algo": "ppo", "grpo": {"lr": 1e-3}}, "a grpo section has no effect with algo: ppo"),
    ({"algo": "rloo", "rloo": {"value_lr": 1e-3}}, "value_lr has no effect with algo: rloo (it is an option of ppo)"),
    ({"algo": "grpo", "grpo": {"kl_estimator": "k3"}}, "kl_estimator has no effect with algo: grpo"),
    ({"algo": "ppo", "ppo": {"group_size": 4}}, "group_size has no effect with algo: ppo"),
    ({"algo": "best_of_n", "eval_every": 5}, "eval_every has no effect with algo: best_of_n"),
    ({"algo": "best_of_n", "checkpoint_every": 5}, "checkpoint_every has no effect with algo: best_of_n"),
    ({"algo": "expert_iteration", "eval_every": 2}, "eval_every has no effect with algo: expert_iteration"),
    ({"algo": "best_of_n", "best_of_n": {"n": 0}}, "best_of_n.n must be >= 1"),
    ({"algo": "expert_iteration", "expert_iteration": {"prompts_per_round": 100}},
     "expert_iteration.prompts_per_round=100 is not divisible by expert_iteration.minibatch=64"),
    ({"algo": "expert_iteration", "expert_iteration": {"lr": 0.0}}, "expert_iteration.lr must be > 0"),
    ({"ppo": {"beta": 0.2}}, "beta is the top-level option"),
    ({"beta": -1.0}, "beta must be >= 0"),
    ({"algo": "grpo", "grpo": {"loss_agg": "sum"}}, "grpo.loss_agg must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-sum, got 'sum'"),
])
def test_config_errors_name_the_key(d, words):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert words in str(info.value)


def test_config_sections_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="a ppo section has no effect with algo: grpo"):
        Config(algo="grpo", ppo=PPOConfig())
    with pytest.raises(ConfigError, match="eval_every has no effect with algo: best_of_n"):
        Config(algo="best_of_n", eval_every=3)
    for algo in ALGOS:
        cfg = Config(algo=algo)
        d = cfg.to_dict()
        assert algo in d and not any(a in d for a in ALGOS if a != algo)   # only the algorithm's own options
        path = tmp_path / ("%s.yaml" % algo)
        cfg.save(path)
        assert Config.load(path).to_dict() == d
    # the tuned defaults differ by algorithm; the aggregation follows each algorithm's paper
    assert Config(algo="grpo").grpo.loss_agg == "seq-mean-token-mean"
    assert Config(algo="rloo").rloo.loss_agg == "seq-mean-token-sum"
    assert "64 prompts x 8 responses" in Config(algo="grpo").accounting()


# ---------- python -m rlhf_trainer compare --small ----------

@pytest.fixture(scope="module")
def compare_small(tmp_path_factory):
    return run_small("compare", tmp_path_factory.mktemp("compare"))


@pytest.mark.slow  # the module's compare --small run: every algorithm against one reward model
def test_compare_small_writes_its_table_and_figures(compare_small):
    out, stdout = compare_small
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png", "compare_best_of_n.png"):
        assert os.path.getsize(out / name) > 500, name
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["algorithm"] for r in rows] == list(ALGOS)
    md = open(out / "compare.md").read()
    for col in ("algorithm", "J_end", "gap to J* closed", "exact KL", "hidden-rule reward", "wall time",
                "samples drawn"):
        assert col in md
    assert "| grpo |" in md and "| 64 |" in md
    print(md)


@pytest.mark.slow  # the module's compare --small run
def test_compare_small_every_algorithm_is_measured_exactly(compare_small):
    out, _ = compare_small
    res = json.load(open(out / "compare.json"))
    J_star = res["meta"]["J_star"]
    for r in res["rows"]:
        assert r["J_end"] <= J_star + 1e-9 and r["exact_kl"] >= 0
        if r["algorithm"] == "best_of_n":
            assert r["exact_kl"] <= kl_bound(r["samples_drawn"]) + 1e-12
        assert r["J_end"] > r["J_start"], r                 # every algorithm improves on pi_ref
    curve = res["best_of_n_curve"]
    assert [c["n"] for c in curve][:7] == [1, 2, 4, 8, 16, 32, 64]
    assert curve[0]["exact_kl"] == 0 and curve[0]["J"] == pytest.approx(res["meta"]["J_start"], abs=1e-6)
    assert all(c["exact_kl"] <= c["kl_bound"] + 1e-12 for c in curve)
    assert all(a["reward"] < b["reward"] for a, b in zip(curve, curve[1:]))
