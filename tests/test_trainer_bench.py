"""`python -m rlhf_trainer bench`: the two modes compute the same PPO step, and the report is filed.

What makes the bench's comparison fair is that kernels on and off do the same math from the
same inputs; these tests hold them to that on a tiny Qwen2 model in float32 on the CPU.
"""

import argparse
import csv
import dataclasses
import json

import pytest
import torch

from rlhf_trainer import bench, bench_report
from rlhf_trainer.bench_ops import EagerOps
from rlhf_trainer.bench_step import SMALL_CONFIG, BenchConfig, build_trainer

# Both modes run the same backbone (bitwise the same hidden states); they differ in how the
# float32 log-softmax, entropy, GAE sums and loss reductions are ordered: a few float32 ulps
# of each value, amplified at most by the ~10 sequential steps of GAE and the whitening.
VALUE_RTOL = 1e-5
VALUE_ATOL = 2e-6
# Gradients sum such differences over tokens and through the backbone's backward:
# elementwise relative to their size, plus this fraction of the largest entry.
GRAD_RTOL = 1e-4
GRAD_ATOL_FRAC = 1e-5
CPU = torch.device("cpu")
EOS = 5


def tiny_cfg(**kw):
    base = dict(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=997, prompts=2, samples=3,
                prompt_len=5, response_len=7, micro_batch=3, mini_batches=2, seed=11)
    return BenchConfig(**dict(base, **kw))


def trainer(cfg, mode, eos=False):
    """The bench's trainer of ``mode``; with ``eos`` the task stops at EOS (token 5), so the
    responses of ``batch`` are right-padded after it."""
    t = build_trainer(cfg, CPU, torch.float32, mode)
    if eos:
        t.task.cfg.eos_token_id, t.task.cfg.stop_at_eos = EOS, True
    return t


def batch(cfg, seed=0):
    """Random prompts and responses [B, L]; each but the first ends at an EOS at a random place."""
    g = torch.Generator().manual_seed(seed)
    B = cfg.batch
    prompts = torch.randint(6, cfg.vocab, (B, cfg.prompt_len), generator=g)
    responses = torch.randint(6, cfg.vocab, (B, cfg.response_len), generator=g)
    lengths = torch.randint(1, cfg.response_len + 1, (B,), generator=g)
    lengths[0] = cfg.response_len
    for i in range(1, B):
        responses[i, lengths[i] - 1] = EOS
    return torch.arange(B), prompts, responses


def close(actual, expected, rtol=VALUE_RTOL, atol=VALUE_ATOL, what=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: "%s: %s" % (what, m))


def test_the_modes_differ_only_in_ops_and_the_fused_head():
    """Both modes are the trainer's own PPOTrainer: kernels on is rlhf_kernels from the hidden
    states, off the eager ops on the logits; the same models, a frozen reference copy."""
    import rlhf_kernels as rk
    from rlhf_trainer.ppo import PPOTrainer
    cfg = tiny_cfg()
    a, b = trainer(cfg, "on"), trainer(cfg, "off")
    assert isinstance(a, PPOTrainer) and a.ops is rk and a.p.fused_lm_head
    assert isinstance(b.ops, EagerOps) and not b.p.fused_lm_head
    assert type(a).update is PPOTrainer.update and type(a).micro_loss is PPOTrainer.micro_loss
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(a.value.named_parameters(), b.value.parameters()):
        assert torch.equal(p, q), name
    # the reference is a frozen copy of the policy, not the same tensors
    assert all(not p.requires_grad for p in a.ref.parameters())
    assert a.ref.lm_head.weight.data_ptr() != a.policy.lm_head.weight.data_ptr()


def test_modes_compute_the_same_experience():
    cfg = tiny_cfg()
    pid, prompts, responses = batch(cfg)
    exps = {m: trainer(cfg, m, eos=True).score_rollout(pid, prompts, responses) for m in ("off", "on")}
    off, on = exps["off"], exps["on"]
    mask = off["mask"]
    assert not mask.all() and torch.equal(on["mask"], mask)  # padding is exercised
    for key in ("old_logp", "ref_logp", "old_values", "score", "kl", "rewards", "returns", "advantages"):
        close(on[key], off[key], what=key)
    assert (off["old_logp"][mask] < 0).all() and (off["old_logp"][~mask] == 0).all()
    assert (on["advantages"][~mask] == 0).all() and (on["returns"][~mask] == 0).all()
    assert off["advantages"][mask].std() > 0.5  # whitened, not degenerate


