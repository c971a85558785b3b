"""Each op's signature, stated once, and the forms derived from it.

The source is the operator schema in csrc/bindings.cpp (``m.def``): the dispatcher checks
every C++ kernel and typed call against it when the library loads or the call is first made.
From it come:

- ``rlhf_kernels/_schemas.py``, the schemas as the built extension registers them, written by
  ``python -m rlhf_kernels._signatures --write`` and checked against the registry by
  tests/test_signatures.py, so the Triton ops can be registered without the compiled
  extension;
- each Triton op's schema (``triton_schema``): the Triton op ``triton_<op>`` takes the native
  op's arguments minus those it declares it drops (checks done in Python before the call,
  e.g. ``validate``), with the optional ones it declares ``required`` taken resolved;
- the fake kernels (torch.compile, opcheck) of both: one output-shape function per op, in
  the op's family file rlhf_kernels/ops/<family>.py (``@shape(op)``, kept in ``SHAPES``),
  called with the arguments by name, so the native op and its Triton twin share it whatever
  arguments the Triton one drops.
"""

import math
import sys

import torch

from rlhf_kernels._schemas import SCHEMAS

NAMESPACE = "rlhf_kernels"


# ---- schemas ----

def split_schema(schema):
    """``"(A a, B b=1) -> R"`` -> (["A a", "B b=1"], "R"). No argument type of ours holds a comma."""
    args, sep, returns = schema.partition(") -> ")
    if not sep or not args.startswith("("):
        raise ValueError("not an operator schema: %r" % (schema,))
    args = args[1:]
    return ([a.strip() for a in args.split(",")] if args.strip() else []), returns


def arg_names(schema):
    """The argument names of a schema, in order."""
    return [a.split("=")[0].split()[-1] for a in split_schema(schema)[0]]


def triton_schema(op, drop=(), required=()):
    """The schema of ``triton_<op>``: ``op``'s (from _schemas.py) without the arguments in
    ``drop``, with those in ``required`` (optional in ``op``) not optional, and without
    defaults (the op layer passes every argument of a Triton op, by position). Raises
    ValueError for a name the schema does not have, or a ``required`` one that is not
    optional: a Triton op cannot silently drift from its native op."""
    args, returns = split_schema(SCHEMAS[op])
    names = arg_names(SCHEMAS[op])
    for n in tuple(drop) + tuple(required):
        if n not in names:
            raise ValueError("Triton op triton_%s: %r is not an argument of %s%s" % (op, n, op, SCHEMAS[op]))
    out = []
    for a, n in zip(args, names):
        if n in drop:
            continue
        typ = a.split()[0]
        if n in required:
            if not typ.endswith("?"):
                raise ValueError("Triton op triton_%s: %r is not optional in %s%s" % (op, n, op, SCHEMAS[op]))
            typ = typ[:-1]
        out.append("%s %s" % (typ, n))
    return "(%s) -> %s" % (", ".join(out), returns)


def registered():
    """{op: schema without the namespace} of every native op the loaded extension registers."""
    out = {}
    for full in torch._C._dispatch_get_all_op_names():
        ns, _, name = full.partition("::")
        if ns == NAMESPACE and not name.startswith("triton_"):
            out[name] = str(getattr(torch.ops.rlhf_kernels, name).default._schema)[len(full):]
    return out


# ---- output shapes: one function per op, for the native and the Triton fake alike ----

SHAPES = {}  # native op -> its output-shape function, filled by ``shape`` in rlhf_kernels/ops/<family>.py


def shape(*ops):
    """Decorator: ``fn`` gives the outputs (empty tensors of the right shapes and dtypes) of the
    native ops ``ops``, called with their arguments by name (it names those it reads and takes
    the rest as ``**_``). Registers it as each op's fake kernel when the loaded extension has
    the op (one built before an op existed lacks it; the op layer then serves that op in
    Python); the Triton twins take it from ``SHAPES`` when they are made."""
    def register(fn):
        from rlhf_kernels import _ext
        for op in ops:
            SHAPES[op] = fn
            if _ext.loaded() and hasattr(torch.ops.rlhf_kernels, op):
                torch.library.register_fake("%s::%s" % (NAMESPACE, op))(fake(op, SCHEMAS[op]))
        return fn
    return register


def f32(x, shape):
    """An empty float32 tensor of ``shape`` on ``x``'s device."""
    return x.new_empty(shape, dtype=torch.float32)


def rows_f32(x, *cols):
    """float32 [N, *cols] for the N = numel / shape[-1] rows of ``x``."""
    return f32(x, (math.prod(x.shape[:-1]),) + cols)


def loss_outputs(x, n_stats):
    """(loss [], stats [n_stats], row_scale [B]) float32: the outputs of the ppo forwards."""
    return f32(x, ()), f32(x, (n_stats,)), f32(x, (x.shape[0],))


def grads_like(hidden, weight, need_hidden, need_weight, need_bias):
    """d_hidden, d_weight, d_bias in the input dtype, a [0] tensor of its own (outputs never
    alias) where not asked for."""
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            hidden.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty((weight.shape[0] if need_bias else 0,)))


def fake(op, schema):
    """The fake kernel of an op registered with ``schema`` whose outputs are ``op``'s: the
    positional arguments named by ``schema``, passed to ``SHAPES[op]`` by name."""
    shape, names = SHAPES[op], arg_names(schema)

    def fake_kernel(*args, **kwargs):
        named = dict(zip(names, args))
        named.update(kwargs)
        return shape(**named)

    fake_kernel.__name__ = fake_kernel.__qualname__ = op + "_fake"
    return fake_kernel


# ---- the generated table ----

def _wrapped(op, schema, width=116):
    """``"op": "schema",`` as Python source lines of at most ``width`` characters, split
    after an argument's comma (implicit string concatenation)."""
    lines, line = [], '    "%s": "' % op
    for piece in schema.replace(", ", ",\0 ").split("\0"):
        if len(line) + len(piece) + 1 > width and not line.endswith('"'):
            lines.append(line + '"')
            line = '        "'
        line += piece
    lines.append(line + '",')
    return lines


def render(schemas):
    """The text of rlhf_kernels/_schemas.py for ``schemas`` ({op: schema})."""
    head = ['"""The native ops\' schemas, as the extension built from csrc/bindings.cpp registers them.',
            "",
            "Generated by `python -m rlhf_kernels._signatures --write` (with the extension built): do not",
            "edit; change the op's m.def in csrc/bindings.cpp, rebuild, and run the command again.",
            "tests/test_signatures.py fails while this table and the built extension disagree.",
            '"""',
            "",
            "SCHEMAS = {"]
    body = [line for op in sorted(schemas) for line in _wrapped(op, schemas[op])]
    return "\n".join(head + body + ["}", ""])


def main(argv):
    import os

    from rlhf_kernels import _ext
    if not _ext.loaded():
        sys.exit("the native extension is not built: build it first (the table is read from its registry)")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_schemas.py")
    text = render(registered())
    if "--write" in argv:
        with open(path, "w") as f:
            f.write(text)
        print("wrote", path)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
