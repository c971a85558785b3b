"""The functions rlhf_kernels.integrations swaps into TRL, verl and OpenRLHF: each library's own
function against our replacement, at one realistic shape per function, on this device.

    python benchmarks/bench_integrations.py                       # every installed library, this device
    python benchmarks/bench_integrations.py --device cuda --libraries verl --repeats 20 --csv out.csv

Providers: "original" (the library's function, whatever path it takes on this machine: TRL's
Triton kernel on CUDA, verl's and OpenRLHF's flash-attn cross entropy when flash-attn is
installed, their Python loops otherwise) and "patched" (ours, what patch() installs). Functions
with a gradient are timed forward + backward (the gradient of a weighted sum of the outputs);
the others forward. Inputs are made on the device. Times are medians (CUDA events on a GPU);
the speedup column is original / patched in the same run; on a GPU the peak memory over the
inputs is reported too. The patched provider runs with FallThroughWarning as an error: a call
that would run the library's function instead of ours is reported as a failure, never timed
as ours. A library that does not import is skipped with the reason
(tests/install_integrations.sh installs them; on an offline GPU machine, wheels in ./.whl that
benchmarks/gpu_check.sh installs). Shapes: CUDA, a 152k vocabulary (Qwen) over 8k tokens and
[64, 4096] PPO batches; CPU, a 32k vocabulary over 1k tokens and [16, 1024]; --quick, small
shapes that only check the benchmark runs (tests/test_integrations_bench.py).
"""

import argparse
import os
import sys
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's rlhf_kernels
from common import fmt_time, median_time, peak_extra_bytes, print_table, write_csv  # noqa: E402
from rlhf_kernels.integrations import FallThroughWarning  # noqa: E402

LIBRARIES = ("trl", "verl", "openrlhf")


def shapes(device, quick=False):
    if quick:
        return dict(tokens=256, vocab=4099, hidden=64, B=8, T=256, groups=8, group=4, dtype=torch.bfloat16
                    if device.startswith("cuda") else torch.float32)
    if device.startswith("cuda"):
        return dict(tokens=8192, vocab=152064, hidden=4096, B=64, T=4096, groups=256, group=4, dtype=torch.bfloat16)
    return dict(tokens=1024, vocab=32000, hidden=512, B=16, T=1024, groups=16, group=4, dtype=torch.float32)


class Case:
    """One function: ``make(device, s)`` -> (args, kwargs, indices of the args that get a gradient)."""

    def __init__(self, library, name, make, shape, variant="", dtype=None):
        self.library, self.name, self.make, self.shape, self.variant = library, name, make, shape, variant
        self.dtype = dtype  # of the inputs, where it is not the shapes' dtype

    @property
    def label(self):
        return self.name + (" (%s)" % self.variant if self.variant else "")


def randn(shape, device, dtype=torch.float32, scale=1.0, grad=False):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)


