"""Static check of every kernel for sm_90, without a GPU: registers, spills, stack and local memory.

    python benchmarks/static_sm90.py            # print the table; exit 1 on a spill not allowed below
    python benchmarks/static_sm90.py --write    # ...and rewrite its section of benchmarks/RESULTS.md

CUDA C++ kernels: read from the sm_90 cubins in the built extension (rlhf_kernels/_C*.so), with
cuobjdump (-res-usage for registers, stack and local memory; -sass, where there is any local
memory, for its loads and stores, STL/LDL, which is what a spill is), never recompiled.

Triton kernels: at the launches the ops actually make on a GPU. A dry run calls every public op
on the triton backend with CPU tensors while each ``*_kernel`` in rlhf_kernels/triton is replaced
by a recorder, so the host code chooses its blocks, warps and constexprs as it would on a GPU
(the interpreter's small blocks are off: TRITON_INTERPRET is not set) and nothing is launched.
The sizes swept reach every block cap; the options are varied one at a time at the largest
size. Each recorded configuration is compiled for sm_90 (triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))), once per distinct (kernel, signature, constexprs, warps),
except that a configuration whose block sizes are all at most those of another compiled one
with the same warps, signature and other constexprs is taken as covered by it (registers grow
with the elements a thread holds). Every ``*_kernel`` must be reached by the dry run.

A spill (STL/LDL in the SASS), stack or local memory in any kernel fails the check unless
ALLOWED lists the kernel with its reason.
"""

import argparse
import concurrent.futures
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's rlhf_kernels, not an installed one
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- static_sm90: begin (written by benchmarks/static_sm90.py --write; do not edit by hand) -->"
END = "<!-- static_sm90: end -->"

# kernel name (CUDA: the demangled function name without arguments; Triton: the Python name)
# -> why its spill, stack or local memory is accepted. Empty: no kernel may spill.
ALLOWED = {}


def cuobjdump():
    """The CUDA toolkit's cuobjdump if on PATH, else the one Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def demangle(names):
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def read_cubin(path, arch="sm_90"):
    """{mangled function: dict(regs, stack, shared, local, spill_ops)} for `arch`'s cubins in a
    file (a cubin, an object or a shared library)."""
    tool = cuobjdump()
    res = subprocess.run([tool, "-res-usage", "-arch", arch, str(path)], capture_output=True, text=True, check=True)
    usage, fn = {}, None
    for line in res.stdout.splitlines():
        line = line.strip()
        if line.startswith("Function "):
            fn = line[len("Function "):].rstrip(":")
        m = _RES.search(line)
        if m and fn:
            regs, stack, shared, local = map(int, m.groups())
            usage[fn] = dict(regs=regs, stack=stack, shared=shared, local=local, spill_ops=0)
            fn = None
    if not any(u["stack"] or u["local"] for u in usage.values()):
        return usage  # no local memory at all, so no STL/LDL: skip the (slow) disassembly
    sass = subprocess.run([tool, "-sass", "-arch", arch, str(path)], capture_output=True, text=True, check=True)
    fn = None
    for line in sass.stdout.splitlines():
        s = line.strip()
        if s.startswith("Function : "):
            fn = s[len("Function : "):]
        elif fn in usage and re.search(r"\b(STL|LDL)(\.[A-Z0-9]+)*\s", s):
            usage[fn]["spill_ops"] += 1
    return usage


def extension_path():
    import rlhf_kernels
    found = sorted(Path(rlhf_kernels.__file__).parent.glob("_C*.so"))
    return found[0] if found else None


def _drop_arguments(name):
    """`f<T>(int, g(x))` -> `f<T>`: the text before the parenthesis that closes at the end."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def cuda_rows():
    """Rows of the CUDA C++ kernels, from the built extension's sm_90 cubins."""
    so = extension_path()
    if so is None:
        raise SystemExit("static_sm90: no built extension rlhf_kernels/_C*.so")
    usage = read_cubin(so)
    if not usage:
        raise SystemExit("static_sm90: %s holds no sm_90 cubin (built without CUDA or without arch 9.0)" % so)
    names = demangle(list(usage))
    rows = []
    for mangled, u in usage.items():
        short = names.get(mangled, mangled).replace("(anonymous namespace)::", "")
        short = re.sub(r"^void ", "", _drop_arguments(short)).replace("rlhf::", "")
        rows.append(dict(kind="cuda", kernel=short, config="", **u))
    return sorted(rows, key=lambda r: r["kernel"])


