"""``python -m rlhf_kernels.selftest``: every public op against its float64 reference, here.

For every case of rlhf_kernels/_selftest_cases.py (each public op, some twice), every usable
backend, every device present (the CPU and each visible GPU) and float32 and bfloat16: the
forward outputs and the gradients, at small odd shapes, against the eager reference run in
float64 on the same inputs, with the rules of rlhf_kernels/tolerances.py. Then batch invariance
of the per-row ops (a row's outputs bitwise the same alone, among a few rows, or permuted), and,
on a GPU, CUDA-graph capture and replay of every op and no host sync with ``validate=False``.

It prints one line per check and exits 1 if any failed, naming the case, its seed and shapes and
the command that repeats it. Without a GPU the Triton kernels run under the interpreter when
triton is installed (TRITON_INTERPRET=1, float32 only, at fewer rows: it is slow).
"""

import argparse
import os
import sys
import time
import zlib

import torch

import rlhf_kernels
from rlhf_kernels import _backend, tolerances as tol
from rlhf_kernels._selftest_cases import CASES

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined (they are imported lazily)
    _backend.refresh()

NOT_OPS = {"BACKENDS", "BackendUnavailable", "available_backends"}
DTYPES = (torch.float32, torch.bfloat16)
# batch invariance: a batch of 37 rows; sub-batches of 1, 3 and 17 of its rows, and all of them permuted.
# The Triton interpreter runs one program at a time on the CPU: there, 3 rows for the values and
# a batch of 5 rows for invariance (sub-batches of 1 and 3, and the permutation).
INVARIANCE = (37, (1, 3, 17))
INTERPRETER_INVARIANCE = (5, (1, 3))
INTERPRETER_ROWS = 3


def public_ops():
    return [name for name in rlhf_kernels.__all__ if name not in NOT_OPS]


def unsupported(device, backend, dtype):
    """Why (device, backend, dtype) is not run, or None."""
    if backend == "triton" and torch.device(device).type == "cpu" and dtype != torch.float32:
        return "the Triton interpreter cannot do bfloat16 arithmetic"
    return None


def case_seed(seed, case):
    return (seed * 1000003 + zlib.crc32(case.name.encode())) % (1 << 62)


def interpreted(device, backend):
    return backend == "triton" and torch.device(device).type == "cpu"


def rows_for(case, device, backend):
    return min(case.n, INTERPRETER_ROWS) if interpreted(device, backend) else case.n


def make_inputs(case, seed, n, dtype):
    """The case's inputs with the float ones rounded to ``dtype``, on the CPU."""
    x = case.make(torch.Generator().manual_seed(case_seed(seed, case)), n)
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in x.items()}


def cast(x, dtype, device="cpu"):
    return {k: (t.to(dtype) if t.is_floating_point() else t).to(device) for k, t in x.items()}


def leaves(x, diff):
    """A copy of ``x`` whose inputs in ``diff`` are fresh leaves that require a gradient."""
    return {k: t.detach().clone().requires_grad_(True) if k in diff else t for k, t in x.items()}


def weights_for(outputs, seed):
    """A fixed random float64 weight per output element: the backward is that of their weighted sum."""
    g = torch.Generator().manual_seed(seed + 1)
    return {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in sorted(outputs.items())}


def forward_backward(fn, x, diff, weights):
    """{output: tensor} of ``fn(x)``, plus {"d_" + input: gradient} for the inputs in ``diff``
    (leaves of ``x``), of the weighted sum of the outputs that carry a gradient."""
    out = fn(x)
    res = {k: o.detach() for k, o in out.items()}
    carry = [(o.double() * weights[k]).sum() for k, o in out.items() if o.requires_grad and k in weights]
    if diff and carry:
        grads = torch.autograd.grad(sum(carry), [x[k] for k in diff], allow_unused=True)
        res.update(("d_" + k, g) for k, g in zip(diff, grads) if g is not None)
    return res


def max_err(ours, exact):
    """max |ours - exact|; NaN where the other is not NaN counts as infinite."""
    if ours.shape != exact.shape:
        return float("inf")
    if ours.numel() == 0:
        return 0.0
    d = (ours.detach().cpu().double() - exact.detach().cpu().double()).abs()
    d = torch.where(torch.isnan(ours.cpu()) & torch.isnan(exact.cpu()), torch.zeros_like(d), d)
    return float(torch.nan_to_num(d, nan=float("inf")).max())


