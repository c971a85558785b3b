"""Run directories and clean failures in one process: exclusive creation, no directory left by a
run that failed before its first checkpoint, --resume only from a checkpoint and with the run's
configuration (the keys that differ named), extending a finished run, a reward function that
raises, bad lines in input files, and curves.png drawing only what was measured."""

import json
import os
import threading

import pytest
import torch
import yaml

from rlhf_trainer.config import Config, InputError
from rlhf_trainer.ppo import TIME_KEYS
from rlhf_trainer import rundir
from test_trainer_real import prepare, real_config, run_cli, workdir  # noqa: F401 (a fixture)

FLAKY = '''
import os

def flaky(prompts, responses):
    """+1 per 'a'; raises while W_RUNS_BOOM is set (a bug in the user's reward)."""
    if os.environ.get("W_RUNS_BOOM"):
        return [len(r) / (len(r) - len(r)) for r in responses]
    return [r.count("a") - 0.1 * len(r) for r in responses]
'''


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def read_log(d):
    return [json.loads(x) for x in open(os.path.join(d, "log.jsonl"))]


# ---------- creating run directories ----------
def test_default_names_never_collide_even_in_one_second(tmp_path, monkeypatch):
    """Runs started in the same second get runs/<prefix>-<time>, -2, -3, ...: one each, from
    concurrent threads too (os.mkdir and an O_EXCL marker are atomic)."""
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, *a: fmt.replace("%Y%m%d-%H%M%S", "20261205-120000"))
    root = str(tmp_path / "runs")
    got, errors = [], []
    barrier = threading.Barrier(6)

    def claim():
        barrier.wait()
        try:
            got.append(rundir.create_run_dir(None, "demo", root=root))
        except Exception as e:   # noqa: BLE001 (collected, asserted empty)
            errors.append(e)
    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    paths = sorted(p for p, _ in got)
    base = os.path.join(root, "demo-20261205-120000")
    assert paths == sorted([base] + ["%s-%d" % (base, n) for n in range(2, 7)])
    assert rundir.create_run_dir(str(tmp_path / "solo"), "x") == (str(tmp_path / "solo"), True)
    for p in paths:
        assert json.load(open(os.path.join(p, rundir.MARKER)))["pid"] == os.getpid()


def test_one_explicit_out_goes_to_exactly_one_of_concurrent_runs(tmp_path):
    """Two runs given the same --out at once (a new path, or an existing empty folder): one gets it."""
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        won, refused = [], []
        barrier = threading.Barrier(4)

        def claim():
            barrier.wait()
            try:
                won.append(rundir.create_run_dir(str(out), "x"))
            except InputError as e:
                refused.append(str(e))
        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 3, (won, refused)
        # who made a new folder need not be who claimed it (another may find it empty first): then the
        # winner's `created` is False and a failure empties the folder instead of removing it
        assert won[0][0] == str(out)
        if out.name == "empty":
            assert won[0][1] is False             # it was there: a failed run empties it, never removes it
        assert all("already holds a run" in e for e in refused)


def test_a_failed_run_leaves_nothing_behind_unless_it_checkpointed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with rundir.RunDirectory(str(out), False, False, "x") as d:
            open(os.path.join(d, "config.yaml"), "w").write("{}")
            raise RuntimeError("boom")
    assert not os.path.exists(out)
    # a folder that was there, empty, is emptied again, not removed
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with rundir.RunDirectory(str(out), False, False, "x") as d:
            os.makedirs(os.path.join(d, "policy"))
            raise KeyboardInterrupt
    assert os.listdir(out) == []
    # after its first checkpoint a run is kept (--resume continues it), and a resumed run is never discarded
    with pytest.raises(RuntimeError):
        with rundir.RunDirectory(str(out), False, False, "x") as d:
            open(os.path.join(d, "checkpoint.pt"), "w").write("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == [".run", "checkpoint.pt"]
    os.remove(out / "checkpoint.pt")
    open(out / "checkpoint.pt", "w").write("x")
    with pytest.raises(RuntimeError):
        with rundir.RunDirectory(str(out), True, False, "x") as d:
            os.remove(os.path.join(d, "checkpoint.pt"))
            raise RuntimeError("boom")
    assert os.listdir(out) == [".run"]
    # a run that never checkpoints (rm) always goes
    with pytest.raises(RuntimeError):
        with rundir.RunDirectory(str(tmp_path / "rm"), False, False, "rm", checkpoint=None) as d:
            open(os.path.join(d, "checkpoint.pt"), "w").write("x")
            raise RuntimeError("boom")
    assert not os.path.exists(tmp_path / "rm")


def test_resume_needs_a_directory_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="--resume needs --out RUN_DIR"):
        rundir.prepare_run_dir(None, True, False, "x", checkpoint="checkpoint.pt")
    with pytest.raises(InputError, match="--resume: no run directory"):
        rundir.prepare_run_dir(str(out), True, False, "x", checkpoint="checkpoint.pt")
    out.mkdir()
    (out / "config.yaml").write_text("{}")
    with pytest.raises(InputError, match="holds no checkpoint.pt to continue from .*run it again without --resume"):
        rundir.prepare_run_dir(str(out), True, False, "x", checkpoint="checkpoint.pt")
    with pytest.raises(InputError, match="holds no checkpoint.pt"):
        rundir.check_resume(str(out), Config())
    assert (out / "config.yaml").read_text() == "{}"