def _grads(t):
    named = list(t.policy.named_parameters()) + [("value." + n, p) for n, p in t.value.named_parameters()]
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def _moved_batch(cfg, seed):
    """A rollout batch scored by the eager mode, then a policy and value that have moved since
    (old log-probabilities and values perturbed), so that clipping (both sides) is exercised."""
    pid, prompts, responses = batch(cfg, seed=seed)
    exp = trainer(cfg, "off", eos=True).score_rollout(pid, prompts, responses)
    mask = exp["mask"]
    g = torch.Generator().manual_seed(seed + 1)
    exp["old_logp"] = torch.where(mask, exp["old_logp"] + 0.5 * torch.randn(mask.shape, generator=g), 0.0)
    exp["old_values"] = exp["old_values"] + 0.3 * torch.randn(mask.shape, generator=g)
    return exp


def test_modes_compute_the_same_losses_and_gradients():
    cfg = tiny_cfg()
    exp = _moved_batch(cfg, seed=1)
    j = torch.arange(1, 5)
    num_tokens = exp["mask"].sum()
    results = {}
    for mode in ("off", "on"):
        t = trainer(cfg, mode, eos=True)
        loss, logp, out = t.micro_loss(exp, j, num_tokens)
        loss.backward()
        results[mode] = (loss, logp, out, _grads(t))
    (loss_off, logp_off, o_off, g_off), (loss_on, logp_on, o_on, g_on) = results["off"], results["on"]
    close(loss_on, loss_off, what="loss")
    close(logp_on, logp_off, what="logprobs")
    for key in ("policy_loss", "entropy", "value_loss"):
        close(o_on[key], o_off[key], what=key)
    assert o_off["st"]["clipfrac"] > 0 and o_off["vst"]["vf_clipfrac"] > 0
    for key in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max", "ratio_min"):
        close(o_on["st"][key], o_off["st"][key], what=key)
    for key in ("vf_clipfrac", "explained_var"):
        close(o_on["vst"][key], o_off["vst"][key], what=key)
    assert g_on.keys() == g_off.keys() and len(g_off) > 10
    for name, ref in g_off.items():
        assert ref.abs().max() > 0, name
        close(g_on[name], ref, rtol=GRAD_RTOL, atol=GRAD_ATOL_FRAC * ref.abs().max().item(), what="grad " + name)


def test_the_fused_policy_loss_is_taken_when_kernels_are_on(monkeypatch):
    """The "on" micro-batch loss calls rlhf_kernels.linear_policy_loss (hidden states [B, T, H]
    straight to the loss) and never the logits path; "off" never calls rlhf_kernels."""
    import rlhf_kernels as rk
    calls = []
    real = rk.linear_policy_loss

    def spy(hidden, *args, **kw):
        calls.append(hidden.shape)
        assert kw["loss_agg"] == "token-mean"
        return real(hidden, *args, **kw)

    def never(*args, **kw):
        raise AssertionError("rlhf_kernels called")

    monkeypatch.setattr(rk, "linear_policy_loss", spy)
    monkeypatch.setattr(rk, "token_logprobs", never)
    cfg = tiny_cfg()
    exp = _moved_batch(cfg, seed=4)
    j = torch.arange(cfg.micro_batch)
    trainer(cfg, "on", eos=True).micro_loss(exp, j, exp["mask"].sum())
    assert calls == [(cfg.micro_batch, cfg.response_len, cfg.hidden)]
    for name in ("linear_policy_loss", "linear_token_logprobs", "ppo_policy_loss", "ppo_value_loss"):
        monkeypatch.setattr(rk, name, never)
    trainer(cfg, "off", eos=True).micro_loss(exp, j, exp["mask"].sum())


def test_one_update_gives_the_same_parameters():
    """A whole update (the trainer's: two mini-batches of micro-batches, clipping, Adam): the
    same new weights."""
    cfg = tiny_cfg(lr=1e-3)
    pid, prompts, responses = batch(cfg, seed=3)
    new = {}
    for mode in ("off", "on"):
        t = trainer(cfg, mode, eos=True)
        t.update(t.score_rollout(pid, prompts, responses))
        new[mode] = dict(t.policy.named_parameters())
    before = dict(trainer(cfg, "off").policy.named_parameters())
    for name, p in new["off"].items():
        assert not torch.equal(p, before[name]), name  # the step did move it
        # Adam's first step moves each weight by about lr * sign(grad): tiny gradient differences
        # can only flip entries whose gradient is near 0, so compare the bulk
        diff = (new["on"][name] - p).abs()
        assert (diff <= 1e-6).float().mean() > 0.99, name


