"""What the three integrations share: the patch machinery (find a library's call sites of a
function, swap them, restore them, refuse unknown signatures), the one-time fall-through
warning, and the small conversions every replacement needs (masks, dtypes, loss aggregation).

How ``patch()`` finds the call sites. Each replacement names where the library defines the
original (``"trl.trainer.utils:selective_log_softmax"``, or a class attribute such as
``"openrlhf.models.loss:PolicyLoss.forward"``). The original object is resolved once and kept.
Then
  - a function is swapped wherever a loaded module of the library holds that very object: as
    a module attribute (the defining module, and every module that did ``from x import f``),
    or as a value of a module-level dict (registries such as verl's POLICY_LOSS_REGISTRY);
  - a class attribute (a method, or an autograd Function's ``apply``) is set on the class
    itself, which every instance and every reference to the class sees.
``unpatch()`` puts each original back where it swapped it, and scans the library's modules
again for the replacement objects (a module imported while patched copied ours by name).
Modules outside the library (your own ``from trl... import f``) are not touched.
"""

import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

logger = logging.getLogger("rlhf_kernels.integrations")

def extra(library):
    """The pip command that installs ``library`` with its dependencies, at a supported version."""
    return "pip install 'rlhf-kernels[integrations-%s]'" % library

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class UnsupportedVersion(RuntimeError):
    """The installed library's functions do not have the signatures the replacements implement."""


class FallThroughWarning(UserWarning):
    """A replacement met an option it does not implement and called the library's own function."""


# ---- fall-through -------------------------------------------------------------------------

_warned = set()
_warn_lock = threading.Lock()


def warn_fallthrough(library, function, reason):
    """Warn once per (library, function, reason) that such calls go to the library's function."""
    key = (library, function, reason)
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn("rlhf_kernels.integrations.%s.%s: %s; such calls run %s's own function (warned once)"
                  % (library, function, reason, library), FallThroughWarning, stacklevel=4)


# ---- signatures ---------------------------------------------------------------------------