def bound(kind, exact, own_err, out_dtype):
    """The tolerance of one output (rlhf_kernels/tolerances.py: SELFTEST_RULES)."""
    atol, rtol = tol.SELFTEST_RULES[kind]
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    return (max(atol + rtol * scale, tol.TORCH_ERR_FACTOR * own_err)
            + tol.STORE_ULPS * torch.finfo(out_dtype).eps * scale)


class Result:
    """One line of the table."""

    def __init__(self, case, check, backend, device, dtype, err=None, tol_=None, ok=True, what="", repro=""):
        self.case, self.check, self.backend, self.device, self.dtype = case, check, backend, device, dtype
        self.err, self.tol, self.ok, self.what, self.repro = err, tol_, ok, what, repro

    def line(self):
        num = lambda v: "-" if v is None else "%.2e" % v  # noqa: E731
        dt = str(self.dtype).replace("torch.", "") if self.dtype is not None else "-"
        return "%-30s %-11s %-7s %-7s %-9s %-10s %9s %9s  %s%s" % (
            self.case, self.check, self.backend, self.device, dt, self.what[:10], num(self.err), num(self.tol),
            "ok" if self.ok else "FAIL", "" if self.ok else "  " + self.repro)


HEADER = "%-30s %-11s %-7s %-7s %-9s %-10s %9s %9s  %s" % (
    "op", "check", "backend", "device", "dtype", "worst", "max err", "tolerance", "status")


def repro(case, seed, device, backend, x, extra=""):
    shapes = ", ".join("%s%s %s" % (k, list(t.shape), str(t.dtype).replace("torch.", "")) for k, t in x.items())
    return ("seed %d, inputs %s%s; repeat: python -m rlhf_kernels.selftest --only %s --backend %s --device %s "
            "--seed %d" % (seed, shapes, extra, case.op, backend, device, seed))


def check_values(case, backend, device, dtype, seed):
    """Forward and backward against the float64 reference."""
    x = make_inputs(case, seed, rows_for(case, device, backend), dtype)
    with torch.no_grad():
        w = weights_for(case.exact(cast(x, torch.float64)), case_seed(seed, case))
    exact = forward_backward(case.exact, leaves(cast(x, torch.float64), case.diff), case.diff, w)
    # PyTorch's own error: the reference run in float32 (forward outputs: the kernels compute in
    # float32 at least) and in the inputs' dtype (gradients, which come back in it)
    own = forward_backward(case.exact, leaves(cast(x, torch.float32), case.diff), case.diff, w)
    if dtype != torch.float32 and case.diff:
        low = forward_backward(case.exact, leaves(x, case.diff), case.diff, w)
        own.update((k, t) for k, t in low.items() if k.startswith("d_"))
    if dtype != torch.float32 and backend == "torch" and case.torch_low is not None:
        # that backend's own logits in the inputs' dtype (_selftest_cases.py): the float64 reference
        # on them, and PyTorch's own error of its gradients on them in the inputs' dtype
        on_low = lambda xx: case.torch_low(xx, dtype)  # noqa: E731
        exact = forward_backward(on_low, leaves(cast(x, torch.float64), case.diff), case.diff, w)
        own = dict(exact)
        own.update((k, t) for k, t in forward_backward(on_low, leaves(x, case.diff), case.diff, w).items()
                   if k.startswith("d_"))
    wd = {k: t.to(device) for k, t in w.items()}
    ours = forward_backward(lambda xx: case.ours(xx, backend), leaves(cast(x, dtype, device), case.diff), case.diff,
                            wd)
    missing = sorted(set(exact) ^ set(ours))
    if missing:
        return Result(case.name, "values", backend, device, dtype, ok=False, what=missing[0],
                      repro="outputs %s not in both; %s" % (missing, repro(case, seed, device, backend, x)))
    rows = []  # (err / tolerance, output, err, tolerance)
    for k, e in exact.items():
        kind = "grad" if k.startswith("d_") else case.kinds.get(k, case.kinds["*"])
        err = max_err(ours[k], e)
        tl = bound(kind, e, max_err(own[k], e), ours[k].dtype)
        rows.append((err / tl if tl > 0 else (0.0 if err == 0 else float("inf")), k, err, tl))
    ratio, what, err, tl = max(rows)
    ok = ratio <= 1.0
    return Result(case.name, "values", backend, device, dtype, err, tl, ok, what,
                  "" if ok else repro(case, seed, device, backend, x))