def _args(tmp_path, **kw):
    d = dict(device="cpu", dtype="auto", small=True, steps=1, warmup=0, micro_batch=None, max_micro_batch=512,
             threads=0, out=str(tmp_path))
    return argparse.Namespace(**dict(d, **kw))


def test_report_files_are_written(tmp_path, capsys):
    cfg = tiny_cfg(response_len=4)
    device = torch.device("cpu")
    args = _args(tmp_path)
    rows = bench_report.run_modes(cfg, device, torch.float32, 2, 1, 0)
    bench_report.write_report(rows, cfg, device, torch.float32, args, str(tmp_path))
    text = (tmp_path / "ppo_step.md").read_text()
    assert "| off |" in text and "| on |" in text and "kernels on vs off" in text
    with open(tmp_path / "ppo_step.csv") as f:
        rows_csv = list(csv.DictReader(f))
    assert [r["kernels"] for r in rows_csv] == ["off", "on"]
    for r in rows_csv:
        phases = sum(float(r[k]) for k in ("rollout_s", "logprobs_s", "update_s", "other_s"))
        assert 0 < phases <= float(r["step_s"]) * 1.0001
        assert float(r["tokens_per_s"]) > 0
        assert r["max_micro_batch"] == ""  # not searched on the CPU
        assert 0 < int(r["peak_over_start_bytes"]) <= int(r["peak_mem_bytes"])
    assert (tmp_path / "ppo_step.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "ppo_step.meta.json").read_text())
    assert meta["device"] == bench_report.device_slug(device) and meta["config"]["response_len"] == 4
    out = capsys.readouterr().out
    assert "kernels off step 1" in out and "kernels on  step 2" in out


def test_small_config_and_bad_arguments(capsys):
    device, dtype, cfg = bench.resolve(_args(None, micro_batch=2))
    assert device.type == "cpu" and dtype == torch.float32
    assert dataclasses.asdict(cfg) == dataclasses.asdict(BenchConfig(**dict(SMALL_CONFIG, micro_batch=2)))
    with pytest.raises(bench.BenchError, match="--steps must be at least 1, got 0"):
        bench.resolve(_args(None, steps=0))
    with pytest.raises(bench.BenchError, match="--max-micro-batch must be at least 0, got -1"):
        bench.resolve(_args(None, max_micro_batch=-1))
    with pytest.raises(bench.BenchError, match="--micro-batch 3: ppo.minibatch=4 is not divisible by ppo.micro_batch=3"):
        bench.resolve(_args(None, micro_batch=3))
    if not torch.cuda.is_available():
        assert bench.main(_args(None, device="cuda")) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_model_flag_and_batch_overrides(monkeypatch):
    """--model 0.5b with a tiny batch on the CPU (the memory probe): the 0.5B shape, the batch flags
    applied, each bad value refused naming its flag. Argument checks only: nothing is built."""
    from rlhf_trainer.bench_step import GPU_CONFIG
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--device", "cpu", "--model", "0.5b", "--prompts", "2", "--samples", "2", "--prompt-len", "16",
                         "--response-len", "8", "--micro-batch", "1", "--threads", "0"])
    device, dtype, cfg = bench.resolve(args)
    assert device.type == "cpu" and dtype == torch.float32
    assert dataclasses.asdict(cfg) == dataclasses.asdict(BenchConfig(**dict(
        GPU_CONFIG, prompts=2, samples=2, prompt_len=16, response_len=8, micro_batch=1)))
    assert (cfg.hidden, cfg.layers, cfg.vocab) == (896, 24, 151936)
    # the defaults are unchanged: small on the CPU; a batch flag alone changes only itself
    defaults = p.parse_args(["--device", "cpu", "--threads", "0"])
    assert defaults.model == "auto" and defaults.prompts is None and defaults.response_len is None
    assert dataclasses.asdict(bench.resolve(defaults)[2]) == dataclasses.asdict(BenchConfig(**SMALL_CONFIG))
    _, _, cfg = bench.resolve(_args(None, small=False, response_len=5))
    assert dataclasses.asdict(cfg) == dataclasses.asdict(BenchConfig(**dict(SMALL_CONFIG, response_len=5)))
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "1b"])
    with pytest.raises(bench.BenchError, match="--small and --model 0.5b ask for two configurations"):
        bench.resolve(_args(None, model="0.5b"))
    for flag in ("prompts", "samples", "prompt_len", "response_len"):
        with pytest.raises(bench.BenchError, match="--%s must be at least 1, got 0" % flag.replace("_", "-")):
            bench.resolve(_args(None, small=False, model="0.5b", **{flag: 0}))
    # the trainer's own check of the micro-batch against the minibatch names the flags given
    with pytest.raises(bench.BenchError, match=r"--prompts 2 --samples 1: ppo.minibatch=1 is not divisible by "
                                               r"ppo.micro_batch=8"):
        bench.resolve(_args(None, small=False, model="0.5b", prompts=2, samples=1))
    # under torchrun the rollout and each minibatch are split evenly over the processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    bench.resolve(_args(None, small=False, model="0.5b", prompts=2, samples=2, micro_batch=1))
    with pytest.raises(bench.BenchError, match="--prompts 1 --samples 1 --micro-batch 1: the rollout's 1 sequences "
                                               "are not divisible by the 2 processes"):
        bench.resolve(_args(None, small=False, model="0.5b", prompts=1, samples=1, micro_batch=1))
    with pytest.raises(bench.BenchError, match="--prompts 3 --samples 2 --micro-batch 1: the minibatch's 3 sequences "
                                               "are not divisible by the 2 processes"):
        bench.resolve(_args(None, small=False, model="0.5b", prompts=3, samples=2, micro_batch=1))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(bench.BenchError, match="--prompts 4 --samples 2: the rollout's 8 sequences"):
        bench.resolve(_args(None))


