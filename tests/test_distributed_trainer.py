"""The trainer under torchrun on the CPU (gloo): world-size invariance of the update, the demo,
sharded checkpoints and resume across world sizes, two "nodes", a failing rank, real models."""

import json
import os
import re
import statistics

import pytest
import torch

from distributed_kit import ROOT, python, torchrun
from test_trainer_real import real_config, workdir  # noqa: F401 (the tiny Llama fixture)

WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def _rel(a, b):
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _rel_norm(a, b):
    """||a - b|| / ||b||: Adam's first step is lr * g / (|g| + eps), so an entry whose gradient is
    near eps moves by a visible fraction of lr on a last-bit change of g; the whole tensor does not."""
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.slow
def test_update_is_the_same_on_one_and_two_processes(tmp_path):
    """The same experience batch and one optimizer step (micro-batches of 2): PPO with a value
    model and GRPO, on 1 process and on 2 FSDP2 processes: the advantages (whitened over both
    ranks for PPO) and the gradients (summed, not averaged, over the ranks: Adam's first step alone
    would hide a wrong scale) agree to 1e-5 of their largest entry, the parameters after the
    step to 1e-5 in norm (measured here: gradients 4e-7, parameters 1e-6)."""
    one = python([WORKER, "invariance", str(tmp_path)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([WORKER, "invariance", str(tmp_path)], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    for algo in ("ppo", "grpo"):
        a, b = (torch.load(tmp_path / ("%s-%d.pt" % (algo, w)), weights_only=False) for w in (1, 2))
        assert _rel(b["advantages"], a["advantages"]) < 1e-5, algo
        assert len(a["grads"]) == len(b["grads"]) and len(a["params"]) == len(b["params"])
        assert max(g.abs().max().item() for g in a["grads"]) > 1e-4     # a real update
        for x, y in zip(a["grads"], b["grads"]):
            assert _rel(y, x) < 1e-5, algo
        for x, y in zip(a["params"], b["params"]):
            assert _rel_norm(y, x) < 1e-5, algo
        for k in ("policy_loss", "clipfrac", "approx_kl", "entropy", "value_loss"):
            if a["stats"][k] is not None:
                assert b["stats"][k] == pytest.approx(a["stats"][k], rel=1e-4, abs=1e-7), (algo, k)


def test_a_rank_that_raises_ends_every_rank(tmp_path):
    """Rank 1 fails while rank 0 waits in a collective: the run ends within seconds with a
    non-zero exit code and the message, not a collective timeout."""
    import time
    t0 = time.perf_counter()
    res = torchrun([WORKER, "raise", str(tmp_path)], nproc=2, timeout=120)
    took = time.perf_counter() - t0
    assert res.returncode != 0
    assert "a reward function failed" in res.stderr
    assert took < 100, took


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("lr",)} for r in rows]


@pytest.mark.slow
def test_resume_exact_on_two_processes_then_across_world_sizes(tmp_path):
    """At 2 processes a sharded checkpoint resumes exactly (the log rows after it are bitwise those
    of the uninterrupted run). Then the 2-process checkpoint continues in one plain process, and a
    one-process checkpoint.pt under torchrun with 2: the weights arrive exactly and the run goes on."""
    two = torchrun([WORKER, "resume", str(tmp_path)], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    r = json.load(open(tmp_path / "resume-2.json"))
    assert len(r["straight"]) == 4 and r["resumed"] == r["straight"]
    log = [json.loads(x) for x in open(tmp_path / "resumed-2" / "log.jsonl")]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "ckpt-2" / ".metadata")

    one = python([WORKER, "resume", str(tmp_path)])                 # one process: checkpoint.pt
    assert one.returncode == 0, one.stderr[-3000:]
    # 2 -> 1 and 1 -> 2
    a = python([WORKER, "continue", str(tmp_path), str(tmp_path / "ckpt-2")])
    assert a.returncode == 0, a.stderr[-3000:]
    b = torchrun([WORKER, "continue", str(tmp_path), str(tmp_path / "ckpt-1.pt")], nproc=2)
    assert b.returncode == 0, b.stderr[-3000:]
    for src, dst in ((2, 1), (1, 2)):
        want = torch.load(tmp_path / ("params-%d.pt" % src))
        got = torch.load(tmp_path / ("loaded-%d.pt" % dst))
        for x, y in zip(want, got):
            assert torch.equal(x, y), (src, dst)
        rows = json.load(open(tmp_path / ("continue-%d.json" % dst)))
        first_two = json.load(open(tmp_path / ("resume-%d.json" % src)))["straight"][:2]
        assert rows[:2] == first_two                  # the history came with the checkpoint
        assert [x["step"] for x in rows] == [1, 2, 3, 4]
        assert all(x["first_ratio_max_dev"] < 1e-5 for x in rows[2:])   # the loaded policy is the one that sampled
        # the optimizers step as this world size builds them (foreach on sharded parameters), not as the writer's did
        foreach = json.load(open(tmp_path / ("foreach-%d.json" % dst)))
        assert foreach and all(f == (True if dst == 2 else None) for f in foreach), (src, dst, foreach)


def _train_config(d, fn="letters"):
    """A YAML file in ``d`` of test_trainer_real's PPO config, 2 steps, rewarded by ``fn`` of its
    reward module."""
    import yaml
    path = d / ("train-%s.yaml" % fn)
    path.write_text(yaml.safe_dump(real_config(d, "ppo", steps=2, reward={"fn": "w14_rewards:" + fn})))
    return path


@pytest.mark.slow
def test_rm_then_train_on_a_saved_model_with_two_processes(workdir, tmp_path):
    """`rm` and `train` (PPO with a value model, a reward model plus a reward function) under
    torchrun: one run directory each, the models written by rank 0 as save_pretrained folders
    that load, world_size recorded, and one voice (no line printed twice)."""
    import yaml
    d = workdir
    rm_cfg = {"device": "cpu", "rm": {"model": str(d / "tiny"), "data": str(d / "pairs.jsonl"),
                                      "eval_data": str(d / "pairs.jsonl"), "epochs": 3, "batch_size": 4, "lr": 3e-3}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm_cfg))
    rm = torchrun(["-m", "rlhf_trainer", "rm", "--config", str(tmp_path / "rm.yaml"), "--out", str(tmp_path / "rm"),
                   "--no-progress"], cwd=str(d))
    assert rm.returncode == 0, rm.stderr[-3000:]
    s = json.load(open(tmp_path / "rm" / "summary.json"))
    assert s["world_size"] == 2 and s["steps"] == 6 and s["eval_accuracy"] == 1.0
    assert rm.stdout.count("reward model (bt): train accuracy") == 1
    cfg = _train_config(d)
    c = yaml.safe_load(open(cfg))
    c["reward"]["model"] = str(tmp_path / "rm" / "model")
    cfg.write_text(yaml.safe_dump(c))
    out = tmp_path / "run"
    tr = torchrun(["-m", "rlhf_trainer", "train", "--config", str(cfg), "--out", str(out), "--no-progress"],
                  cwd=str(d))
    assert tr.returncode == 0, tr.stderr[-3000:]
    assert tr.stdout.count("final policy: %s" % (out / "policy")) == 1
    assert len(open(out / "log.jsonl").readlines()) == 2
    assert json.load(open(out / "summary.json"))["world_size"] == 2
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert json.load(open(out / "policy" / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    start = AutoModelForCausalLM.from_pretrained(d / "tiny")
    assert not torch.equal(saved.state_dict()["lm_head.weight"], start.state_dict()["lm_head.weight"])
    assert os.path.exists(out / "checkpoint" / ".metadata")


def test_a_reward_function_error_on_every_rank_is_one_message(workdir, tmp_path):
    """A reward function that returns the wrong number of scores: the run ends with exit code 2
    and the message naming reward.fn, printed once, not a hang or a collective timeout."""
    tr = torchrun(["-m", "rlhf_trainer", "train", "--config", str(_train_config(workdir, "wrong_shape")),
                   "--out", str(tmp_path / "run"), "--no-progress"], cwd=str(workdir), timeout=200)
    assert tr.returncode != 0
    assert tr.stderr.count("reward.fn") >= 1
    assert "Timeout" not in tr.stderr


TINY_DEMO = """algo: ppo
reward_model: {steps: 20, num_train: 256, num_eval: 64, batch_size: 32}
ppo: {steps: 2, rollout_batch: 16, minibatch: 8, micro_batch: 4, epochs: 1}
eval_every: 2
"""


@pytest.mark.slow
def test_demo_on_two_processes_closes_the_gap(tmp_path):
    """`torchrun --nproc_per_node=2 -m rlhf_trainer demo`: one run (one directory, one log line per
    step, the table printed once), >= 90% of the exact J* gap closed, its time printed,
    world_size in summary.json."""
    res = torchrun(["-m", "rlhf_trainer", "demo", "--out", str(tmp_path / "run"), "--no-progress"], timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    s = json.load(open(tmp_path / "run" / "summary.json"))
    assert s["world_size"] == 2 and s["gap_closed"] >= 0.9, s
    assert res.stdout.count("gap closed") == 1 and re.search(r"wall time +[0-9.]+ s", res.stdout)
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.slow
def test_two_nodes_on_one_machine_are_one_run(tmp_path):
    """--nnodes=2 --node_rank=0|1, two commands on one machine, one process each: one run
    directory (chosen by the first node's rank 0), one log line per step, world_size 2."""
    from distributed_kit import free_port
    (tmp_path / "tiny.yaml").write_text(TINY_DEMO)
    port = free_port()
    args = ["-m", "rlhf_trainer", "demo", "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"),
            "--no-progress"]
    nodes = [torchrun(args, nproc=1, nnodes=2, node_rank=r, port=port, wait=False) for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=600) for n in nodes]
    finally:   # a hang fails the test and leaves no torchrun behind
        for n in nodes:
            n.kill()
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    assert outs[0][0].count("gap closed") == 1 and "gap closed" not in outs[1][0]
    s = json.load(open(tmp_path / "run" / "summary.json"))
    assert s["world_size"] == 2
    assert len(open(tmp_path / "run" / "log.jsonl").readlines()) == 2
    assert sorted(os.listdir(tmp_path)) == ["run", "tiny.yaml"]


@pytest.mark.slow
def test_bench_on_two_processes_reports_every_rank(tmp_path):
    """`torchrun --nproc_per_node=2 -m rlhf_trainer bench --device cpu` at the smallest sizes: rank 0
    alone prints; tokens/s, both ranks' peak memory and every rank's memory per phase are printed
    and written to ppo_step_dist.json with world_size 2, and agree with each other."""
    out = tmp_path / "bench"
    res = torchrun(["-m", "rlhf_trainer", "bench", "--device", "cpu", "--small", "--layers", "1", "--prompts", "2",
                    "--samples", "2", "--prompt-len", "4", "--response-len", "4", "--micro-batch", "1", "--steps", "2",
                    "--warmup", "0", "--out", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    s = json.load(open(out / "ppo_step_dist.json"))
    assert s["world_size"] == 2 and s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["config"] == dict(hidden=64, layers=1, vocab=32000, prompts=2, samples=2, prompt_len=4, response_len=4,
                               micro_batch=1)
    assert len(s["steps"]) == 2
    # tokens/s: the 4 responses' 16 tokens over each step's slowest rank; the median of the steps
    for row in s["steps"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(16 / row["step_s"])
    assert s["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in s["steps"]))
    # each rank's own figures: a peak resident set above its start (torch imported: over 100 MiB)
    peaks = s["peak_bytes_per_rank"]
    assert len(peaks) == 2 and all(p > 100 * 2 ** 20 for p in peaks), peaks
    assert peaks == [max(r["peak_bytes"][k] for r in s["steps"]) for k in range(2)]
    for row in s["steps"]:
        assert all(0 < a <= b for a, b in zip(row["start_bytes"], row["peak_bytes"])), row
        mem = row["memory_bytes"]
        assert list(mem) == ["start", "rollout", "scored", "backward", "optimizer", "end"]
        for k in range(2):   # the peak so far never falls within a step; now <= peak; the end's peak is the step's
            seen = [mem[p]["peak"][k] for p in mem]
            assert all(mem[p]["now"][k] > 100 * 2 ** 20 and mem[p]["now"][k] <= mem[p]["peak"][k] for p in mem), mem
            assert seen == sorted(seen) and mem["end"]["peak"][k] >= row["peak_bytes"][k] >= mem["optimizer"]["peak"][k]
    built = s["built_bytes"]
    assert list(built) == ["process", "built"]
    assert all(100 * 2 ** 20 < a <= b for a, b in zip(built["process"]["now"], built["built"]["peak"])), built
    # one voice: rank 0's lines, once each, with both ranks' figures
    mib = lambda b: "%.0f MiB" % (b / 2 ** 20)  # noqa: E731
    summary = [x for x in res.stdout.splitlines() if "response tokens/s" in x]
    assert summary == ["2 processes: %.3g response tokens/s (median of 2 steps); peak memory per rank: %s, %s; written "
                       "to %s" % (s["tokens_per_s"], mib(peaks[0]), mib(peaks[1]), out / "ppo_step_dist.json")]
    assert res.stdout.count("device cpu-") == 1 and res.stdout.count("2 processes step ") == 2
    assert res.stdout.count("models built and sharded") == 1 == res.stdout.count("the process before the models")
    assert res.stdout.count("after the first backward") == 2
    lines = res.stdout.splitlines()
    heads = [lines[k + 1].split() for k, x in enumerate(lines) if "the resident set after each phase" in x]
    assert heads == [["phase", "rank", "0", "rank", "1"]] * 2