def plain_signature(fn):
    """``fn``'s parameters as text, without annotations: "(logits, index, temperature=1.0)"."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


# ---- the patch machinery -------------------------------------------------------------------

@dataclass(frozen=True)
class Replacement:
    """One function of the library and ours.

    target: "module:attr" or "module:Class.attr", where the library defines the original.
    function: ours. For a class attribute it is set on the class as it is (a plain function
        becomes a method), or wrapped in staticmethod when ``static``.
    signature: the supported signature of ``check`` (default: the target), as plain_signature
        writes it.
    """
    target: str
    function: Callable
    signature: str
    check: Optional[str] = None
    static: bool = False

    @property
    def name(self):
        return self.target.split(":")[1]


_MISSING = object()


class Integration:
    """The replacements for one library, and its patch state."""

    def __init__(self, library, requirement, tested_version, replacements):
        self.library = library                    # the top-level module: "trl"
        self.requirement = requirement            # what pip installs: "trl>=1.16,<1.17"
        self.distribution = re.split(r"[<>=!~ ;\[]", requirement)[0]  # the PyPI name: "trl"
        self.tested_version = tested_version
        self.replacements = list(replacements)
        self._by_name = {r.name: r for r in self.replacements}
        self._by_target = {r.target: r for r in self.replacements}
        self._originals = {}                      # target -> the library's object, as patch() found it
        self._applied = None                      # list of swaps while patched, else None
        self._lock = threading.RLock()

    # -- originals

    def _resolve(self, path):
        module_name, attr = path.split(":")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def original(self, target):
        """The library's own object for ``target``: what the library holds there now, or, where
        that is ours (patched), the object patch() swapped out."""
        try:
            obj = self._resolve(target)
        except ImportError as e:
            raise ImportError("%s is needed for this call (%s): `%s` (%s)" % (self.library, target, extra(self.library),
                                                                             e)) from e
        return self._originals[target] if obj is self._by_target[target].function else obj

    def call_original(self, function, *args, **kwargs):
        """Call the library's ``function`` (a replacement's name, e.g. "PolicyLoss.forward")."""
        return self.original(self._by_name[function].target)(*args, **kwargs)

    def fall_through(self, function, reason, *args, **kwargs):
        """Warn once, then call the library's own ``function``."""
        warn_fallthrough(self.library, function, reason)
        return self.call_original(function, *args, **kwargs)

    # -- patch / unpatch

    def version(self):
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def patch(self):
        with self._lock:
            if self._applied is not None:
                logger.warning("rlhf_kernels.integrations.%s: already patched; this patch() is a no-op (leaving its "
                               "`with` block does not unpatch)", self.library)
                return PatchHandle(self, owner=False, replaced={})
            try:
                importlib.import_module(self.library)
            except ImportError as e:
                raise ImportError("rlhf_kernels.integrations.%s.patch(): %s is not installed or does not import "
                                  "(%s). Install it with its dependencies: `%s` (%s, the versions whose signatures "
                                  "patch() supports); tests/install_integrations.sh installs only the modules the "
                                  "tests use."
                                  % (self.library, self.library, e, extra(self.library), self.requirement)) from e
            found, skipped = self._check()
            self._originals.update({r.target: orig for r, orig in found.items()})
            applied, replaced = [], {}
            for r in found:
                if "." in r.name:  # a class attribute: set on the class
                    applied.append(self._set_class_attr(r))
                    replaced[r.name] = 1
            functions = {id(orig): (r, orig) for r, orig in found.items() if "." not in r.name}
            for container, key, orig, r in self._scan(functions):
                container[key] = r.function
                applied.append(("item", container, key, orig, r.function))
                replaced[r.name] = replaced.get(r.name, 0) + 1
            self._applied = applied
            version = self.version()
            note = "" if version == self.tested_version else " (tested with %s; the signatures match)" % self.tested_version
            logger.info("rlhf_kernels.integrations.%s: patched %s %s%s: %s%s", self.library, self.library, version,
                        note, ", ".join("%s (%d)" % kv for kv in replaced.items()),
                        "; not patched, their modules do not import here: %s" % "; ".join(
                            "%s (%s)" % kv for kv in skipped.items()) if skipped else "")
            return PatchHandle(self, owner=True, replaced=replaced, skipped=skipped)

    def _check(self):
        """({replacement: the library's object}, {name: why skipped}) for the replacements whose
        module imports here; raises UnsupportedVersion, naming every difference, if a signature
        differs from the supported one or a function is missing."""
        found, skipped, mismatched = {}, {}, []
        for r in self.replacements:
            modules = {r.target.split(":")[0], (r.check or r.target).split(":")[0]}
            try:
                for name in modules:
                    importlib.import_module(name)
            except Exception as e:  # a module needing an optional dependency: the library can't use it either
                skipped[r.name] = "%s: %s: %s" % (r.target.split(":")[0], type(e).__name__, e)
                continue
            try:
                orig = self._resolve(r.target)
                sig = plain_signature(orig if r.check is None else self._resolve(r.check))
            except AttributeError:
                mismatched.append("  %s: not found" % (r.check or r.target))
                continue
            if sig != r.signature:
                mismatched.append("  %s\n    supported %s\n    found     %s" % (r.check or r.target, r.signature, sig))
            found[r] = orig
        if mismatched:
            raise UnsupportedVersion(
                "rlhf_kernels.integrations.%s.patch(): %s %s has functions whose signatures differ from the ones "
                "the replacements implement (tested with %s %s); nothing was patched:\n%s"
                % (self.library, self.library, self.version(), self.library, self.tested_version,
                   "\n".join(mismatched)))
        return found, skipped

    def _set_class_attr(self, r):
        module_name, attr = r.target.split(":")
        *owner_path, name = attr.split(".")
        cls = self._resolve(module_name + ":" + ".".join(owner_path))
        raw = cls.__dict__.get(name, _MISSING)
        new = staticmethod(r.function) if r.static else r.function
        setattr(cls, name, new)
        return ("class", cls, name, raw, new)

    def _library_modules(self):
        prefix = self.library + "."
        return [m for name, m in list(sys.modules.items())
                if m is not None and (name == self.library or name.startswith(prefix))]

    def _scan(self, objects):
        """(container, key, object, payload) for every module attribute, and every value of a
        module-level dict, of the library's loaded modules that is one of ``objects``
        ({id(obj): (payload, obj)})."""
        hits = []
        for module in self._library_modules():
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for key, value in list(namespace.items()):
                hit = objects.get(id(value))
                if hit is not None and hit[1] is value:
                    hits.append((namespace, key, value, hit[0]))
                elif type(value) is dict:
                    for k, v in list(value.items()):
                        hit = objects.get(id(v))
                        if hit is not None and hit[1] is v:
                            hits.append((value, k, v, hit[0]))
        return hits

    def unpatch(self):
        with self._lock:
            if self._applied is None:
                logger.info("rlhf_kernels.integrations.%s: not patched; unpatch() is a no-op", self.library)
                return False
            restored = 0
            for kind, container, key, orig, new in reversed(self._applied):
                if kind == "class":
                    if container.__dict__.get(key, _MISSING) is not new:
                        logger.warning("rlhf_kernels.integrations.%s: %s.%s was changed by someone else since "
                                       "patch(); left as it is", self.library, container.__name__, key)
                        continue
                    if orig is _MISSING:
                        delattr(container, key)
                    else:
                        setattr(container, key, orig)
                elif container.get(key) is new:
                    container[key] = orig
                else:
                    logger.warning("rlhf_kernels.integrations.%s: %r was changed by someone else since patch(); "
                                   "left as it is", self.library, key)
                    continue
                restored += 1
            # modules imported while patched hold our functions by name: give them the originals
            ours = {id(r.function): (self._originals[r.target], r.function) for r in self.replacements
                    if "." not in r.name and r.target in self._originals}
            for container, key, _, orig in self._scan(ours):
                container[key] = orig
                restored += 1
            self._applied = None
            logger.info("rlhf_kernels.integrations.%s: unpatched; %d call sites restored", self.library, restored)
            return True

    def is_patched(self):
        return self._applied is not None