def test_layers_flag(monkeypatch):
    """--layers sets the depth of either shape and nothing else; 0 is refused naming the flag."""
    from rlhf_trainer.bench_step import GPU_CONFIG
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--device", "cpu", "--model", "0.5b", "--layers", "6", "--micro-batch", "1", "--threads", "0"])
    assert dataclasses.asdict(bench.resolve(args)[2]) == dataclasses.asdict(BenchConfig(**dict(
        GPU_CONFIG, layers=6, micro_batch=1)))
    assert p.parse_args(["--device", "cpu"]).layers is None
    assert bench.resolve(_args(None, layers=1))[2].layers == 1
    with pytest.raises(bench.BenchError, match="--layers must be at least 1, got 0"):
        bench.resolve(_args(None, layers=0))


def test_largest_micro_batch_doubles_until_out_of_memory(monkeypatch):
    cfg = tiny_cfg(response_len=3)
    seen = []
    real = bench_report.micro_step

    def fake_micro_step(trainer, mb, gen):
        seen.append(mb)
        if mb > 5:
            raise torch.OutOfMemoryError("fake: %d sequences do not fit" % mb)
        return real(trainer, mb, gen)

    monkeypatch.setattr(bench_report, "micro_step", fake_micro_step)
    t = trainer(cfg, "on")
    assert bench_report.largest_micro_batch(t, 64) == (4, [1, 2, 4, 8], False)
    assert seen == [1, 2, 4, 8]
    assert all(p.grad is None for p in t.policy.parameters())  # each trial's gradients are dropped
    assert t.p.micro_batch == cfg.micro_batch                    # and the trainer's micro-batch is kept
    assert bench_report.largest_micro_batch(trainer(cfg, "off"), 3) == (2, [1, 2], True)


def test_one_mode_at_a_time_with_the_micro_batch_search(capsys):
    """The GPU's schedule (each mode alone, then its doubling search), run on the CPU."""
    cfg = tiny_cfg(response_len=3)
    rows = bench_report.run_modes(cfg, torch.device("cpu"), torch.float32, 1, 0, 2, alternate=False)
    for m in ("off", "on"):
        assert rows[m]["max_micro_batch"] == 2 and rows[m]["tried"] == [1, 2] and rows[m]["capped"]
    out = capsys.readouterr().out
    assert out.index("kernels off step 1") < out.index("kernels off largest") < out.index("kernels on  step 1")
    text = "\n".join(bench_report.table(rows, cfg, torch.device("cpu"), torch.float32, 1, 1, 0))
    assert text.count("| at least 2 |") == 2
