"""Autograd keyed by the op schemas (csrc/autograd/derivatives.cpp): each differentiable forward
op's backward op takes every argument from the forward's inputs and outputs by name, so an
argument added to both schemas needs no autograd edit, and one renamed in only one schema fails
here (and at the op's first call) instead of reaching a kernel."""

import os
import re

import pytest
import torch

from rlhf_kernels import _ext
from rlhf_kernels._schemas import SCHEMAS
from rlhf_kernels.ops.ppo import _policy_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "csrc", "autograd", "derivatives.cpp")
ENTRY = re.compile(r'^\s*\{"(\w+)", "(\w+)", \{([^}]*)\}, \{([^}]*)\}\},\s*$', re.M)
GRAD_ENTRY = re.compile(r'^\s*\{"(\w+)", "(\w+)", \{([^}]*)\}, "(\w+)", "(\w+)"\},\s*$', re.M)
TENSOR = torch._C.OptionalType.ofTensor()

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="native extension not built")


def _names(s):
    return tuple(re.findall(r'"(\w+)"', s))


def derivatives():
    """kDerivatives, read from its source: [(forward, backward, inputs, outputs)]."""
    with open(TABLE) as f:
        return [(fwd, bwd, _names(i), _names(o)) for fwd, bwd, i, o in ENTRY.findall(f.read())]


def forward_gradients():
    """kForwardGradients, read from its source: [(forward, with_grads, inputs, output, function)]."""
    with open(TABLE) as f:
        return [(fwd, wg, _names(i), o, fn) for fwd, wg, i, o, fn in GRAD_ENTRY.findall(f.read())]


def parse(op, schema):
    return torch._C.parse_schema("rlhf_kernels::%s%s" % (op, schema))


def resolve(fwd_op, fwd_schema, bwd_op, bwd_schema, inputs, outputs):
    """Where each argument of the backward op comes from, by the C++ kernel's rules:
    [(argument, "grad" | "input" | "output" | "default")]; ValueError naming both ops and the
    argument when one comes from nowhere."""
    fwd, bwd = parse(fwd_op, fwd_schema), parse(bwd_op, bwd_schema)
    both = "%s -> %s" % (fwd_op, bwd_op)
    ins = {a.name: a for a in fwd.arguments}
    outs = {r.name: r for r in fwd.returns}
    for name in inputs:
        if name not in ins or not ins[name].type.isSubtypeOf(TENSOR):
            raise ValueError("%s: the differentiable input %r is not a tensor argument" % (both, name))
    for name in outputs:
        if name not in outs:
            raise ValueError("%s: the differentiable output %r is not a named return" % (both, name))
    if len(bwd.returns) != len(inputs):
        raise ValueError("%s: %d returns for %d differentiable inputs" % (both, len(bwd.returns), len(inputs)))
    plan = []
    for a in bwd.arguments:
        if a.name in ins and a.name in outs:
            raise ValueError("%s: %r names both an input and an output" % (both, a.name))
        if a.name == "grad" or a.name.startswith("grad_"):
            ok = len(outputs) == 1 if a.name == "grad" else a.name[5:] in outputs
            if not ok or not a.type.isSubtypeOf(TENSOR):
                raise ValueError("%s: %r is no upstream gradient" % (both, a.name))
            plan.append((a.name, "grad"))
        elif a.name.startswith("need_") and a.name not in ins and a.name not in outs:
            if a.name[5:] not in inputs or str(a.type) != "bool":
                raise ValueError("%s: %r is not bool need_<a differentiable input>" % (both, a.name))
            plan.append((a.name, "need"))
        elif a.name in ins or a.name in outs:
            src = ins.get(a.name) or outs[a.name]
            if not src.type.isSubtypeOf(a.type):
                raise ValueError("%s: %r is %s in the forward but %s in the backward" % (both, a.name, src.type,
                                                                                         a.type))
            plan.append((a.name, "input" if a.name in ins else "output"))
        elif a.has_default_value():
            plan.append((a.name, "default"))
        else:
            raise ValueError("%s: %s's argument %r is no input or output of %s and has no default"
                             % (both, bwd_op, a.name, fwd_op))
    return plan


