#!/usr/bin/env bash
# Install TRL, verl, OpenRLHF and megatron-core for tests/test_integrations_*.py, the way the tests need them:
# only their pure-PyTorch modules, without their heavy dependencies (vLLM, flash-attn, DeepSpeed,
# wandb, ...), and never touching the installed torch, transformers or numpy (a constraints file
# pins them to what is installed). Run it after torch and the project are installed (make install).
#
#   bash tests/install_integrations.sh          # PYTHON=python3 by default
#
#   TRL       trl==1.16.0 with its dependencies (accelerate, datasets, pandas, pyarrow, ...): the
#             end-to-end test runs TRL's own GRPOTrainer.
#   verl      verl==0.9.1 --no-deps, plus what verl.utils.torch_functional and
#             verl.trainer.ppo.core_algos import: ray, omegaconf, codetiming, and tensordict (--no-deps;
#             its compiled part is not used) with pyvers. verl itself pins transformers<5.11, which
#             --no-deps ignores: the modules tested do not depend on it.
#   megatron  megatron-core==0.16.1 --no-deps: megatron.core.tensor_parallel imports and runs on a CPU
#             with gloo without its optional dependencies (Transformer Engine, Apex); it also lets
#             verl.utils.megatron.tensor_parallel import.
#   OpenRLHF  openrlhf==0.11.2 --no-deps: its package imports flash-attn (a CUDA build) and DeepSpeed;
#             the tests load openrlhf/models/utils.py and loss.py without the package's __init__
#             (tests/test_integrations_kit.py says how).
#
# Each library is one step with a time limit; a step that fails or runs out of time prints why and
# the script goes on (exit status 0): that library's tests then skip, saying the library does not
# import. The three libraries cannot be installed together *with* their dependencies (openrlhf pins
# transformers==5.15.0, verl needs transformers<5.11), hence --no-deps for verl and OpenRLHF.
# verl's and OpenRLHF's wheels also install their own test suites as a top-level `tests` package,
# which would shadow this repository's tests/: the script removes those files (see below).
# Measured on the project's 2-core machine: 45 s in all with pip's cache empty.
set -uo pipefail
PYTHON=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
cd "$(dirname "$0")/.."

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "install_integrations: torch is not installed; install the project first (make install). Skipping."
  exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" - "$constraints" <<'EOF'
import importlib.metadata as md, sys
with open(sys.argv[1], "w") as f:
    for name in ("torch", "transformers", "numpy", "triton"):
        try:
            f.write("%s==%s\n" % (name, md.version(name)))
        except md.PackageNotFoundError:
            pass
EOF
echo "install_integrations: keeping $(tr '\n' ' ' < "$constraints")"

pip_install() {
  timeout "$STEP_TIMEOUT" "$PYTHON" -m pip install -q --disable-pip-version-check -c "$constraints" "$@"
}

step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$(date +%s)
  if "$@"; then
    echo "install_integrations: $name installed in $(( $(date +%s) - start )) s"
  else
    echo "install_integrations: $name NOT installed (exit $?, after $(( $(date +%s) - start )) s); its tests will skip"
  fi
}

install_trl() { pip_install "trl==1.16.0"; }
install_verl() {
  echo "install_integrations: verl --no-deps: pip's notes below on verl's missing requirements are expected"
  pip_install --no-deps "verl==0.9.1" "tensordict==0.10.0" "pyvers" &&
    pip_install "ray" "omegaconf" "codetiming"
}
install_openrlhf() { pip_install --no-deps "openrlhf==0.11.2"; }
install_megatron() { pip_install --no-deps "megatron-core==0.16.1"; }

# verl's and OpenRLHF's wheels put their own test suites into site-packages as a top-level `tests`
# package (verl also a `scripts` one). A regular package named `tests` on sys.path shadows this
# repository's tests/ folder (`from tests.conftest import ...` fails): remove the files those two
# distributions installed there, then the folders left empty.
remove_stray_packages() {
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, os, shutil
tops = {}
for dist in ("verl", "openrlhf"):
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        continue
    for f in d.files or []:
        if f.parts and f.parts[0] in ("tests", "scripts"):
            tops.setdefault(str(d.locate_file(f.parts[0])), set()).add(dist)
            if os.path.isfile(str(f.locate())):
                os.remove(str(f.locate()))
for top, dists in tops.items():
    for root, _, _ in os.walk(top, topdown=False):
        if os.path.basename(root) == "__pycache__":
            shutil.rmtree(root)
        elif not os.listdir(root):
            os.rmdir(root)
    print("install_integrations: removed the top-level %r package that %s installed%s"
          % (os.path.basename(top), " and ".join(sorted(dists)), " (other files kept)" if os.path.exists(top) else ""))
EOF
}

total=$(date +%s)
step "trl 1.16.0" install_trl
step "verl 0.9.1" install_verl
step "openrlhf 0.11.2" install_openrlhf
step "megatron-core 0.16.1" install_megatron
remove_stray_packages
"$PYTHON" - <<'EOF'
import importlib
for module in ("trl.trainer.grpo_trainer", "verl.trainer.ppo.core_algos", "verl.utils.torch_functional",
               "megatron.core.tensor_parallel", "verl.utils.megatron.tensor_parallel"):
    try:
        importlib.import_module(module)
        print("install_integrations: %s imports" % module)
    except Exception as e:
        print("install_integrations: %s does not import: %s: %s" % (module, type(e).__name__, e))
EOF
echo "install_integrations: done in $(( $(date +%s) - total )) s"
