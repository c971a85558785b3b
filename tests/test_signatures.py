"""One signature per op: the native schemas (csrc/bindings.cpp) are the source, and every other
form, the checked-in table, the Triton ops' schemas and Python functions, the fake kernels, is
derived from it or fails here when it disagrees."""

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

from rlhf_kernels import _ext, _signatures
from rlhf_kernels._schemas import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_FAMILIES = ("bt", "gae", "group_advantages", "linear_logprobs", "linear_policy", "logprobs", "ppo", "score")


def _triton_ops():
    """{native op: the Triton Op} of every Triton module (imports triton)."""
    pytest.importorskip("triton")
    from rlhf_kernels.triton._op import Op
    out = {}
    for family in TRITON_FAMILIES:
        module = importlib.import_module("rlhf_kernels.triton." + family)
        for value in vars(module).values():
            if isinstance(value, Op):
                out[value.name] = value
    return out


def test_schema_table_is_the_registry():
    """_schemas.py holds exactly what the built extension registers, in the generator's format."""
    if not _ext.loaded():
        pytest.skip("native extension not built")
    registered = _signatures.registered()
    differ = sorted(set(registered) ^ set(SCHEMAS) | {op for op in registered if registered[op] != SCHEMAS.get(op)})
    assert not differ, ("rlhf_kernels/_schemas.py disagrees with the built extension on %s: run "
                        "`python -m rlhf_kernels._signatures --write`" % differ)
    with open(os.path.join(ROOT, "rlhf_kernels", "_schemas.py")) as f:
        assert f.read() == _signatures.render(registered)


def test_every_op_has_one_output_shape_function_over_its_own_arguments():
    assert set(_signatures.SHAPES) == set(SCHEMAS)
    for op, shape in _signatures.SHAPES.items():
        names = _signatures.arg_names(SCHEMAS[op])
        params = inspect.signature(shape).parameters.values()
        named = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        assert set(named) <= set(names), (op, named, names)


def test_fake_binds_arguments_by_name_positional_keyword_or_defaulted():
    """The native ppo_policy_bwd has defaulted trailing arguments: the fake takes them either way."""
    x = torch.randn(3, 4)
    fake = _signatures.fake("ppo_policy_bwd", SCHEMAS["ppo_policy_bwd"])
    args = (torch.tensor(1.0), x, x, x, x > 0, torch.ones(3), 0.2, None, None)
    for out in (fake(*args), fake(*args, None, 0, None), fake(*args[:1], logprobs=x.double())):
        assert out.shape == (3, 4) and out.dtype == torch.float32


def test_triton_schema_is_the_native_one_less_what_it_declares():
    native = SCHEMAS["ppo_policy_bwd"]
    assert native.endswith("Tensor? rollout_logprobs=None, int options=0, float? is_cap=None) -> Tensor")
    derived = _signatures.triton_schema("ppo_policy_bwd", required=("clip_high", "is_cap"))
    assert derived == ("(Tensor grad, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
                       "Tensor row_scale, float clip_low, float clip_high, float? dual_clip, "
                       "Tensor? rollout_logprobs, int options, float is_cap) -> Tensor")
    assert "validate" not in _signatures.triton_schema("score_fwd", drop=("validate",))
    with pytest.raises(ValueError, match="'nope' is not an argument of ppo_value_fwd"):
        _signatures.triton_schema("ppo_value_fwd", drop=("nope",))
    with pytest.raises(ValueError, match="'clip_low' is not optional"):
        _signatures.triton_schema("ppo_policy_bwd", required=("clip_low",))


def test_every_triton_op_twins_a_native_op_and_takes_its_arguments():
    """Each Triton op is registered as triton_<native op> with the derived schema, and its
    Python function takes exactly that schema's arguments: a native argument added without
    the Triton function taking it (or dropping it explicitly) fails here, not on a GPU."""
    ops = _triton_ops()
    assert len(ops) >= 20
    for name, op in ops.items():
        assert name in SCHEMAS, name
        schema = str(getattr(torch.ops.rlhf_kernels, "triton_" + name).default._schema)
        names = _signatures.arg_names(schema[schema.index("("):])
        assert names == [n for n in _signatures.arg_names(SCHEMAS[name]) if n in names], name
        params = list(inspect.signature(op.fn).parameters.values())
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params), name
        assert len(params) == len(names), (name, [p.name for p in params], names)


def test_triton_ops_register_without_the_extension():
    """The Triton ops take their schemas from the checked-in table, so they work where the
    native extension is not built."""
    pytest.importorskip("triton")
    code = ("import sys\n"
            "sys.modules['rlhf_kernels._C'] = None\n"
            "import torch\n"
            "from rlhf_kernels import _ext\n"
            "from rlhf_kernels.triton import ppo, linear_policy\n"
            "assert not _ext.loaded()\n"
            "print(torch.ops.rlhf_kernels.triton_ppo_policy_options_fwd.default._schema)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "triton_ppo_policy_options_fwd(Tensor logprobs," in p.stdout
    assert "float clip_high, float? dual_clip, int loss_agg, Tensor? rollout_logprobs, int options, float is_cap)" \
        in p.stdout