def mask(B, T, device, dtype=torch.int64):
    lengths = torch.randint(T // 4, T + 1, (B,), device=device)
    return (torch.arange(T, device=device)[None] < lengths[:, None]).to(dtype)


def uids(s):
    ids = np.array(["uid-%d" % g for g in range(s["groups"]) for _ in range(s["group"])], dtype=object)
    return ids[np.random.default_rng(0).permutation(len(ids))]


def ppo_args(device, s, mask_dtype=torch.int64, outcome=False):
    """old, logp (requires grad), advantages (one per sequence with ``outcome``), mask: [B, T]."""
    B, T = s["B"], s["T"]
    old = -torch.rand(B, T, device=device) * 4
    lp = (old + torch.randn(B, T, device=device) * 0.1).requires_grad_(True)
    adv = randn((B, 1), device).expand(B, T).contiguous() if outcome else randn((B, T), device)
    return old, lp, adv, mask(B, T, device, mask_dtype)


def logits_case(s, device):
    N, V = s["tokens"], s["vocab"]
    z = randn((N, V), device, s["dtype"], 3.0, grad=True)
    return z, torch.randint(0, V, (N,), device=device)


def cases(s):
    N, V, H, B, T = s["tokens"], s["vocab"], s["hidden"], s["B"], s["T"]
    logits_shape, ppo_shape = "N=%d V=%d" % (N, V), "%dx%d" % (B, T)

    def trl_logits(d, s):
        z, y = logits_case(s, d)
        return (z.view(8, N // 8, V), y.view(8, N // 8)), {}, [0]

    def trl_head(d, s):
        h, w = randn((N, H), d, s["dtype"], 1.0, True), randn((V, H), d, s["dtype"], H ** -0.5, True)
        y = torch.randint(0, V, (N,), device=d)
        return (h, w, None, y, 1.0, 32768, None, 1.0, ("log_probs", "entropy")), {}, [0, 1]

    def verl_head(d, s):
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
        h, w = randn((N, H), d, s["dtype"], 1.0, True), randn((V, H), d, s["dtype"], H ** -0.5, True)
        return (FusedLinearForPPO(), h, w, torch.randint(0, V, (N,), device=d), 1.0), {}, [1, 2]

    def flat_logits(d, s):
        z, y = logits_case(s, d)
        return (z, y), {}, [0]

    def entropy(d, s):
        return (logits_case(s, d)[0],), {}, [0]

    def kl(d, s):
        lp = randn((B, T), d, grad=True) - 2
        return (lp, (lp.detach() + randn((B, T), d, scale=0.1)), "low_var_kl"), {}, [0]

    def gae(d, s):
        return (randn((B, T), d), randn((B, T), d), mask(B, T, d), 1.0, 0.95), {}, []

    def outcome(d, s):
        Bo = s["groups"] * s["group"]
        r = torch.zeros(Bo, T, device=d)
        r[:, -1] = torch.randn(Bo, device=d)
        return (r, mask(Bo, T, d), uids(s)), {}, []

    def reinforce(d, s):
        from verl.trainer.config import AlgoConfig
        return (randn((B, T), d), mask(B, T, d)), {"config": AlgoConfig(gamma=1.0)}, []

    def verl_policy(outcome=False, agg="token-mean"):
        def make(d, s):
            from verl.workers.config import ActorConfig
            cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2)
            old, lp, adv, m = ppo_args(d, s, outcome=outcome)
            return (old, lp, adv, m), {"loss_agg_mode": agg, "config": cfg}, [1]
        return make

    def verl_value(d, s):
        v_old = randn((B, T), d)
        v = (v_old + randn((B, T), d, scale=0.3)).requires_grad_(True)
        return (v, randn((B, T), d), v_old, mask(B, T, d), 0.2), {}, [0]

    def orlhf_logprobs(d, s):
        z, y = logits_case(dict(s, dtype=torch.float32), d)  # OpenRLHF casts the logits to float32 first
        return (z.view(8, N // 8, V), y.view(8, N // 8)), {}, [0]

    def orlhf_entropy(d, s):
        return (logits_case(dict(s, dtype=torch.float32), d)[0],), {}, [0]

    def orlhf_kl(d, s):
        lp = randn((B, T), d, grad=True) - 2
        return (lp, lp.detach() + randn((B, T), d, scale=0.1)), {"kl_estimator": "k3"}, [0]

    def orlhf_policy(loss_type):
        def make(d, s):
            from openrlhf.models.loss import PolicyLoss
            old, lp, adv, m = ppo_args(d, s, torch.bool, outcome=loss_type == "gspo")
            return (PolicyLoss(policy_loss_type=loss_type), lp, old, adv, m), {}, [1]
        return make

    def orlhf_value(d, s):
        from openrlhf.models.loss import ValueLoss
        v_old = randn((B, T), d)
        v = (v_old + randn((B, T), d, scale=0.3)).requires_grad_(True)
        return (ValueLoss(clip_eps=0.2), v, v_old, randn((B, T), d), mask(B, T, d, torch.bool)), {}, [1]

    def orlhf_gae(d, s):
        return (None, randn((B, T), d), randn((B, T), d), mask(B, T, d, torch.bool), 1.0, 0.95), {}, []

    outcome_shape = "B=%d (%d groups) T=%d" % (s["groups"] * s["group"], s["groups"], T)
    return [
        Case("trl", "selective_log_softmax", trl_logits, logits_shape),
        Case("trl", "entropy_from_logits", lambda d, s: ((trl_logits(d, s)[0][0],), {}, [0]), logits_shape),
        Case("trl", "selective_log_softmax_and_entropy", trl_logits, logits_shape),
        Case("trl", "ChunkedLogProbFunction.apply", trl_head, "N=%d H=%d V=%d" % (N, H, V)),
        Case("verl", "logprobs_from_logits", flat_logits, logits_shape),
        Case("verl", "entropy_from_logits", entropy, logits_shape),
        Case("verl", "entropy_from_logits_with_chunking", entropy, logits_shape),
        Case("verl", "FusedLinearForPPO.forward", verl_head, "N=%d H=%d V=%d" % (N, H, V)),
        Case("verl", "kl_penalty", kl, ppo_shape),
        Case("verl", "compute_gae_advantage_return", gae, ppo_shape),
        Case("verl", "compute_grpo_outcome_advantage", outcome, outcome_shape),
        Case("verl", "compute_grpo_vectorized_outcome_advantage", outcome, outcome_shape),
        Case("verl", "compute_rloo_outcome_advantage", outcome, outcome_shape),
        Case("verl", "compute_reinforce_plus_plus_baseline_outcome_advantage", outcome, outcome_shape),
        Case("verl", "compute_reinforce_plus_plus_outcome_advantage", reinforce, ppo_shape),
        Case("verl", "compute_policy_loss_vanilla", verl_policy(), ppo_shape),
        Case("verl", "compute_policy_loss_gspo", verl_policy(outcome=True, agg="seq-mean-token-mean"), ppo_shape),
        Case("verl", "compute_policy_loss_cispo", verl_policy(), ppo_shape),
        Case("verl", "compute_value_loss", verl_value, ppo_shape),
        Case("openrlhf", "log_probs_from_logits", orlhf_logprobs, logits_shape, dtype=torch.float32),
        Case("openrlhf", "compute_entropy", orlhf_entropy, logits_shape, dtype=torch.float32),
        Case("openrlhf", "compute_approx_kl", orlhf_kl, ppo_shape),
        Case("openrlhf", "PolicyLoss.forward", orlhf_policy("ppo"), ppo_shape),
        Case("openrlhf", "PolicyLoss.forward", orlhf_policy("gspo"), ppo_shape, variant="gspo"),
        Case("openrlhf", "ValueLoss.forward", orlhf_value, ppo_shape),
        Case("openrlhf", "RemoteExperienceMaker.get_advantages_and_returns", orlhf_gae, ppo_shape),
        Case("openrlhf", "RemoteExperienceMaker.get_cumulative_returns",
             lambda d, s: ((None, randn((B, T), d), mask(B, T, d, torch.bool), 1.0), {}, []), ppo_shape),
    ]


def load(library):
    """(integration module, function name -> the library's own function), or a reason string."""
    try:
        if library == "openrlhf":  # its package imports flash-attn and DeepSpeed: the tests' loader
            sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
            from test_integrations_kit import lift_method, load_openrlhf
            load_openrlhf()
        import importlib
        module = importlib.import_module("rlhf_kernels.integrations." + library)
        integration = next(v for v in vars(module).values() if type(v).__name__ == "Integration")
        importlib.import_module(library)
    except BaseException as e:  # pytest's skip is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        return "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    originals = {}
    for r in integration.replacements:
        try:
            originals[r.name] = integration.original(r.target)
        except ImportError:
            if library == "openrlhf" and r.name.startswith("RemoteExperienceMaker."):
                try:
                    originals[r.name] = lift_method("openrlhf.trainer.ppo_utils.experience_maker",
                                                    *r.name.split("."))
                except BaseException:
                    pass
    return module, integration, originals  # OpenRLHF's compute_entropy compiles in the warm-up


def measure(fn, make, device, s, repeats):
    args, kwargs, grads = make(device, s)
    leaves = [a for i, a in enumerate(args) if i in grads]
    weights = {}

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallThroughWarning)  # ours must run, not the library's function
            out = fn(*args, **kwargs)
        if not leaves:
            return
        first = out if isinstance(out, torch.Tensor) else out[0]
        second = out[1] if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor) and \
            out[1].requires_grad and out[1].shape == first.shape else None
        loss = (first.float() * weights.setdefault("g", torch.randn(first.shape, device=first.device))).sum()
        if second is not None:
            loss = loss + second.float().sum()
        torch.autograd.grad(loss, leaves)

    seconds = median_time(step, device=device, warmup=2, repeats=repeats)
    peak = peak_extra_bytes(step, device) if device.startswith("cuda") else None
    return seconds, peak, "fwd+bwd" if leaves else "fwd"


def run(device, libraries, repeats, records, quick=False):
    """Benchmark every case of the installed ``libraries``; appends one record per provider and
    case to ``records``; returns {library: why it was skipped}."""
    s = shapes(device, quick)
    skipped = {}
    rows = []
    for library in libraries:
        loaded = load(library)
        if isinstance(loaded, str):
            print("%s: skipped, it does not import here (%s)" % (library, loaded))
            skipped[library] = loaded
            continue
        module, integration, originals = loaded
        ours = {r.name: r.function for r in integration.replacements}
        for case in cases(s):
            if case.library != library:
                continue
            if case.name not in originals:
                print("%s.%s: skipped, its module does not import here" % (library, case.name))
                skipped[library + "." + case.name] = "its module does not import here"
                continue
            results = {}
            for provider, fn in (("original", originals[case.name]), ("patched", ours[case.name])):
                try:
                    results[provider] = measure(fn, case.make, device, s, repeats)
                except Exception as e:  # a provider that fails is reported, the others still run
                    results[provider] = ("%s: %s" % (type(e).__name__, str(e)[:80]), None, "")
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            base = results["original"][0]
            dtype = str(case.dtype or s["dtype"]).replace("torch.", "")
            for provider, (seconds, peak, mode) in results.items():
                ok = isinstance(seconds, float)
                speedup = base / seconds if ok and isinstance(base, float) else None
                rows.append([library, case.label, provider, case.shape, dtype, mode,
                             fmt_time(seconds) if ok else seconds, "%.2fx" % speedup if speedup else "",
                             "%.0f MiB" % (peak / 2 ** 20) if peak is not None else ""])
                records.append({"family": "integrations", "library": library, "op": case.label, "provider": provider,
                                "shape": case.shape, "dtype": dtype, "mode": mode,
                                "median_s": seconds if ok else "", "speedup_vs_original": speedup or "",
                                "peak_extra_bytes": peak if peak is not None else ""})
    print_table("integrations on %s: the libraries' functions vs ours (patched)" % device,
                ["library", "function", "provider", "shape", "dtype", "mode", "median", "speedup", "peak extra"], rows)
    return skipped


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--libraries", default=",".join(LIBRARIES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--quick", action="store_true", help="small shapes: check that every case runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records = []
    run(args.device, [lib for lib in args.libraries.split(",") if lib], args.repeats, records, args.quick)
    if args.csv:
        write_csv(args.csv, records)


if __name__ == "__main__":
    main()
