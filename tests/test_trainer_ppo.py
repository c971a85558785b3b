"""The trainer end to end on the toy task, whose optimum is known exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch

import rlhf_kernels as rk
from rlhf_trainer.config import Config
from rlhf_trainer.models import build_policy, position_ids
from rlhf_trainer.ppo import TIME_KEYS, KLController, PPOTrainer
from rlhf_trainer.sequences import response_mask
from rlhf_trainer.toy import ToyTask, optimal_objective
from tests._helpers import toy_config

SMALL_PPO = dict(steps=4, rollout_batch=64, minibatch=32, micro_batch=16)


def small_cfg(**ppo):
    return toy_config("ppo", dict(SMALL_PPO, **ppo))


def test_padding_does_not_change_logprobs():
    cfg = Config()
    policy = build_policy(cfg.model, cfg.task)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.task.modulus, (5, 6), generator=gen)
    labels = ids[:, 3:]

    def logp(input_ids, attn, start):
        logits = policy(input_ids=input_ids, attention_mask=attn, position_ids=position_ids(attn)).logits
        return rk.token_logprobs(logits[:, start - 1:start + 2], labels)

    base = logp(ids, torch.ones_like(ids), 3)
    pad = torch.full((5, 4), cfg.task.pad_token_id)
    left = torch.cat([pad, ids], 1)
    left_attn = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1)
    right = torch.cat([ids, pad], 1)
    right_attn = torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
    torch.testing.assert_close(logp(left, left_attn, 7), base, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp(right, right_attn, 3), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_lm_head_matches_logits_path(temperature):
    """ppo.fused_lm_head (linear_token_logprobs on the hidden states) gives the log-probabilities,
    entropies and gradients of the model's own logits path."""
    results = []
    for fused in (True, False):
        cfg = small_cfg(fused_lm_head=fused, temperature=temperature)
        trainer = PPOTrainer(cfg, ToyTask(cfg.task), reward_fn=lambda p, r: r.sum(1).float(), log=lambda *a: None)
        gen = torch.Generator().manual_seed(5)
        prompts = trainer.task.prompts[:6]
        responses = torch.randint(0, cfg.task.vocab_size, (6, cfg.task.response_len), generator=gen)
        mask = torch.rand(6, cfg.task.response_len, generator=gen) < 0.8
        trainer.policy.zero_grad()
        logp, ent = trainer._logprobs(trainer.policy, prompts, responses, mask, with_entropy=True)
        (logp.sum() + 0.3 * ent.sum()).backward()
        grads = [p.grad.clone() for p in trainer.policy.parameters() if p.grad is not None]
        results.append((logp.detach(), ent.detach(), grads))
    (lp_f, ent_f, g_f), (lp_u, ent_u, g_u) = results
    torch.testing.assert_close(lp_f, lp_u, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_f, ent_u, rtol=0, atol=1e-5)
    assert len(g_f) == len(g_u) > 0
    for a, b in zip(g_f, g_u):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_agg,entropy_coef", [("token-mean", 0.05), ("seq-mean-token-mean", 0.0)])
