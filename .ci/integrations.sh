#!/usr/bin/env bash
# CI stage: rlhf_kernels.integrations against the installed TRL, verl and OpenRLHF.
# The libraries go into a virtual environment layered on the one CI runs in
# (build/integrations-venv, --system-site-packages plus the parent's site-packages when python3
# is itself a venv): it sees torch, transformers and the project built by `make test`, and the
# main environment is left as it was. tests/install_integrations.sh installs each library with a
# time limit (STEP_TIMEOUT s): one whose install fails or runs out of time is reported with its
# reason and its tests skip, saying so (-rs). Then the integration tests, the end-to-end TRL
# GRPO proof among them, run there; a failing test fails CI. Both times are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=build/integrations-venv
start=$(date +%s)
"$PY" -m venv --clear --system-site-packages "$VENV"
purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# a venv made from a venv sees the base interpreter's packages, not its parent's: add those
"$PY" - "$purelib/_integrations_parent_site.pth" <<'PTH'
import site, sys
if sys.prefix != sys.base_prefix:
    with open(sys.argv[1], "w") as f:
        f.write("import site; " + "; ".join("site.addsitedir(%r)" % p for p in site.getsitepackages()) + "\n")
PTH
STEP_TIMEOUT=${STEP_TIMEOUT:-240} PYTHON="$VENV/bin/python" bash tests/install_integrations.sh
installed=$(date +%s)
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/test_integrations_*.py
echo "ci: integrations: install $(( installed - start )) s, tests $(( $(date +%s) - installed )) s"
