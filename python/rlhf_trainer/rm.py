"""``rlhf_trainer rm --config cfg.yaml``: a reward model from preference data (the ``rm`` section).

rm.data is a JSONL file, one comparison per line: {"prompt", "chosen", "rejected"} (pairwise,
``rk.bt_loss`` with rm.label_smoothing and rm.center_coef) or {"prompt", "ranked": [best, ...,
worst]} (two or more responses; ``rk.ranking_loss``, ragged lists allowed). The prompt is a
string or a list of chat messages; each (prompt, response) is encoded as the trainer's reward
reads it (``hf.rm_encode``), truncated from the left to rm.max_len tokens. The model starts from
rm.model (a causal LM gets a new scalar head) and is saved with save_pretrained in ``model/`` of
the run directory, ready for ``reward.model``; log.jsonl, summary.json beside it.
"""

import json
import math
import os
import time

import torch

import rlhf_kernels as rk
from rlhf_trainer.config import Config, ConfigError, InputError
from rlhf_trainer.reward import pair_counts
from rlhf_trainer.scores import Thresholds, regression_target, score_loss, score_pair_counts


KINDS = {"bt": ("a pair", "pairs"), "ranking": ("a ranking", "rankings"), "score": ("a score", "scores")}


def read_preferences(path, key, section):
    """-> (prompts, lists of responses best first, 'bt', 'ranking' or 'score', the scores [n] float64
    or None); score lines are one response each, their scores checked against ``section`` (an
    RMSection: score_min, score_max, score_loss). InputError names the line."""
    if not os.path.isfile(path):
        raise InputError("%s: no such file %r" % (key, path))
    from rlhf_trainer.hf import read_lines
    prompts, responses, scores, kind = [], [], [], None
    lines = read_lines(path, key)
    for n, line in enumerate(lines, 1):
        where = "%s: %s line %d" % (key, path, n)
        if not line.strip():
            raise InputError("%s is empty" % where)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError("%s is not valid JSON (%s)" % (where, e.msg)) from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise InputError("%s has no \"prompt\"" % where)
        if "ranked" in obj:
            rs, this = obj["ranked"], "ranking"
            if not isinstance(rs, list) or len(rs) < 2:
                raise InputError("%s: \"ranked\" must be a list of at least two responses, best first" % where)
        elif "chosen" in obj and "rejected" in obj:
            rs, this = [obj["chosen"], obj["rejected"]], "bt"
        elif "response" in obj and "score" in obj:
            rs, this = [obj["response"]], "score"
        else:
            raise InputError("%s needs \"chosen\" and \"rejected\", \"ranked\", or \"response\" and \"score\""
                             % where)
        if not all(isinstance(r, str) for r in rs):
            raise InputError("%s: every response must be a string" % where)
        if kind is not None and this != kind:
            raise InputError("%s is %s, the lines before it %s: one file holds one kind (pairs, rankings or "
                             "scores)" % (where, KINDS[this][0], KINDS[kind][1]))
        if kind is None and this == "score":
            section.check_data(this)             # the range, before the scores are checked against it
        kind = this
        if kind == "score":
            scores.append(_score(obj["score"], where, section))
        prompts.append(obj["prompt"])
        responses.append(rs)
    if not prompts:
        raise InputError("%s: %s holds no comparison" % (key, path))
    if kind != "score":
        section.check_data(kind)
    return prompts, responses, kind, torch.tensor(scores, dtype=torch.float64) if kind == "score" else None