def resolve_with_grads(fwd_op, fwd_schema, wg_op, wg_schema, inputs, output):
    """The forward-made gradients' rules: every argument of the op that makes them is the
    forward's (each of which it takes) or need_<input>; it returns the forward's outputs and
    d_<input>. ValueError naming both ops and the argument otherwise."""
    fwd, wg = parse(fwd_op, fwd_schema), parse(wg_op, wg_schema)
    both = "%s -> %s" % (fwd_op, wg_op)
    ins = {a.name: a for a in fwd.arguments}
    returns = [r.name for r in wg.returns]
    for name in inputs:
        if name not in ins or not ins[name].type.isSubtypeOf(TENSOR) or "d_" + name not in returns:
            raise ValueError("%s: %r is not a tensor argument with a d_%s return" % (both, name, name))
    missing = [r.name for r in fwd.returns if r.name not in returns] + ([] if output in ins or output in
                                                                          [r.name for r in fwd.returns] else [output])
    if missing:
        raise ValueError("%s: outputs %s are not returned" % (both, missing))
    taken = set()
    for a in wg.arguments:
        if a.name in ins:
            if not ins[a.name].type.isSubtypeOf(a.type):
                raise ValueError("%s: %r changes type" % (both, a.name))
            taken.add(a.name)
        elif not (a.name.startswith("need_") and a.name[5:] in inputs and str(a.type) == "bool"):
            raise ValueError("%s: %s's argument %r is no argument of %s nor bool need_<a differentiable input>"
                             % (both, wg_op, a.name, fwd_op))
    if taken != set(ins):
        raise ValueError("%s: %s's arguments %s are no arguments of %s" % (both, fwd_op, sorted(set(ins) - taken),
                                                                           wg_op))


def test_the_tables_are_read_and_name_the_ppo_and_linear_ops():
    table, grads = derivatives(), forward_gradients()
    forwards = [row[0] for row in table + grads]
    assert len(forwards) == len(set(forwards))
    assert {"ppo_policy_fwd", "ppo_policy_options_fwd", "ppo_value_fwd", "linear_policy_fwd"} <= set(forwards)
    with open(TABLE) as f:  # every entry line parsed: none skipped by the patterns
        assert f.read().count('_fwd", "') == len(forwards)


def test_every_forward_gradient_op_takes_the_forward_arguments():
    for fwd, wg, inputs, output, _ in forward_gradients():
        resolve_with_grads(fwd, SCHEMAS[fwd], wg, SCHEMAS[wg], inputs, output)
    fwd, wg = SCHEMAS["linear_policy_fwd"], SCHEMAS["linear_policy_fwd_grad"]
    with pytest.raises(ValueError, match="argument 'is_cap_c' is no argument of linear_policy_fwd"):
        resolve_with_grads("linear_policy_fwd", fwd, "linear_policy_fwd_grad", wg.replace("is_cap", "is_cap_c"),
                           ("hidden", "weight", "bias"), "loss")
    with pytest.raises(ValueError, match=r"linear_policy_fwd's arguments \['tile'\] are no arguments"):
        resolve_with_grads("linear_policy_fwd", fwd, "linear_policy_fwd_grad", wg.replace(" int tile,", ""),
                           ("hidden", "weight", "bias"), "loss")


def test_every_backward_argument_comes_from_its_forward_checked_in_schemas():
    """On the checked-in schema table (itself checked against the registry by test_signatures)."""
    for fwd, bwd, inputs, outputs in derivatives():
        plan = resolve(fwd, SCHEMAS[fwd], bwd, SCHEMAS[bwd], inputs, outputs)
        assert [name for name, _ in plan] == [a.name for a in parse(bwd, SCHEMAS[bwd]).arguments]


@needs_ext
def test_every_backward_argument_comes_from_its_forward_registered_schemas():
    schema = lambda op: str(getattr(torch.ops.rlhf_kernels, op).default._schema).partition(op)[2]  # noqa: E731
    for fwd, bwd, inputs, outputs in derivatives():
        resolve(fwd, schema(fwd), bwd, schema(bwd), inputs, outputs)
    for fwd, wg, inputs, output, _ in forward_gradients():
        resolve_with_grads(fwd, schema(fwd), wg, schema(wg), inputs, output)


def test_the_ppo_plans():
    """The plain loss takes the backward's defaults for the options; the options op passes its own."""
    plan = dict(resolve("ppo_policy_fwd", SCHEMAS["ppo_policy_fwd"], "ppo_policy_bwd", SCHEMAS["ppo_policy_bwd"],
                        ("logprobs",), ("loss",)))
    assert plan["grad"] == "grad" and plan["row_scale"] == "output" and plan["clip_high"] == "input"
    assert [plan[k] for k in ("rollout_logprobs", "options", "is_cap")] == ["default"] * 3
    plan = dict(resolve("ppo_policy_options_fwd", SCHEMAS["ppo_policy_options_fwd"], "ppo_policy_bwd",
                        SCHEMAS["ppo_policy_bwd"], ("logprobs",), ("loss",)))
    assert "default" not in plan.values()


