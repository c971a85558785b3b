"""The patch machinery of rlhf_kernels.integrations (rlhf_kernels/integrations/_common.py), on a
small fake library, and the errors of the real patch() functions."""

import logging
import os
import re
import sys
import types

import pytest

import rlhf_kernels.integrations.openrlhf as rk_openrlhf
import rlhf_kernels.integrations.trl as rk_trl
import rlhf_kernels.integrations.verl as rk_verl
from rlhf_kernels.integrations import UnsupportedVersion, extra
from rlhf_kernels.integrations._common import Integration, Replacement


def theirs_f(x, y=1):
    return ("theirs", x, y)


def ours_f(x, y=1):
    return ("ours", x, y)


def ours_m(self, x):
    return ("ours", x)


@pytest.fixture
def fake(monkeypatch):
    """rkfake: rkfake.core defines f and class C (method m); rkfake.user did `from rkfake.core
    import f`; rkfake.registry keeps f in a dict, as verl's registries do."""
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    class C:
        def m(self, x):
            return ("theirs", x)

    pkg = module("rkfake")
    pkg.__path__ = []
    core = module("rkfake.core", f=theirs_f, C=C)
    user = module("rkfake.user", f=theirs_f, g=len)
    registry = module("rkfake.registry", REGISTRY={"f": theirs_f, "other": print})
    integration = Integration("rkfake", "rkfake", "1.0", [
        Replacement("rkfake.core:f", ours_f, "(x, y=1)"),
        Replacement("rkfake.core:C.m", ours_m, "(self, x)"),
    ])
    return types.SimpleNamespace(core=core, user=user, registry=registry, C=C, integration=integration,
                                 module=module)


def test_patch_and_unpatch_every_call_site(fake):
    handle = fake.integration.patch()  # as a call
    assert fake.core.f is ours_f and fake.user.f is ours_f and fake.registry.REGISTRY["f"] is ours_f
    assert fake.registry.REGISTRY["other"] is print and fake.user.g is len
    assert fake.C().m(3) == ("ours", 3)
    assert handle.replaced == {"C.m": 1, "f": 3}
    late = fake.module("rkfake.late", f=fake.core.f)  # imported while patched: holds ours by name
    assert fake.integration.unpatch() is True
    assert fake.core.f is theirs_f and fake.user.f is theirs_f and fake.registry.REGISTRY["f"] is theirs_f
    assert late.f is theirs_f
    assert fake.C().m(3) == ("theirs", 3) and "m" in fake.C.__dict__
    assert fake.integration.unpatch() is False  # no-op, logged


def test_context_manager_second_patch_is_noop_and_logs_once(fake, caplog):
    caplog.set_level(logging.INFO, logger="rlhf_kernels.integrations")
    with fake.integration.patch() as outer:
        assert [r.getMessage() for r in caplog.records if "patched rkfake" in r.getMessage()] == \
            ["rlhf_kernels.integrations.rkfake: patched rkfake unknown (tested with 1.0; the signatures match): "
             "C.m (1), f (3)"]
        with fake.integration.patch() as inner:
            assert not inner.owner and inner.replaced == {}
        assert fake.core.f is ours_f  # the inner no-op handle did not unpatch
        assert [r.levelno for r in caplog.records if "already patched" in r.getMessage()] == [logging.WARNING]
        assert outer.owner
    assert fake.core.f is theirs_f and not fake.integration.is_patched()


def test_signature_mismatch_refuses_and_patches_nothing(fake):
    def f(x, y=2):
        return x
    fake.core.f = fake.user.f = f
    with pytest.raises(UnsupportedVersion, match=r"rkfake unknown .*\n  rkfake.core:f\n    supported \(x, y=1\)\n"
                                                 r"    found     \(x, y=2\)"):
        fake.integration.patch()
    assert fake.core.f is f and fake.C().m(1) == ("theirs", 1) and not fake.integration.is_patched()


def test_a_module_that_does_not_import_is_skipped(fake):
    integration = Integration("rkfake", "rkfake", "1.0", fake.integration.replacements + [
        Replacement("rkfake.needs_ray:h", ours_f, "(x, y=1)")])
    with integration.patch() as handle:
        assert "h" in handle.skipped and "rkfake.needs_ray" in handle.skipped["h"]
        assert fake.core.f is ours_f


@pytest.mark.parametrize("integration,library", [(rk_trl, "trl"), (rk_verl, "verl"), (rk_openrlhf, "openrlhf")])
def test_library_not_installed(monkeypatch, integration, library):
    monkeypatch.setitem(sys.modules, library, None)  # makes `import library` raise ImportError
    with pytest.raises(ImportError, match=r"%s is not installed.*%s" % (library, re.escape(extra(library)))):
        integration.patch()
    assert not integration.is_patched()


def test_real_library_with_a_changed_signature_is_refused(monkeypatch):
    tu = pytest.importorskip("trl.trainer.utils", reason="trl not installed (tests/install_integrations.sh)")

    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None, chunk=None):
        raise AssertionError("never called")
    monkeypatch.setattr(tu, "selective_log_softmax", selective_log_softmax)
    with pytest.raises(UnsupportedVersion, match=r"trl %s has functions whose signatures differ" %
                       rk_trl._TRL.version().replace(".", r"\.")):
        rk_trl.patch()
    assert tu.selective_log_softmax is selective_log_softmax and not rk_trl.is_patched()


@pytest.mark.parametrize("integration,title,attr", [(rk_trl, "TRL", "_TRL"), (rk_verl, "verl", "_VERL"),
                                                    (rk_openrlhf, "OpenRLHF", "_OPENRLHF")])
def test_readme_counts_what_patch_replaces(integration, title, attr):
    """README's "Use in your trainer" gives the number of replaced functions per library, and
    docs/integrations.md too: both equal the replacements patch() installs."""
    root = os.path.join(os.path.dirname(__file__), "..")
    count = len(getattr(integration, attr).replacements)
    version = integration.TESTED_VERSION
    with open(os.path.join(root, "README.md")) as f:
        assert "**%s %s: %d functions.**" % (title, version, count) in f.read()
    with open(os.path.join(root, "docs", "integrations.md")) as f:
        assert "### %s (tested: %s %s): %d functions replaced" % (title, title.lower(), version, count) in f.read()