def _cut(x, names, idx):
    return {k: t[idx] if k in names else t for k, t in x.items()}


def check_invariance(case, backend, device, dtype, seed):
    """A row's outputs (and gradient rows) bitwise the same in sub-batches of 1, 3 and 17 rows and
    with all rows permuted as in the whole batch."""
    n, sizes = INTERPRETER_INVARIANCE if interpreted(device, backend) else INVARIANCE
    x = cast(make_inputs(case, seed, n, dtype), dtype, device)
    fn = lambda xx: case.ours(xx, backend)  # noqa: E731
    out = {k: o.detach() for k, o in fn(x).items()}
    w = {k: t.to(device) for k, t in weights_for(out, case_seed(seed, case)).items() if k in case.rows.outputs}
    full = forward_backward(fn, leaves(x, case.diff), case.diff, w)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(case_seed(seed, case)))
    subsets = [perm[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))] + [perm]
    worst, what = 0.0, ""
    for idx in subsets:
        di = idx.to(device)
        sub = forward_backward(fn, leaves(_cut(x, case.rows.inputs, di), case.diff), case.diff,
                               {k: t[di] for k, t in w.items()})
        for k in case.rows.outputs:
            if k not in full:
                continue
            a, b = sub[k], full[k][di]
            if not torch.equal(a, b):
                err = max_err(a, b)
                if err >= worst:
                    worst, what, rows = max(err, 1e-300), k, len(idx)
    ok = worst == 0.0
    return Result(case.name, "invariance", backend, device, dtype, worst, 0.0, ok, what,
                  "" if ok else "differs in %s of the batch's %d rows; %s" % (
                      "all (permuted)" if rows == n else "a sub-batch of %d" % rows, n,
                      repro(case, seed, device, backend, x)))


def check_graph(case, backend, device, seed):
    """Capture forward and backward in a CUDA graph, replay it on new input values, compare with eager."""
    x = leaves(cast(make_inputs(case, seed, case.n, torch.float32), torch.float32, device), case.diff)
    fn = lambda xx: case.ours(xx, backend)  # noqa: E731
    w = {k: t.to(device) for k, t in weights_for({k: o.detach() for k, o in fn(x).items()},
                                                 case_seed(seed, case)).items()}
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graph expects
            for _ in range(3):
                forward_backward(fn, x, case.diff, w)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = forward_backward(fn, x, case.diff, w)
        g = torch.Generator().manual_seed(case_seed(seed, case) + 2)
        with torch.no_grad():  # new values in the captured input buffers (masks, labels, offsets kept)
            for t in x.values():
                if t.is_floating_point():
                    t.add_((0.1 * torch.randn(t.shape, generator=g)).to(device))
        graph.replay()
        torch.cuda.synchronize()
        eager = forward_backward(fn, x, case.diff, w)
    worst, what = 0.0, ""
    for k, e in eager.items():
        err = max_err(static[k], e) / (1 + float(e.abs().max()) if e.numel() else 1)
        if err >= worst:
            worst, what = err, k
    ok = worst <= tol.GRAPH_REPLAY_TOL
    return Result(case.name, "cuda-graph", backend, device, torch.float32, worst, tol.GRAPH_REPLAY_TOL, ok, what,
                  "" if ok else repro(case, seed, device, backend, x))


def check_no_sync(case, backend, device, seed):
    """A second call, forward and backward, under torch.cuda.set_sync_debug_mode("error")."""
    x = leaves(cast(make_inputs(case, seed, case.n, torch.float32), torch.float32, device), case.diff)
    fn = lambda xx: case.ours(xx, backend)  # noqa: E731
    w = {k: t.to(device) for k, t in weights_for({k: o.detach() for k, o in fn(x).items()},
                                                 case_seed(seed, case)).items()}
    with torch.cuda.device(device):
        forward_backward(fn, x, case.diff, w)  # first call: compilation, caches, lazy initialization
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward_backward(fn, x, case.diff, w)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return Result(case.name, "no-sync", backend, device, torch.float32)