def test_an_argument_renamed_in_one_schema_fails():
    fwd, bwd = SCHEMAS["ppo_policy_options_fwd"], SCHEMAS["ppo_policy_bwd"]
    renamed = bwd.replace("float? dual_clip", "float? dual_clip_c")
    assert renamed != bwd
    with pytest.raises(ValueError, match="ppo_policy_options_fwd -> ppo_policy_bwd: ppo_policy_bwd's argument "
                                         "'dual_clip_c' is no input or output"):
        resolve("ppo_policy_options_fwd", fwd, "ppo_policy_bwd", renamed, ("logprobs",), ("loss",))
    unnamed = SCHEMAS["ppo_value_fwd"].replace("Tensor row_scale)", "Tensor)")
    with pytest.raises(ValueError, match="'row_scale' is no input or output of ppo_value_fwd"):
        resolve("ppo_value_fwd", unnamed, "ppo_value_bwd", SCHEMAS["ppo_value_bwd"], ("values",), ("loss",))
    retyped = bwd.replace("float clip_low", "int clip_low")
    with pytest.raises(ValueError, match="'clip_low' is float in the forward but int"):
        resolve("ppo_policy_options_fwd", fwd, "ppo_policy_bwd", retyped, ("logprobs",), ("loss",))


# ---- the kernel itself: the backward op called with the forward's own arguments ----

def _ppo_inputs(gen, B=3, T=7):
    lp = torch.randn(B, T, generator=gen, dtype=torch.float32)
    olp = lp + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True
    return lp, olp, adv, mask


@needs_ext
def test_policy_gradient_is_the_backward_op_on_the_forward_arguments():
    """Bitwise: autograd's gradient is ppo_policy_bwd called with the forward's arguments and
    row_scale, for the plain op (backward defaults) and the options op (its own options)."""
    ops = torch.ops.rlhf_kernels
    gen = torch.Generator().manual_seed(11)
    lp, olp, adv, mask = _ppo_inputs(gen)
    roll = olp + 0.2 * torch.randn(lp.shape, generator=gen)
    up = torch.randn((), generator=gen)
    options = _policy_options("test", "sequence", "ppo", "tis", "token")
    assert options != 0
    cases = [(ops.ppo_policy_fwd, (None, None, 0.2, 0.28, 3.0, 1), ()),
             (ops.ppo_policy_options_fwd, (None, 5.0, 0.2, None, None, 0, roll, options, 1.5), (roll, options, 1.5))]
    for op, rest, opts in cases:
        x = lp.clone().requires_grad_()
        loss, stats, row_scale = op(x, olp, adv, mask, *rest)
        assert loss.requires_grad and not stats.requires_grad and not row_scale.requires_grad
        g, = torch.autograd.grad(loss, x, up)
        want = ops.ppo_policy_bwd(up, lp, olp, adv, mask, row_scale, rest[2], rest[3], rest[4], *opts)
        assert torch.equal(g, want)
        assert g.abs().sum() > 0


@needs_ext
def test_value_bt_and_ranking_gradients_are_their_backward_ops():
    ops = torch.ops.rlhf_kernels
    gen = torch.Generator().manual_seed(12)
    v, ov, ret, mask = _ppo_inputs(gen)
    x = v.clone().requires_grad_()
    loss, _, row_scale = ops.ppo_value_fwd(x, ov, ret, mask, None, None, 0.2, 1)
    g, = torch.autograd.grad(2.5 * loss, x)
    assert torch.equal(g, ops.ppo_value_bwd(torch.tensor(2.5), v, ov, ret, mask, row_scale, 0.2))
    c, r, m = (torch.randn(5, generator=gen) for _ in range(3))
    cc, rr = c.clone().requires_grad_(), r.clone().requires_grad_()
    loss, _ = ops.bt_fwd(cc, rr, m, 0.1, 0.01)
    gc, gr = torch.autograd.grad(loss, (cc, rr))
    wc, wr = ops.bt_bwd(torch.tensor(1.0), c, r, m, 0.1, 0.01)
    assert torch.equal(gc, wc) and torch.equal(gr, wr)
    rr = r.clone().requires_grad_()  # only one of the two inputs wants a gradient
    loss, _ = ops.bt_fwd(c, rr, None, 0.0, 0.0)
    gr, = torch.autograd.grad(loss, rr)
    assert torch.equal(gr, ops.bt_bwd(torch.tensor(1.0), c, r, None, 0.0, 0.0)[1])
    rewards = torch.randn(4, 3, generator=gen)
    valid = torch.rand(4, 3, generator=gen) > 0.2
    x = rewards.clone().requires_grad_()
    loss, _, scale = ops.ranking_fwd(x, valid)
    g, = torch.autograd.grad(loss, x)
    assert torch.equal(g, ops.ranking_bwd(torch.tensor(1.0), rewards, valid, scale))


