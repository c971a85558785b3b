"""Smoke test of an installed rlhf-kernels (a wheel in a fresh environment), not of a checkout.

    cd /somewhere/else && python /path/to/tests/smoke_installed.py

Checks that the package imported is the installed one, that its native extension loaded
and was built for the running torch, and that every family's op runs forward and backward
on its compiled CPU kernels and agrees with the torch reference backend. Exits non-zero
(with the reason) otherwise. Not collected by pytest (the test suite runs from a checkout).
"""

import os
import sys

import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext


def close(a, b, what):
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        sys.exit("smoke: %s differs between the cpu and torch backends: %s vs %s" % (what, a, b))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(os.path.abspath(rk.__file__)) == os.path.join(os.path.dirname(here), "rlhf_kernels"):
        sys.exit("smoke: rlhf_kernels was imported from the checkout, not from the installed package")
    if not _ext.loaded():
        sys.exit("smoke: the native extension did not load: %s" % _ext.LOAD_ERROR)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=gen)
    mask = torch.rand(3, 7, generator=gen) < 0.8
    logits, labels = torch.randn(3, 7, 11, generator=gen), torch.randint(0, 11, (3, 7), generator=gen)
    hidden, weight = torch.randn(5, 8, generator=gen), torch.randn(11, 8, generator=gen)

    def run(backend):
        out = {}
        out["gae"] = rk.gae(x, x.flip(1), mask, gamma=0.99, lam=0.95, backend=backend)[0]
        out["whiten"] = rk.masked_whiten(x, mask, backend=backend)
        z = logits.clone().requires_grad_()
        logp, ent = rk.token_logprobs(z, labels, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        out["logprobs"], out["logits grad"] = logp.detach(), z.grad
        h = hidden.clone().requires_grad_()
        lin = rk.linear_token_logprobs(h, weight, labels[0, :5], backend=backend)
        lin.sum().backward()
        out["linear"], out["hidden grad"] = lin.detach(), h.grad
        lp = x.clone().requires_grad_()
        loss, stats = rk.ppo_policy_loss(lp, x.detach() + 0.1, x.flip(0), mask, backend=backend)
        loss.backward()
        out["ppo"], out["ppo grad"], out["clipfrac"] = loss.detach(), lp.grad, stats["clipfrac"]
        c = x[0].clone().requires_grad_()
        loss, _ = rk.bt_loss(c, x[1], backend=backend)
        loss.backward()
        out["bt"], out["bt grad"] = loss.detach(), c.grad
        out["group_advantages"] = rk.group_advantages(x[:, 0].repeat(2), group_size=3, backend=backend)
        h3, w = hidden.view(1, 5, 8).clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = rk.linear_policy_loss(h3, w, labels[:1, :5], x[:1, :5], x[1:2, :5], mask[:1, :5],
                                            entropy_coef=0.01, backend=backend)
        loss.backward()
        out["linear_policy"], out["linear_policy grads"] = loss.detach(), torch.cat([h3.grad.flatten(), w.grad.flatten()])
        out["linear_policy entropy"] = stats["entropy"]
        return out

    native, reference = run("cpu"), run("torch")
    for k in native:
        close(native[k], reference[k], k)
    print("smoke: rlhf-kernels %s from %s, extension loaded (built for torch %s, CUDA kernels %s), torch %s: "
          "every family agrees with the reference" % (
              rk.__version__, os.path.dirname(rk.__file__), _ext.BINARY["torch"],
              "built" if _ext.cuda_built() else "not built", torch.__version__))


if __name__ == "__main__":
    main()