def _score(x, where, c):
    """A score line's score, checked: a number in [score_min, score_max] (an integer for ordinal)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise InputError("%s: \"score\" must be a finite number, got %r" % (where, x))
    if not c.score_min <= x <= c.score_max:
        raise InputError("%s: \"score\" %r is outside [rm.score_min, rm.score_max] = [%g, %g]"
                         % (where, x, c.score_min, c.score_max))
    if c.score_loss == "ordinal" and not float(x).is_integer():
        raise InputError("%s: \"score\" %r is not an integer level (rm.score_loss: ordinal)" % (where, x))
    return float(x)


def _encode(tok, prompts, responses, max_len):
    from rlhf_trainer.hf import rm_encode
    rows, truncated = [], 0
    for p, rs in zip(prompts, responses):
        enc = [rm_encode(tok, p, r) for r in rs]
        truncated += sum(len(e) > max_len for e in enc)
        rows.append([e[-max_len:] for e in enc])
    return rows, truncated


def _scores(model, tok, rows, device, autocast):
    """rows: B lists of K_b id lists -> scores [B, K] float32 (0 where K_b < K), valid [B, K]."""
    from rlhf_trainer.hf import pad_right
    K = max(len(r) for r in rows)
    flat = [seq for r in rows for seq in r]
    with autocast():
        s = model.score(*pad_right(flat, tok.pad_token_id, device)).float()
    valid = torch.zeros(len(rows), K, dtype=torch.bool)
    for i, r in enumerate(rows):
        valid[i, :len(r)] = True
    valid = valid.to(device)
    out = torch.zeros(len(rows), K, device=device).masked_scatter(valid, s)
    return out, valid


def _loss(kind, cfg, s, valid, target=None, thresholds=None):
    if kind == "bt":
        return rk.bt_loss(s[:, 0], s[:, 1], label_smoothing=cfg.label_smoothing, center_coef=cfg.center_coef)
    if kind == "score":
        return score_loss(s[:, 0], target, cfg.score_loss, thresholds)
    return rk.ranking_loss(s, valid=valid)


def _targets(c, scores):
    """What rk.score_loss fits: the score mapped onto [-1, 1] (regression) or its level
    score - score_min in [0, K) (ordinal, K = score_max - score_min + 1)."""
    if c.score_loss == "ordinal":
        return (scores - c.score_min).round().long()
    return regression_target(scores, c.score_min, c.score_max)


def accuracy(model, tok, rows, device, autocast, batch_size, scores=None):
    """Fraction of ordered pairs (i better than j) scored in that order; with ``scores`` (score
    lines), of the pairs of lines with different scores, whatever their prompts."""
    right = total = 0
    preds = []
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            s, valid = _scores(model, tok, rows[b:b + batch_size], device, autocast)
            if scores is not None:
                preds.append(s[:, 0].cpu())
                continue
            r, t = pair_counts(s, valid)
            right, total = right + r, total + t
    if scores is not None:
        right, total = score_pair_counts(torch.cat(preds), scores)
    return right / max(total, 1)


def _name(kind, c):
    return "score, %s" % c.score_loss if kind == "score" else kind


def check(cfg):
    """What can be refused before anything is written; returns the device."""
    from rlhf_trainer.devices import resolve_device
    if cfg.rm is None:
        raise ConfigError("rm: the rm command needs an rm section (rm.model, rm.data)")
    return resolve_device(cfg.device)


def _my_rows(idx):
    """This rank's contiguous part of a batch's rows and its weight (its share of the batch's
    mean): under torchrun the ranks' gradients are summed. A rank left without a row (a last
    batch smaller than the world) runs the first row with weight 0, as every rank must run the
    same forwards and backwards."""
    from rlhf_trainer import parallel
    if parallel.world() == 1:
        return idx, 1.0
    mine = [int(i) for i in torch.tensor_split(torch.tensor(idx), parallel.world())[parallel.rank()]]
    return (mine, len(mine) / len(idx)) if mine else (idx[:1], 0.0)


def run(cfg, run_dir, log=print, progress=True):
    from tqdm import tqdm

    from rlhf_trainer import hf, parallel
    main = parallel.is_main()     # under torchrun rank 0 alone prints and writes the run's files
    log, progress = parallel.main_only(log), progress and main
    if not progress:   # transformers' own bars too (loading weights)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    device = parallel.init(check(cfg))
    c = cfg.rm
    path = hf.resolve_model("rm.model", c.model)
    prompts, responses, kind, scores = read_preferences(c.data, "rm.data", c)
    held = read_preferences(c.eval_data, "rm.eval_data", c) if c.eval_data else None
    if held is not None and held[2] != kind:
        raise InputError("rm.eval_data holds %s, rm.data %s: give both in one format" % (held[2], kind))
    if main:
        cfg.save(os.path.join(run_dir, "config.yaml"))
    tok = hf.load_tokenizer(path, "rm.model", log)
    rows, truncated = _encode(tok, prompts, responses, c.max_len)
    held_rows = _encode(tok, held[0], held[1], c.max_len)[0] if held else None
    if truncated:
        log("rm: %d responses longer than rm.max_len=%d tokens were truncated from the left" % (truncated, c.max_len))
    def load():   # under torchrun sharded with FSDP2, loaded by one rank at a time
        m = hf.load_scalar_model(path, "rm.model", tok, cfg.seed).to(device)
        if cfg.gradient_checkpointing:
            from rlhf_trainer.models import enable_checkpointing
            enable_checkpointing(m.backbone)
        return parallel.shard(m, cfg.dtype, parallel.options(cfg).reshard_after_forward)
    model = parallel.one_at_a_time(load)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")  # noqa
    steps = c.epochs * -(-len(rows) // c.batch_size)
    targets = _targets(c, scores) if kind == "score" else None
    thresholds = None
    if kind == "score" and c.score_loss == "ordinal":   # trained beside the model, from the levels' frequencies
        thresholds = Thresholds(targets, int(c.score_max - c.score_min) + 1).to(device)
    params = list(model.parameters()) + ([] if thresholds is None else list(thresholds.parameters()))
    # the thresholds are plain tensors beside the model's DTensors: foreach cannot mix them
    fast = parallel.adam_options(model) if thresholds is None else {}
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0, **fast)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    log("reward model (%s): %d %s, %d epochs of %d steps; device %s, %s"
        % (_name(kind, c), len(rows), "scored responses" if kind == "score" else "comparisons", c.epochs,
           steps // c.epochs, device, cfg.dtype))
    bar = tqdm(total=steps, disable=not progress, desc="rm", unit="step")
    with open(os.path.join(run_dir, "log.jsonl") if main else os.devnull, "w") as f:
        step = 0
        for epoch in range(c.epochs):
            order = torch.randperm(len(rows), generator=gen).tolist()
            for b in range(0, len(rows), c.batch_size):
                idx, weight = _my_rows(order[b:b + c.batch_size])
                s, valid = _scores(model, tok, [rows[i] for i in idx], device, autocast)
                loss, stats = _loss(kind, c, s, valid, None if targets is None else targets[idx].to(device),
                                    thresholds)
                opt.zero_grad()
                (loss * weight if weight != 1.0 else loss).backward()
                if thresholds is not None and parallel.world() > 1:   # not sharded: its gradients summed here
                    for p in thresholds.parameters():
                        p.grad = torch.tensor(parallel.all_sum(p.grad.flatten().tolist()),
                                              dtype=p.grad.dtype, device=p.grad.device).view_as(p.grad)
                opt.step()
                sched.step()
                step += 1
                measured = stats if kind == "score" else {"accuracy": stats["accuracy"]}
                names = ["loss"] + list(measured)
                # the batch's means: each rank's, weighted by its share of the rows, summed over the ranks
                means = parallel.all_sum([weight * x for x in [loss.item()] + [v.item() for v in measured.values()]])
                row = {"step": step, "epoch": epoch, **dict(zip(names, means)), "lr": sched.get_last_lr()[0]}
                f.write(json.dumps(row) + "\n")
                bar.update(1)
                bar.set_postfix(loss="%.4f" % row["loss"], **{k: "%.3f" % row[k] for k in ("accuracy",) if k in row})
    bar.close()
    model.eval()
    summary = {"kind": kind, "comparisons": len(rows), "steps": steps, "final_loss": row["loss"],
               "train_accuracy": accuracy(model, tok, rows, device, autocast, c.batch_size, scores),
               "eval_accuracy": accuracy(model, tok, held_rows, device, autocast, c.batch_size, held[3])
               if held else None, "wall_s": time.perf_counter() - t0, "model": os.path.join(run_dir, "model")}
    if kind == "score":
        del summary["comparisons"]
        summary.update(scores=len(rows), score_loss=c.score_loss)
        if thresholds is not None:
            summary["thresholds"] = thresholds().detach().cpu().tolist()
    summary["world_size"] = parallel.world()
    if parallel.sharded(model):   # the whole model, gathered to rank 0
        sd = parallel.full_state_dict(model)
        if main:
            model.hf.save_pretrained(summary["model"], state_dict={k[3:]: v for k, v in sd.items()
                                                                   if k.startswith("hf.")})
        parallel.barrier()
    else:
        model.hf.save_pretrained(summary["model"])
    if main:
        tok.save_pretrained(summary["model"])
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(args):
    from rlhf_trainer.rundir import RunDirectory
    cfg = Config.load(args.config)
    check(cfg)
    from rlhf_trainer import parallel
    with RunDirectory(args.out, False, args.overwrite, "rm", checkpoint=None) as run_dir:  # rank 0's, under torchrun
        s = run(cfg, run_dir, progress=not args.no_progress)
    if not parallel.is_main():
        return 0
    held = "" if s["eval_accuracy"] is None else ", held-out %.3f" % s["eval_accuracy"]
    print("reward model (%s): train accuracy %.3f%s, final loss %.4f; %.1f s" % (
        _name(s["kind"], cfg.rm), s["train_accuracy"], held, s["final_loss"], s["wall_s"]))
    print("saved to %s (use it as reward.model)" % s["model"])
    return 0