def test_resume_names_the_keys_that_differ_and_lets_steps_grow(tmp_path):
    cfg = Config()
    cfg.save(tmp_path / "config.yaml")
    (tmp_path / "checkpoint.pt").write_text("x")
    d = cfg.to_dict()
    d["ppo"].update(lr=d["ppo"]["lr"] * 3, steps=d["ppo"]["steps"] + 50)
    d["seed"] = 7
    with pytest.raises(InputError) as info:
        rundir.check_resume(str(tmp_path), Config.from_dict(d))
    msg = str(info.value)
    assert "ppo.lr: %s -> %s" % (cfg.ppo.lr, cfg.ppo.lr * 3) in msg and "seed: 0 -> 7" in msg
    assert "ppo.steps:" not in msg and "only ppo.steps may grow" in msg
    d = cfg.to_dict()
    d["ppo"]["steps"] += 50
    rundir.check_resume(str(tmp_path), Config.from_dict(d))          # extending: allowed
    with pytest.raises(InputError, match="ppo.steps = 3, but .* has done 5 steps: a run can be extended, not "
                                         "shortened"):
        d["ppo"]["steps"] = 3
        rundir.check_extension(Config.from_dict(d), 5, str(tmp_path))
    assert rundir.steps_key(Config.from_dict({"algo": "expert_iteration"})) == "expert_iteration.rounds"


