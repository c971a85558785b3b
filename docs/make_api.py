"""Writes the reference half of docs/api.md from the code: every public op's signature and
docstring, and the backend helpers'. ``python docs/make_api.py`` rewrites docs/api.md below its
marker line (the overview above it is written by hand); ``--check`` changes nothing and exits 1
when the file is stale (tests/test_docs.py runs it), so the reference cannot drift from the code.
"""

import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
API_MD = os.path.join(HERE, "api.md")
MARKER = "<!-- generated below by `python docs/make_api.py` from the docstrings: do not edit by hand -->"


def render():
    sys.path.insert(0, os.path.dirname(HERE))
    import rlhf_kernels as rk
    out = [MARKER, "", "## Reference (from the docstrings)", ""]
    for name in rk.__all__:
        obj = getattr(rk, name)
        if not callable(obj) or isinstance(obj, type) and not issubclass(obj, BaseException):
            continue
        if isinstance(obj, type):
            head = "class rk.%s" % name
        else:
            head = "rk.%s%s" % (name, inspect.signature(obj))
        out += ["### `%s`" % name, "", "```text", head, ""]
        out += [("    " + line).rstrip() for line in inspect.cleandoc(obj.__doc__ or "(no docstring)").splitlines()]
        out += ["```", ""]
    return "\n".join(out)


def current():
    with open(API_MD) as f:
        text = f.read()
    if MARKER not in text:
        raise SystemExit("docs/make_api.py: %s has no marker line %r" % (API_MD, MARKER))
    return text


def main(argv):
    text = current()
    new = text[:text.index(MARKER)] + render()
    if "--check" in argv:
        if new != text:
            print("docs/api.md is stale: run `python docs/make_api.py`")
            return 1
        return 0
    with open(API_MD, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