def test_fused_policy_loss_matches_unfused(loss_agg, entropy_coef):
    """With ppo.fused_lm_head the micro-batch's policy loss is one linear_policy_loss on the
    backbone's hidden states; its loss, statistics, log-probabilities and the gradient of every
    parameter (policy and value model) equal those of the logits path (token_logprobs, then
    ppo_policy_loss and the entropy term)."""
    results, batch = [], None
    for fused in (True, False):
        cfg = small_cfg(fused_lm_head=fused, temperature=0.7, entropy_coef=entropy_coef, loss_agg=loss_agg,
                        dual_clip=3.0, clip_high=0.28)
        trainer = PPOTrainer(cfg, ToyTask(cfg.task), reward_fn=lambda p, r: r.sum(1).float(), log=lambda *a: None)
        if batch is None:  # one batch for both: old log-probabilities near the policy's, some clipped
            gen = torch.Generator().manual_seed(7)
            B, L = 8, cfg.task.response_len
            prompts = trainer.task.prompts[:B]
            responses = torch.randint(0, cfg.task.vocab_size, (B, L), generator=gen)
            mask = torch.rand(B, L, generator=gen) < 0.8
            mask[:, 0] = True
            with torch.no_grad():
                logp0 = trainer._logprobs(trainer.policy, prompts, responses, mask)
            batch = dict(prompts=prompts, responses=responses, mask=mask,
                         old_logp=logp0 + 0.3 * torch.randn(B, L, generator=gen),
                         advantages=torch.randn(B, L, generator=gen), old_values=torch.randn(B, L, generator=gen),
                         returns=torch.randn(B, L, generator=gen))
        for _, model in trainer._optimizers():
            model.zero_grad()
        j = torch.arange(len(batch["mask"]))
        loss, logp, o = trainer.micro_loss(batch, j, batch["mask"].sum())
        loss.backward()
        grads = [(n, q.grad.clone()) for _, model in trainer._optimizers() for n, q in model.named_parameters()
                 if q.grad is not None]
        results.append((loss.detach(), logp.detach(), o, grads))
    (loss_f, lp_f, o_f, g_f), (loss_u, lp_u, o_u, g_u) = results
    assert o_f["st"].__class__.__name__ == "PolicyHeadStats"  # the fused op ran
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    mask = batch["mask"]
    torch.testing.assert_close(lp_f[mask], lp_u[mask], rtol=0, atol=1e-5)
    for k in ("policy_loss", "entropy", "value_loss"):
        torch.testing.assert_close(o_f[k].detach(), o_u[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    for k in rk.ppo_policy_loss(lp_u, lp_u, lp_u, mask)[1]:
        torch.testing.assert_close(o_f["st"][k], o_u["st"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert [n for n, _ in g_f] == [n for n, _ in g_u] and len(g_f) > 2
    for (n, a), (_, b) in zip(g_f, g_u):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_response_mask_stops_after_eos():
    r = torch.tensor([[1, 9, 4, 5], [1, 2, 3, 4], [9, 9, 1, 1]])
    m = response_mask(r, eos_token_id=9, stop_at_eos=True)
    assert m.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert response_mask(r, 9, False).all()


def test_reward_lands_on_last_real_token():
    cfg = toy_config("ppo", SMALL_PPO, beta=0.0, task={"stop_at_eos": True})
    task = ToyTask(cfg.task)
    scores = torch.linspace(1.0, 2.0, cfg.ppo.rollout_batch)
    trainer = PPOTrainer(cfg, task, reward_fn=lambda pid, resp: scores[: len(pid)])
    pid = torch.arange(cfg.ppo.rollout_batch) % task.num_prompts
    responses = torch.randint(0, 8, (cfg.ppo.rollout_batch, cfg.task.response_len))
    responses[0, 1] = cfg.task.eos_token_id          # row 0 ends at its second token
    batch = trainer.score_rollout(pid, task.prompts[pid], responses)
    last = batch["mask"].long().sum(-1) - 1
    assert last[0].item() == 1
    expected = torch.zeros_like(batch["rewards"])
    expected[torch.arange(len(last)), last] = scores
    torch.testing.assert_close(batch["rewards"], expected, rtol=0, atol=0)


def test_first_minibatch_ratio_is_exactly_one_and_log_schema(tmp_path):
    cfg = small_cfg(steps=2)
    task = ToyTask(cfg.task)
    trainer = PPOTrainer(cfg, task, reward_fn=task.rule_reward, run_dir=str(tmp_path))
    row = trainer.train_step(evaluate=True)
    assert row["first_ratio_max_dev"] == 0.0
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(rows) == 1 and rows[0]["step"] == 1
    assert rows[0]["kl_estimator"] == "k1" and rows[0]["J"] is not None and rows[0]["J"] <= rows[0]["J_star"]


def test_kl_controller():
    ctl = KLController(0.1, True, target=6.0, horizon=10000)
    ctl.update(12.0, 256)                    # far above target: e clipped at 0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(6.0 * 0.9, 256)               # e = -0.1
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 256 / 10000))
    fixed = KLController(0.1, False, 6.0, 10000)
    fixed.update(100.0, 256)
    assert fixed.beta == 0.1


@pytest.mark.slow  # 37 s on the shared 2-core machine (load average ~24)
def test_exact_resume(tmp_path):
    """N steps, checkpoint, a fresh trainer resumes, N more steps: the same log as 2N steps."""
    cfg = small_cfg(steps=4)
    task = ToyTask(cfg.task)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]

    straight = PPOTrainer(cfg, task, reward_fn=task.rule_reward, run_dir=str(tmp_path / "a"))
    os.makedirs(tmp_path / "a")
    for i in range(4):
        straight.train_step(evaluate=i % 2 == 1)
    os.makedirs(tmp_path / "b")
    first = PPOTrainer(cfg, task, reward_fn=task.rule_reward, run_dir=str(tmp_path / "b"))
    for i in range(2):
        first.train_step(evaluate=i % 2 == 1)
    first.save(str(tmp_path / "b" / "ckpt.pt"))
    first.train_step()                       # work after the checkpoint is lost and redone
    torch.manual_seed(12345)                 # and the process's RNG has moved on
    resumed = PPOTrainer(cfg, task, reward_fn=task.rule_reward, run_dir=str(tmp_path / "b"))
    resumed.load(str(tmp_path / "b" / "ckpt.pt"))
    for i in range(2, 4):
        resumed.train_step(evaluate=i % 2 == 1)
    a = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert strip(a) == strip(b)
    assert len(a) == 4


def test_optimum_formula_is_the_max_of_J():
    """J* = beta log E_ref exp(r/beta) is attained by pi* = pi_ref exp(r/beta) / Z and beats other policies."""
    gen = torch.Generator().manual_seed(0)
    ref_logp = torch.log_softmax(torch.randn(3, 7, generator=gen, dtype=torch.float64), -1)
    r = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    beta = 0.3

    def J(logp):
        p = logp.exp()
        return ((p * r).sum(-1) - beta * (p * (logp - ref_logp)).sum(-1)).mean().item()

    star = optimal_objective(ref_logp, r, beta)
    best = torch.log_softmax(ref_logp + r / beta, -1)
    assert J(best) == pytest.approx(star, abs=1e-12)
    for _ in range(20):
        other = torch.log_softmax(best + 0.3 * torch.randn(3, 7, generator=gen, dtype=torch.float64), -1)
        assert J(other) < star


@pytest.mark.slow  # the CI-sized demo: a reward model and a whole PPO run
def test_reward_model_and_gap_closing_run(tmp_path):
    """The CI-sized demo: the reward model learns the rule and PPO closes most of the gap to J*."""
    from rlhf_trainer import demo
    cfg = demo.small_config(Config())
    summary = demo.run(cfg, str(tmp_path), log=print, progress=False)
    print("CI demo summary:", json.dumps(summary))
    assert summary["rm_accuracy"] >= 0.9
    assert summary["gap_closed"] >= 0.8
    assert summary["rule_reward_end"] > summary["rule_reward_start"] + 0.2
    assert os.path.exists(tmp_path / "curves.png")
    assert set(json.load(open(tmp_path / "summary.json"))) == set(demo.SUMMARY_KEYS)


def test_plot_cli(tmp_path):
    rows = [{"step": i, "J": None if i % 2 else -1.0 + i, "J_star": 3.0, "J_rule": 0.1 * i, "score_mean": 0.1 * i,
             "kl_seq_sum": 0.2 * i, "entropy": 2.0 - 0.1 * i, "approx_kl": 0.01, "kl_estimator": "k1"}
            for i in range(1, 6)]
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    p = subprocess.run([sys.executable, "-m", "rlhf_trainer", "plot", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(tmp_path / "curves.png") > 1000


@pytest.mark.parametrize("loss", ["bt", "ranking"])
def test_comparisons_are_ordered_by_the_rule_and_the_loss_runs(loss):
    from rlhf_trainer.reward import make_comparisons, rm_loss
    from rlhf_trainer.models import ScalarHeadModel
    cfg = toy_config(reward_model={"loss": loss, "k": 4})
    task = ToyTask(cfg.task)
    gen = torch.Generator().manual_seed(1)
    pid, responses, valid = make_comparisons(task, cfg.reward_model, 64, gen)
    K = responses.shape[1]
    assert K == (2 if loss == "bt" else 4)
    rule = torch.stack([task.rule_reward(pid, responses[:, j]) for j in range(K)], 1)
    both = valid[:, :-1] & valid[:, 1:]
    assert ((rule[:, :-1] > rule[:, 1:]) | ~both).all()      # strictly best first, no ties
    if loss == "ranking":
        assert (~valid).any() and valid[:, :2].all()         # ragged, at least two per prompt
    model = ScalarHeadModel(cfg.model, cfg.task)
    value, stats = rm_loss(model, task, cfg.reward_model, pid, responses, valid)
    value.backward()
    assert torch.isfinite(value) and 0 <= stats["accuracy"].item() <= 1
    assert all(p.grad is not None for p in model.head.parameters())
