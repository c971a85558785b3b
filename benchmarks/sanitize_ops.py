"""Every op once, forward and backward, in float32 and bfloat16, on the GPU backends: the
workload compute-sanitizer checks (memcheck, racecheck, synccheck) in benchmarks/gpu_check.sh.

    compute-sanitizer --tool memcheck --error-exitcode 99 python benchmarks/sanitize_ops.py

Small odd shapes (several blocks and tiles, ragged tails, masked rows, ignored labels), so the
run takes seconds under the sanitizer; the tests check the values, this checks the memory
accesses and the synchronization of every kernel the ops launch.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhf_kernels as rk  # noqa: E402


def run_all(backend, dtype, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)

    B, T, V, H = 5, 3001, 1031, 96  # T > one GAE tile, V > one logits chunk, ragged tails
    mask = torch.rand(B, T, generator=gen, device=device) < 0.85
    mask[1] = False
    r, v = randn(B, T, dt=dtype), randn(B, T, dt=dtype)
    rk.gae(r, v, mask, gamma=0.99, lam=0.95, backend=backend)
    cu = torch.tensor([0, 7, 7, 4000, B * T], device=device)
    rk.gae_packed(r.reshape(-1), v.reshape(-1), cu, mask=mask.reshape(-1), validate=False, backend=backend)
    rk.masked_whiten(r, mask, backend=backend)

    logits = randn(7, 3, V, dt=dtype).requires_grad_()
    labels = torch.randint(0, V, (7, 3), generator=gen, device=device)
    labels[0, 0] = -100
    logp, ent = rk.token_logprobs(logits, labels, return_entropy=True, validate=False, backend=backend)
    (logp.sum() + ent.sum()).backward()
    rk.token_entropy(logits, temperature=0.7, backend=backend).sum().backward()
    rk.full_kl(logits, randn(7, 3, V, dt=dtype), backend=backend).sum().backward()
    z = logits.detach().clone().requires_grad_()
    rk.token_logprobs(z, labels, inplace_backward=True, validate=False, backend=backend).sum().backward()

    h = randn(37, H, dt=dtype).requires_grad_()
    w = (randn(V, H, dt=dtype) / 8).requires_grad_()
    b = randn(V, dt=dtype).requires_grad_()
    lin_labels = torch.randint(0, V, (37,), generator=gen, device=device)
    logp, ent = rk.linear_token_logprobs(h, w, lin_labels, bias=b, return_entropy=True, validate=False,
                                         backend=backend)
    (logp.sum() + ent.sum()).backward()

    # the policy head: several chunks (tile), masked rows, both passes of the sequence ratio
    from rlhf_kernels.ops import linear_policy as lp_ops
    hp = randn(3, 13, H, dt=dtype).requires_grad_()
    pl_labels = torch.randint(0, V, (3, 13), generator=gen, device=device)
    pl_mask = torch.rand(3, 13, generator=gen, device=device) < 0.8
    pl_mask[1] = False
    pl_old = -5 - torch.rand(3, 13, generator=gen, device=device)
    prev, lp_ops._TILE = lp_ops._TILE, 8 * V
    try:
        for opts in (dict(dual_clip=3.0), dict(ratio_level="sequence", rollout_logprobs=pl_old + 0.1,
                                               is_correction="mis", is_level="geometric")):
            loss, _ = rk.linear_policy_loss(hp, w, pl_labels, pl_old, randn(3, 13), pl_mask, bias=b,
                                            ref_logprobs=pl_old, kl_coef=0.1, entropy_coef=0.01, validate=False,
                                            backend=backend, **opts)
            loss.backward()
    finally:
        lp_ops._TILE = prev

    lp = (-2 * torch.rand(300, 131, generator=gen, device=device)).to(dtype).requires_grad_()
    pmask = torch.rand(300, 131, generator=gen, device=device) < 0.8
    loss, _ = rk.ppo_policy_loss(lp, lp.detach() + 0.1, randn(300, 131, dt=dtype), pmask, dual_clip=3.0,
                                 num_tokens=torch.tensor(1000.0, device=device), backend=backend)
    loss.backward()
    vv = randn(300, 131, dt=dtype).requires_grad_()
    loss, _ = rk.ppo_value_loss(vv, vv.detach() + 0.1, randn(300, 131, dt=dtype), pmask,
                                loss_agg="seq-mean-token-mean", backend=backend)
    loss.backward()

    c, rj = randn(4099, dt=dtype).requires_grad_(), randn(4099, dt=dtype).requires_grad_()
    loss, _ = rk.bt_loss(c, rj, margin=randn(4099, dt=dtype), label_smoothing=0.1, center_coef=0.01, backend=backend)
    loss.backward()
    rewards = randn(4099, dt=dtype)
    for mode in ("grpo", "rloo", "reinforce++"):
        rk.group_advantages(rewards[:4096], group_size=16, mode=mode, backend=backend)
        ids = torch.randint(0, 600, (4099,), generator=gen, device=device)
        rk.group_advantages(rewards, ids, mode=mode, mask=torch.rand(4099, 9, generator=gen, device=device) < 0.7,
                            backend=backend)
    pred = randn(4099, dt=dtype).requires_grad_()
    loss, _ = rk.score_loss(pred, randn(4099, dt=dtype), backend=backend)
    loss.backward()
    th = (torch.arange(6, device=device, dtype=torch.float32) - 2.5).requires_grad_()
    levels = torch.randint(0, 7, (4099,), generator=gen, device=device)
    loss, _ = rk.score_loss(pred, levels, kind="ordinal", thresholds=th, validate=False, backend=backend)
    loss.backward()
    rank = randn(33, 7, dt=dtype).requires_grad_()
    loss, _ = rk.ranking_loss(rank, valid=torch.rand(33, 7, generator=gen, device=device) < 0.8, backend=backend)
    loss.backward()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="cuda,triton")
    args = p.parse_args(argv)
    usable = rk.available_backends("cuda")
    for backend in args.backends.split(","):
        if backend not in usable:
            print("sanitize_ops: %s not usable here, skipped" % backend)
            continue
        for dtype in (torch.float32, torch.bfloat16):
            run_all(backend, dtype)
            print("sanitize_ops: %s %s: every op forward and backward" % (backend, str(dtype).replace("torch.", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