class PatchHandle:
    """What ``patch()`` returns. The patch is already applied; as a context manager, leaving the
    ``with`` block unpatches (a handle from a patch() that was a no-op leaves it patched).

    replaced: {function name: number of call sites swapped}. skipped: {function name: why}.
    """

    def __init__(self, integration, owner, replaced, skipped=None):
        self.integration = integration
        self.owner = owner
        self.replaced = replaced
        self.skipped = skipped or {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.owner:
            self.integration.unpatch()
        return False

    def __repr__(self):
        return "<rlhf_kernels.integrations.%s patch: %s>" % (
            self.integration.library, ", ".join(self.replaced) if self.owner else "no-op (already patched)")


# ---- conversions the replacements share -----------------------------------------------------

def kernel_dtype(t):
    return t.dtype in KERNEL_DTYPES


def never_label(labels):
    """An ignore_index that no real label takes: the most negative value of the labels' dtype
    (the libraries' own gathers raise on a negative label; ours does too, as a ValueError)."""
    return torch.iinfo(labels.dtype).min if not labels.dtype.is_floating_point else -100


def as_bool_mask(mask):
    """(bool mask, exact): ``mask != 0``, and whether that loses nothing. The libraries multiply
    by their masks, so a mask holding values other than 0 and 1 weights the tokens; our ops do
    not weight. A bool mask is exact; for another dtype, ``exact`` is a 0-d bool tensor the
    caller reads (one host sync on a GPU, folded into a read the library makes anyway where
    there is one)."""
    if mask.dtype == torch.bool:
        return mask, None
    return mask != 0, ((mask == 0) | (mask == 1)).all()


def unit_interval(x):
    """x as a float if it is a real number (or a one-element tensor) in [0, 1], else None."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if 0.0 <= x <= 1.0 else None


def rows_with_tokens(mask):
    """Number of rows of a [B, T] bool mask with at least one true entry, as a 0-d float tensor."""
    return mask.any(-1).sum(dtype=torch.float32)


def clamp_log_ratio(logprobs, old_logprobs, bound=20.0):
    """``logprobs`` where |logprobs - old_logprobs| <= bound, else old_logprobs + the log ratio
    clamped to +-bound (with zero gradient there): feeding this to ppo_policy_loss gives the ratio
    exp(clamp(log_ratio, -bound, bound)) that verl's and OpenRLHF's PPO losses use."""
    log_ratio = logprobs - old_logprobs
    return torch.where(log_ratio.abs() <= bound, logprobs, old_logprobs + log_ratio.clamp(-bound, bound))