# ---------- `rlhf_trainer train` end to end ----------
def test_train_failures_resume_and_extension(workdir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A reward function that raises: one message naming reward.fn, the step and the batch, the
    user's traceback beneath, exit 2, no run directory left; the rerun works; --resume with another
    lr names it and changes nothing; more steps extend the finished run, its first rows unchanged."""
    (tmp_path / "w_runs_rewards.py").write_text(FLAKY)
    monkeypatch.chdir(tmp_path)
    cfg = real_config(workdir, steps=2)
    cfg["reward"]["fn"] = "w_runs_rewards:flaky"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]
    monkeypatch.setenv("W_RUNS_BOOM", "1")
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2
    lines = err.splitlines()
    assert lines[0].startswith("error: reward.fn w_runs_rewards:flaky on batch 1 (8 pairs, prompt ids ")
    assert lines[0].endswith(" at step 1 raised ZeroDivisionError: division by zero"), lines[0]
    assert "the function's traceback:" in err and 'w_runs_rewards.py", line 7, in flaky' in err
    assert lines[-1] == "ZeroDivisionError: division by zero" and len(lines) < 14, err
    assert "rlhf_trainer" not in err.split("the function's traceback:")[1]   # the user's frames only
    assert not os.path.exists(out)

    monkeypatch.delenv("W_RUNS_BOOM")
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    first = read_log(out)
    saved = (out / "config.yaml").read_text()
    assert len(first) == 2

    changed = dict(cfg, grpo=dict(cfg["grpo"], lr=0.02))
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    rc, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "changed.yaml"), "--out", str(out), "--resume")
    assert rc == 2 and "grpo.lr: 0.01 -> 0.02" in err and "was run with another configuration" in err, err
    assert (out / "config.yaml").read_text() == saved and len(read_log(out)) == 2

    longer = dict(cfg, grpo=dict(cfg["grpo"], steps=3))
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(longer))
    rc, stdout, err = run_cli(capsys, "train", "--config", str(tmp_path / "longer.yaml"), "--out", str(out),
                              "--resume", "--no-progress")
    assert rc == 0, err
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and strip(rows[:2]) == strip(first)
    assert json.load(open(out / "summary.json"))["steps"] == 3
    assert Config.load(out / "config.yaml").grpo.steps == 3
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3

    # the curves of a run on real models: what was measured, the reward named as configured
    from rlhf_trainer.plot import curve_panels, score_label
    panels = curve_panels(rows, None, score_label(str(out)))
    assert [p["title"] for p in panels] == ["reward", "policy drift"]
    labels = [line[0] for p in panels for line in p["lines"]]
    assert labels[0] == "reward.fn w_runs_rewards:flaky (sampled)"
    assert not any("hidden-rule" in x or "J(" in x or "reward-model" in x for x in labels)
    assert all(len(xs) == 3 == len(ys) for p in panels for _, xs, ys, _ in p["lines"])


def test_demo_resume_extends_a_finished_run_and_refuses_another_config(tmp_path, capsys):
    """The toy demo (a tiny task): --resume with more steps continues the finished run, its rows and
    start unchanged, the new last step evaluated exactly; another beta is named and refused."""
    cfg = {"device": "cpu", "task": {"response_len": 2},
           "reward_model": {"steps": 5, "num_train": 64, "num_eval": 32, "batch_size": 32},
           "ppo": {"steps": 2, "rollout_batch": 16, "minibatch": 16, "micro_batch": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "demo"
    rc, _, err = run_cli(capsys, "demo", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress")
    assert rc == 0, err
    first, start = read_log(out), json.load(open(out / "start.json"))
    assert [r["step"] for r in first] == [1, 2] and first[1]["J"] is not None
    (tmp_path / "beta.yaml").write_text(yaml.safe_dump(dict(cfg, beta=0.5)))
    rc, _, err = run_cli(capsys, "demo", "--config", str(tmp_path / "beta.yaml"), "--out", str(out), "--resume")
    assert rc == 2 and "beta: %s -> 0.5" % Config().beta in err, err
    cfg["ppo"]["steps"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(capsys, "demo", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--resume",
                         "--no-progress")
    assert rc == 0, err
    rows = read_log(out)
    assert strip(rows[:2]) == strip(first) and rows[2]["step"] == 3 and rows[2]["J"] is not None
    assert json.load(open(out / "start.json")) == start
    assert json.load(open(out / "summary.json"))["J_end"] == rows[2]["J"]
    rc, _, err = run_cli(capsys, "demo", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "none"),
                         "--resume")
    assert rc == 2 and err == "error: --resume: no run directory %s\n" % (tmp_path / "none")


def test_rm_that_fails_leaves_no_directory(workdir, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff", "chosen": "b"}\n')
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump({"device": "cpu", "rm": {"model": str(workdir / "tiny"),
                                                                             "data": str(bad)}}))
    rc, _, err = run_cli(capsys, "rm", "--config", str(tmp_path / "rm.yaml"), "--out", str(tmp_path / "rm"))
    assert rc == 2 and err == "error: rm.data: %s line 2 is not UTF-8 text (byte 0xff at column 13)\n" % bad
    assert not os.path.exists(tmp_path / "rm")


def test_bad_prompt_lines_name_the_file_and_line(workdir, tmp_path):  # noqa: F811
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b\xe9"}\n')
    with pytest.raises(InputError, match=r"data.prompts: .*p.jsonl line 2 is not UTF-8 text \(byte 0xe9 at "
                                         r"column 14\)"):
        prepare(workdir, data__prompts=str(path))
    # a chat template that refuses a conversation: the line, and the template's own words
    from rlhf_trainer import hf
    task, _ = prepare(workdir)
    tok = task.tokenizer
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system "
                         "messages') }}{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(InputError, match=r"data.prompts: p line 2: the tokenizer's chat template refused it "
                                         r"\(.*no system messages\)") as info:
        hf.encode_prompts(["hi", [{"role": "system", "content": "x"}]], tok, True, 64, "p")
    assert info.value.__cause__ is not None


def test_reward_function_error_names_the_step_when_called_by_a_trainer(workdir, tmp_path, monkeypatch):  # noqa: F811
    """Without the command line: the same message, the step added by the trainer, the cause kept."""
    from test_trainer_real import trainer_for
    (tmp_path / "w_runs_rewards.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = real_config(workdir, steps=3)
    d["reward"]["fn"] = "w_runs_rewards:flaky"
    trainer = trainer_for(Config.from_dict(d), workdir, tmp_path / "run")
    trainer.train_step()
    monkeypatch.setenv("W_RUNS_BOOM", "1")
    with pytest.raises(InputError) as info:
        trainer.train_step()
    assert str(info.value).startswith("reward.fn w_runs_rewards:flaky on batch 2 (8 pairs, prompt ids ")
    assert " at step 2 raised ZeroDivisionError" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# ---------- curves.png ----------
def test_toy_curves_keep_the_exact_panels():
    from rlhf_trainer.plot import curve_panels
    rows = [{"step": i, "J": None if i % 2 else -1.0 + i, "J_star": 3.0, "J_rule": 0.1 * i, "score_mean": 0.1 * i,
             "kl_seq_sum": 0.2 * i, "entropy": 2.0 - 0.1 * i, "approx_kl": 0.01, "kl_estimator": "k1"}
            for i in range(1, 6)]
    start = {"J": -1.5, "J_rule": 0.05}
    panels = curve_panels(rows, start)
    assert [p["title"] for p in panels] == ["KL-regularized objective", "reward", "policy drift"]
    (label, xs, ys, _), = panels[0]["lines"]
    assert label == "J(policy), exact" and xs == [0, 2, 4] and ys == [-1.5, 1.0, 3.0]
    assert panels[0]["hline"] == (3.0, "J* (optimum)")
    assert [line[0] for line in panels[1]["lines"]] == ["reward-model score (sampled)", "hidden-rule reward, exact"]