def devices():
    return ["cpu"] + ["cuda:%d" % i for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def guarded(check, case, name, backend, device, dtype, seed, *args):
    """``check(case, backend, device, *args)``; an exception is a failure that names it."""
    try:
        return check(case, backend, device, *args)
    except Exception as e:  # noqa: BLE001 (any error of an op is a failed check, reported)
        msg = "%s: %s" % (type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300])
        x = make_inputs(case, seed, rows_for(case, device, backend), dtype or torch.float32)
        return Result(case.name, name, backend, device, dtype, ok=False, what="error",
                      repro="%s; %s" % (msg, repro(case, seed, device, backend, x)))


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m rlhf_kernels.selftest", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="OP",
                   help="run only this op (repeat or comma-separate for several): %s" % ", ".join(public_ops()))
    p.add_argument("--backend", action="append", metavar="NAME", help="only this backend (repeatable): %s"
                   % ", ".join(_backend.BACKENDS))
    p.add_argument("--device", action="append", metavar="DEV", help="only this device (repeatable): cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=None, help="the inputs' seed (default: a fresh one, printed)")
    args = p.parse_args(argv)
    args.only = [o for arg in args.only or [] for o in arg.split(",") if o]
    unknown = [o for o in args.only if o not in public_ops()]
    if unknown:
        p.error("--only: unknown op %s; the ops are %s" % (", ".join(unknown), ", ".join(public_ops())))
    bad = [b for b in args.backend or [] if b not in _backend.BACKENDS]
    if bad:
        p.error("--backend: unknown backend %s; choose from %s" % (", ".join(bad), ", ".join(_backend.BACKENDS)))
    return args


def main(argv=None):
    args = parse(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    start = time.perf_counter()
    covered = {c.op for c in CASES}
    cases = [c for c in CASES if not args.only or c.op in args.only]
    devs = [d for d in devices() if not args.device or d in args.device or d.split(":")[0] in args.device]
    print("rlhf-kernels %s self-test: torch %s, seed %d%s" % (
        rlhf_kernels.__version__, torch.__version__, seed,
        ", Triton under the interpreter" if _backend.triton_interpret() else ""))
    if not _backend.triton_installed():
        print("triton is not installed: the triton backend is not checked")
    print(HEADER)
    results = []

    def emit(r):
        results.append(r)
        print(r.line(), flush=True)

    for op in public_ops():  # an op without a case must not pass unnoticed
        if op not in covered and (not args.only or op in args.only):
            emit(Result(op, "values", "-", "-", None, ok=False, what="no case",
                        repro="add a case for it to rlhf_kernels/_selftest_cases.py"))
    for device in devs:
        backends = [b for b in rlhf_kernels.available_backends(device) if not args.backend or b in args.backend]
        runs = [(b, dt) for b in backends for dt in DTYPES if unsupported(device, b, dt) is None]
        for case in cases:
            for b, dt in runs:
                emit(guarded(check_values, case, "values", b, device, dt, seed, dt, seed))
        for case in (c for c in cases if c.rows):
            for b, dt in runs:
                emit(guarded(check_invariance, case, "invariance", b, device, dt, seed, dt, seed))
        if device.startswith("cuda"):
            for case in cases:
                for b in (b for b in backends if b in ("cuda", "triton")):
                    emit(guarded(check_graph, case, "cuda-graph", b, device, torch.float32, seed, seed))
                    emit(guarded(check_no_sync, case, "no-sync", b, device, torch.float32, seed, seed))
    failed = [r for r in results if not r.ok]
    print("\n%d checks, %d failed, in %.1f s (seed %d)" % (len(results), len(failed), time.perf_counter() - start,
                                                          seed))
    for r in failed:
        print("FAIL %s %s, backend %s, device %s, dtype %s: %s %s" % (
            r.case, r.check, r.backend, r.device, str(r.dtype).replace("torch.", ""), r.what, r.repro))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