# ---- Triton: the dry run

_TORCH_TYPES = None


def _arg_type(value):
    import torch
    global _TORCH_TYPES
    if _TORCH_TYPES is None:
        _TORCH_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                        torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
                        torch.int64: "i64", torch.bool: "i1"}
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError("static_sm90: cannot type a kernel argument %r" % (value,))


def triton_kernels():
    """{(module name, kernel name): JITFunction} of every ``*_kernel`` in rlhf_kernels/triton."""
    import rlhf_kernels.triton
    from triton.runtime.jit import JITFunction
    found = {}
    for info in pkgutil.iter_modules(rlhf_kernels.triton.__path__):
        module = importlib.import_module("rlhf_kernels.triton." + info.name)
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, JITFunction):
                found[(module.__name__, name)] = value
    return found


def _calls(n, full):
    """The public ops on the triton backend at size n (the dimension their blocks follow), with
    the options varied at the largest n (with `full`, also those that change only the PPO
    combine's weights): (label, function) pairs; each runs forward and backward."""
    import torch

    import rlhf_kernels as rk

    g = torch.Generator().manual_seed(n)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def grad_of(*xs):
        return [x.detach().requires_grad_() for x in xs]

    def backward(out, xs):
        total = sum(o.float().sum() for o in out if isinstance(o, torch.Tensor) and o.requires_grad)
        torch.autograd.grad(total, xs, allow_unused=True)

    def logprobs(dtype=torch.float32):
        (z,) = grad_of(randn(2, n, dtype=dtype))
        zr = randn(2, n, dtype=dtype)
        y = torch.randint(0, n, (2,), generator=g)
        backward(rk.token_logprobs(z, y, return_entropy=True, backend="triton"), [z])
        backward((rk.token_entropy(z, backend="triton"),), [z])
        backward((rk.full_kl(z, zr, backend="triton"),), [z])

    def linear(dtype=torch.float32):
        h, w = grad_of(randn(3, 8, dtype=dtype), randn(n, 8, dtype=dtype))
        y = torch.randint(0, n, (3,), generator=g)
        backward(rk.linear_token_logprobs(h, w, y, return_entropy=True, backend="triton"), [h, w])
        B, T = 1, 3
        h2, w2 = grad_of(randn(B, T, 8, dtype=dtype), randn(n, 8, dtype=dtype))
        lp = -torch.rand(B, T, generator=g)
        loss, _ = rk.linear_policy_loss(h2, w2, torch.randint(0, n, (B, T), generator=g), lp, randn(B, T),
                                        torch.ones(B, T, dtype=torch.bool), ref_logprobs=lp, kl_coef=0.1,
                                        entropy_coef=0.01, backend="triton")
        backward((loss,), [h2, w2])

    def ppo(B, T, **kw):
        (lp,) = grad_of(-torch.rand(B, T, generator=g))
        old, adv, m = lp.detach() + 0.1 * randn(B, T), randn(B, T), torch.rand(B, T, generator=g) < 0.9
        if kw.get("is_correction"):
            kw["rollout_logprobs"] = old + 0.1 * randn(B, T)
        backward((rk.ppo_policy_loss(lp, old, adv, m, backend="triton", **kw)[0],), [lp])

    def value(B, T, **kw):
        (v,) = grad_of(randn(B, T))
        backward((rk.ppo_value_loss(v, randn(B, T), randn(B, T), torch.rand(B, T, generator=g) < 0.9,
                                    backend="triton", **kw)[0],), [v])

    def gae(B, T):
        r, v, m = randn(B, T), randn(B, T), torch.rand(B, T, generator=g) < 0.9
        rk.gae(r, v, m, backend="triton")
        rk.gae_packed(r.view(-1), v.view(-1), torch.tensor([0, B * T // 2, B * T]), mask=m.view(-1),
                      backend="triton")
        rk.masked_whiten(r, m, backend="triton")

    def group(B, group_size, T=3):
        r = randn(B * group_size)
        for mode in ("grpo", "reinforce++"):
            rk.group_advantages(r, group_size=group_size, mode=mode, backend="triton")
        rk.group_advantages(r, torch.randint(0, 5, (B * group_size,), generator=g), mode="rloo", backend="triton")
        rk.group_advantages(r, group_size=group_size, mask=torch.rand(B * group_size, T, generator=g) < 0.5,
                            backend="triton")

    def bt():
        c, r = grad_of(randn(n), randn(n))
        backward((rk.bt_loss(c, r, margin=randn(n), label_smoothing=0.1, backend="triton")[0],), [c, r])
        backward((rk.bt_loss(c, r, backend="triton")[0],), [c, r])
        (x,) = grad_of(randn(n, 4))
        backward((rk.ranking_loss(x, valid=torch.rand(n, 4, generator=g) < 0.8, backend="triton")[0],), [x])
        backward((rk.ranking_loss(x, backend="triton")[0],), [x])

    def score():
        (p,) = grad_of(randn(n))
        backward((rk.score_loss(p, randn(n), backend="triton")[0],), [p])
        for K in (2, 7, 40):  # the threshold tile's width KB: 16, 16, 64
            p, t = grad_of(randn(n), torch.arange(K - 1, dtype=torch.float32) - (K - 1) / 2)
            backward((rk.score_loss(p, torch.randint(0, K, (n,), generator=g), kind="ordinal", thresholds=t,
                                    backend="triton")[0],), [p, t])

    calls = [("logprobs", logprobs), ("linear", linear), ("gae", lambda: gae(2, n)), ("score", score),
             ("group size", lambda: group(2, n)), ("group B", lambda: group(n, 2, T=min(n, 600))), ("bt", bt)]
    # the PPO losses tile T in the row pass and B in the combine: both are swept, and together
    calls += [("ppo %s" % (bt,), lambda bt=bt: ppo(*bt)) for bt in ((2, n), (n, 2), (min(n, 600),) * 2)]
    calls += [("value %s" % (bt,), lambda bt=bt: value(*bt)) for bt in ((2, n), (n, 2), (min(n, 600),) * 2)]
    if n == max(SIZES):  # the options, one at a time, at the largest blocks of both passes
        calls += [("logprobs bf16", lambda: logprobs(torch.bfloat16)), ("linear bf16", lambda: linear(torch.bfloat16))]
        policy = [dict(dual_clip=3.0), dict(ratio_level="sequence"), dict(objective="cispo"),
                  dict(is_correction="tis", is_level="token"), dict(is_correction="mis", is_level="sequence"),
                  dict(is_correction="tis", is_level="geometric", ratio_level="sequence"),
                  dict(objective="cispo", ratio_level="sequence", is_correction="mis", is_level="token")]
        values = [dict(clip=None)]
        if full:  # what changes only the combine's weights: the aggregation and num_tokens
            policy += [dict(num_tokens=100)] + [dict(loss_agg=a) for a in (
                "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")]
            values += [dict(num_tokens=100), dict(loss_agg="seq-mean-token-mean")]
        # T = 600 and 300: the largest row blocks with 8 and with 4 warps (triton/ppo.py _fwd_warps)
        calls += [("ppo %s" % kw, lambda kw=kw, bt=bt: ppo(*bt, **kw)) for kw in policy
                  for bt in ((600, 600), (600, 300))]
        calls += [("value %s" % kw, lambda kw=kw, bt=bt: value(*bt, **kw)) for kw in values
                  for bt in ((600, 600), (600, 300))]
    return calls


SIZES = [1, 2, 3, 6, 12, 17, 40, 100, 200, 300, 600, 1100, 3000]  # every power of two 1..4096 (the largest cap)


def record_launches(full=False):
    """{key: launch} of every distinct launch the dry run makes; key = (module, kernel, signature,
    constexprs, num_warps). Raises if a kernel is never reached."""
    import torch

    from rlhf_kernels import _backend
    from rlhf_kernels.triton import _common

    if _common.INTERPRET:
        raise SystemExit("static_sm90: run without TRITON_INTERPRET=1 (the dry run must choose the GPU's blocks)")
    kernels = triton_kernels()
    launches = {}

    class Recorder:
        def __init__(self, module, name, fn):
            self.module, self.name, self.fn = module, name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                num_warps = kwargs.pop("num_warps", 4)
                kwargs.pop("num_stages", None)
                values = dict(zip(self.fn.arg_names, args))
                values.update(kwargs)
                signature, constexprs = {}, {}
                for p in self.fn.params:
                    if p.is_constexpr:
                        constexprs[p.name] = values[p.name] if p.name in values else p.default
                        signature[p.name] = "constexpr"
                    elif values.get(p.name) is None:
                        signature[p.name] = "constexpr"
                        constexprs[p.name] = None
                    else:
                        signature[p.name] = _arg_type(values[p.name])
                key = (self.module, self.name, tuple(signature.items()),
                       tuple(sorted((k, v) for k, v in constexprs.items() if signature[k] == "constexpr")), num_warps)
                launches.setdefault(key, dict(module=self.module, kernel=self.name, fn=self.fn, signature=signature,
                                              constexprs=constexprs, num_warps=num_warps))
            return launch

    saved = {}
    for (module, name), fn in kernels.items():
        mod = sys.modules[module]
        saved[(mod, name)] = fn
        setattr(mod, name, Recorder(module, name, fn))
    interpret = _backend._interpret
    _backend._interpret = True  # the triton backend takes CPU tensors: nothing is launched
    _backend._picked.clear()
    try:
        for n in SIZES:
            for label, call in _calls(n, full):
                try:
                    call()
                except Exception as e:
                    raise RuntimeError("static_sm90: dry run of %s at n=%d failed: %r" % (label, n, e)) from e
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
        _backend._interpret = interpret
        _backend._picked.clear()
    reached = {(v["module"], v["kernel"]) for v in launches.values()}
    missing = sorted("%s.%s" % k for k in kernels if k not in reached)
    if missing:
        raise SystemExit("static_sm90: the dry run never launched %s: add a call that reaches it" % ", ".join(missing))
    return launches


def _is_block(name):
    return "BLOCK" in name


def dominant(launches):
    """The launches to compile: those not covered by another with the same kernel, signature,
    warps and non-block constexprs and every block constexpr at least as large. Returns
    [(launch, number of launches it covers)]."""
    groups = {}
    for launch in launches.values():
        fixed = tuple(sorted((k, v) for k, v in launch["constexprs"].items() if not _is_block(k)))
        key = (launch["module"], launch["kernel"], tuple(launch["signature"].items()), fixed, launch["num_warps"])
        groups.setdefault(key, []).append(launch)
    out = []
    for members in groups.values():
        def blocks(l):
            return {k: v for k, v in l["constexprs"].items() if _is_block(k)}
        kept = [m for m in members if not any(
            o is not m and blocks(o) != blocks(m) and all(blocks(o)[k] >= v for k, v in blocks(m).items())
            for o in members)]
        for m in kept:
            covered = sum(all(blocks(m)[k] >= v for k, v in blocks(o).items()) for o in members)
            out.append((m, covered))
    return sorted(out, key=lambda mc: (mc[0]["kernel"], str(sorted(mc[0]["constexprs"].items(), key=str))))


def compile_sm90(fn, signature, constexprs, num_warps):
    """(regs, stack, shared, local, spill_ops) of `fn` compiled for sm_90 here (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        usage = read_cubin(path)
    (u,) = usage.values()
    return u


def _by_name(constexprs):
    """constexprs with each jit function argument (a kernel's GRAD, say) as ("jit", module, name): a
    JITFunction does not pickle, and the compile jobs run in other processes."""
    import triton
    return {k: ("jit", v.fn.__module__, v.fn.__name__) if isinstance(v, triton.runtime.JITFunction) else v
            for k, v in constexprs.items()}


def _compile_job(job):
    module, kernel, signature, constexprs, num_warps = job
    fn = getattr(importlib.import_module(module), kernel)
    constexprs = {k: getattr(importlib.import_module(v[1]), v[2]) if isinstance(v, tuple) and v[:1] == ("jit",) else v
                  for k, v in constexprs.items()}
    return compile_sm90(fn, signature, constexprs, num_warps)


def _describe(launch):
    ptrs = sorted({t[1:] for t in launch["signature"].values() if t.startswith("*")})
    parts = ["%s=%s" % (k, v) for k, v in launch["constexprs"].items() if v is not None]
    return "warps=%d, *%s, %s" % (launch["num_warps"], "/".join(ptrs), " ".join(parts))


def triton_rows(jobs, full=False):
    launches = record_launches(full)
    todo = dominant(launches)
    work = [(l["module"], l["kernel"], l["signature"], _by_name(l["constexprs"]), l["num_warps"]) for l, _ in todo]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_job, work))
    else:
        results = [_compile_job(w) for w in work]
    rows = [dict(kind="triton", kernel=l["kernel"], config=_describe(l), covers=c, **u)
            for (l, c), u in zip(todo, results)]
    return rows, len(launches)


# ---- the check and the table

def problems(rows, allowed=None):
    """Rows that spill or use stack or local memory and are not in `allowed` (default ALLOWED)."""
    allowed = ALLOWED if allowed is None else allowed
    return [r for r in rows if (r["spill_ops"] or r["stack"] or r["local"]) and r["kernel"] not in allowed]


def table(rows):
    head = "| kind | kernel | launch (warps, constexprs) | regs | stack B | local B | spill ops | status |"
    lines = [head, "|" + "---|" * 8]
    bad = {id(r) for r in problems(rows)}
    for r in rows:
        status = "SPILLS" if id(r) in bad else ("allowed: " + ALLOWED[r["kernel"]] if r["kernel"] in ALLOWED and (
            r["spill_ops"] or r["stack"] or r["local"]) else "ok")
        config = r["config"]
        if r.get("covers", 1) > 1:
            config += " (covers %d launches)" % r["covers"]
        lines.append("| %s | `%s` | %s | %d | %d | %d | %d | %s |" % (
            r["kind"], r["kernel"], config or "-", r["regs"], r["stack"], r["local"], r["spill_ops"], status))
    return "\n".join(lines)


def write_results(text):
    old = RESULTS.read_text() if RESULTS.exists() else ""
    block = BEGIN + "\n" + text + "\n" + END
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n## Static check of every kernel for sm_90 (no GPU)\n\n" + block + "\n"
    RESULTS.write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the section of benchmarks/RESULTS.md")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel Triton compiles")
    p.add_argument("--only", choices=("cuda", "triton"), help="check one kind of kernel")
    p.add_argument("--full", action="store_true",
                   help="also every loss aggregation and num_tokens of the PPO losses (about 10 more compiles)")
    args = p.parse_args(argv)
    start = time.time()
    rows, recorded = [], 0
    if args.only != "triton":
        rows += cuda_rows()
    if args.only != "cuda":
        triton, recorded = triton_rows(args.jobs, args.full or args.write)
        rows += triton
    import torch
    import triton as triton_module
    seconds = time.time() - start
    text = table(rows)
    bad = problems(rows)
    summary = ("%d kernel builds checked (%d CUDA, %d Triton compiles covering %d distinct Triton launches), "
               "%d spilling beyond the allowed list; torch %s, Triton %s; %.0f s." % (
                   len(rows), sum(r["kind"] == "cuda" for r in rows), sum(r["kind"] == "triton" for r in rows),
                   recorded, len(bad), torch.__version__, triton_module.__version__, seconds))
    print(text)
    print(summary)
    if args.write:
        write_results(
            "Registers per thread, stack and local memory (bytes) and local-memory instructions (STL/LDL, i.e. "
            "spills) of each kernel compiled for sm_90, read without a GPU: CUDA kernels from the extension's "
            "cubins, Triton kernels at the launches the ops make (the largest blocks for each warps and "
            "constexpr set; see the script's docstring). Regenerated by `python benchmarks/static_sm90.py "
            "--write` (the time is that run's: compiles come from Triton's cache when it has them; the CUDA "
            "rows are those of the extension built there).\n\n" + text + "\n\n" + summary)
    for r in bad:
        print("static_sm90: %s %s (%s) spills or uses local memory: %d regs, stack %d, local %d, %d STL/LDL" % (
            r["kind"], r["kernel"], r["config"], r["regs"], r["stack"], r["local"], r["spill_ops"]), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