@needs_ext
def test_no_node_without_a_gradient_to_record():
    ops = torch.ops.rlhf_kernels
    lp, olp, adv, mask = _ppo_inputs(torch.Generator().manual_seed(13))
    olp.requires_grad_()  # a constant input: no node for it
    assert ops.ppo_policy_fwd(lp, olp, adv, mask, None, None, 0.2, None, None, 0)[0].grad_fn is None
    with torch.no_grad():
        assert ops.ppo_policy_fwd(lp.requires_grad_(), olp, adv, mask, None, None, 0.2, None, None, 0)[0].grad_fn \
            is None


@needs_ext
def test_saved_tensors_are_version_checked_and_freed_after_backward():
    ops = torch.ops.rlhf_kernels
    lp, olp, adv, mask = _ppo_inputs(torch.Generator().manual_seed(14))
    x = lp.clone().requires_grad_()
    loss = ops.ppo_policy_fwd(x, olp, adv, mask, None, None, 0.2, None, None, 0)[0]
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    loss = ops.ppo_policy_fwd(x, olp, adv, mask, None, None, 0.2, None, None, 0)[0]
    adv.add_(1.0)  # a saved input modified after the forward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_ext
def test_an_unused_output_gives_no_gradient():
    """An undefined upstream gradient (a later op returned None for the loss) gives none."""

    class Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    ops = torch.ops.rlhf_kernels
    lp, olp, adv, mask = _ppo_inputs(torch.Generator().manual_seed(15))
    x = lp.clone().requires_grad_()
    loss = ops.ppo_policy_fwd(x, olp, adv, mask, None, None, 0.2, None, None, 0)[0]
    (Drop.apply(loss) + (3.0 * x).sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


@needs_ext
def test_linear_gradients_are_their_ops():
    """linear_token_logprobs: the backward op with both upstream gradients, the need_ flags and
    the saved entropy output; linear_policy_loss: the forward's own gradients times the upstream."""
    ops = torch.ops.rlhf_kernels
    gen = torch.Generator().manual_seed(16)
    h, w, b = torch.randn(2, 3, 8, generator=gen), torch.randn(11, 8, generator=gen), torch.randn(11, generator=gen)
    y = torch.randint(0, 11, (2, 3), generator=gen)
    gl, ge = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent, stats = ops.linear_logprobs_fwd(hh, ww, b, y, 0.7, -100, 0, True)
    assert not stats.requires_grad and b.grad is None
    dh, = torch.autograd.grad((logp, ent), hh, (gl, ge), retain_graph=True)  # weight not asked: not computed
    want = ops.linear_logprobs_bwd(h, w, b, y, gl, ge, stats, ent.detach(), 0.7, -100, 0, True, False, False)
    assert torch.equal(dh, want[0])
    dh, dw = torch.autograd.grad(logp, (hh, ww), gl)  # no entropy gradient: grad_entropy None
    want = ops.linear_logprobs_bwd(h, w, b, y, gl, None, stats, ent.detach(), 0.7, -100, 0, True, True, False)
    assert torch.equal(dh, want[0]) and torch.equal(dw, want[1])

    old, adv = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    mask = torch.rand(2, 3, generator=gen) > 0.2
    rest = (old, adv, mask, None, None, None, 1.0, 0.0, "k3", 0.01, 0.2, None, None, 0, None, 0, None, 0, True)
    hh, bb = h.clone().requires_grad_(), b.clone().requires_grad_()
    loss, stats, logprobs = ops.linear_policy_fwd(hh, w, bb, y, *rest)
    assert loss.grad_fn.name() == "linear_policy_fwdBackward" and not logprobs.requires_grad
    up = torch.tensor(-1.75)
    dh, db = torch.autograd.grad(loss, (hh, bb), up)
    want = ops.linear_policy_fwd_grad(h, w, b, y, *rest, True, False, True)
    assert torch.equal(loss.detach(), want[0]) and torch.equal(dh, want[3] * up) and torch.equal(db, want[5] * up)
    with pytest.raises(RuntimeError, match="linear_policy_loss: a second backward through the same call"):
        torch.autograd.grad(loss, hh)
