"""The documentation stays true to the code: docs/api.md's reference is what docs/make_api.py
makes from the docstrings now, the README stays a short front door, and every relative link in
the README and docs/ names a file that exists."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_is_generated_from_the_docstrings():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_api.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_api_reference_check_fails_on_a_stale_file(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import make_api
    finally:
        sys.path.remove(os.path.join(ROOT, "docs"))
    with open(make_api.API_MD) as f:
        text = f.read()
    stale = tmp_path / "api.md"
    stale.write_text(text.replace("Advantages and returns for a padded batch.", "Advantages for a batch."))
    monkeypatch.setattr(make_api, "API_MD", str(stale))
    assert make_api.main(["--check"]) == 1
    stale.write_text(text)
    assert make_api.main(["--check"]) == 0


def test_readme_is_a_short_front_door():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) < 300, len(lines)


DOCS = ["README.md", "benchmarks/RESULTS.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_name_existing_files(doc):
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0]))
        if not os.path.exists(path):
            missing.append(target)
    assert not missing, missing
