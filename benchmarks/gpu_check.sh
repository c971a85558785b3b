#!/usr/bin/env bash
# One command for a GPU machine: build the extension there, run the CUDA tests, run
# compute-sanitizer (memcheck, racecheck) on a small CUDA subset, run every benchmark,
# and leave it all in one results folder, with a summary printed last.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]    # default: benchmarks/results/<gpu>/
#
# Works offline: wheels for missing Python packages (e.g. Liger-Kernel,
# cut-cross-entropy) found in ./.whl are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

slug=$($PY -c "import torch,re; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-'))") \
  || { echo "gpu_check: no CUDA device visible to torch"; exit 1; }
RES=${1:-benchmarks/results/$slug}
mkdir -p "$RES"
declare -A status

t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation --no-deps -e . >"$RES/build.log" 2>&1
status[build]=$?
$PY -m rlhf_kernels.info | tee "$RES/info.txt"
echo "build: $(( $(date +%s) - t0 )) s (rc ${status[build]})"

$PY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$RES/tests_cuda.log" | tail -15
status[tests_cuda]=${PIPESTATUS[0]}

if command -v compute-sanitizer >/dev/null; then
  # a few small cases of every CUDA kernel (gae, logprobs, linear_logprobs, ppo, bt), float32
  # where a test has dtypes; -x stops at the first failure
  cases=(
    "gae_matches_reference and 4-37 and 0.99 and cuda-cuda"
    "test_masked_whiten and shape1 and cuda-cuda"
    "packed and cuda-cuda"
    "test_cuda_gae_packed_ragged or test_cuda_runs_are_bitwise_identical or test_cuda_masked_whiten_sizes"
    "test_token_logprobs_matches_float64 and float32 and cuda-cuda"
    "test_full_kl and float32 and cuda-cuda"
    "test_logprobs and test_inplace_backward and cuda-cuda"
    "linear_logprobs and test_matches_float64 and float32 and cuda-cuda"
    "linear_logprobs and test_temperature_batch_dims and cuda-cuda"
    "test_policy_matches_reference and moderate and cuda-cuda"
    "test_value_matches_reference and cuda-cuda"
    "test_ppo and test_many_rows and cuda-cuda"
    "test_bt_matches_reference and moderate and cuda-cuda"
    "test_ranking_matches_reference and cuda-cuda"
    "test_cuda_graphs and test_cuda_graph_capture and (ppo or bt_loss or token_logprobs)"
  )
  subset=$(printf " or (%s)" "${cases[@]}"); subset=${subset# or }
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests -k "$subset" \
      >"$RES/sanitizer_$tool.log" 2>&1
    status[sanitizer_$tool]=$?
    tail -3 "$RES/sanitizer_$tool.log"
  done
else
  status[sanitizer]="not installed"
fi

$PY benchmarks/run.py --device cuda --out "$RES" 2>&1 | tee "$RES/bench.log" | tail -40
status[benchmarks]=${PIPESTATUS[0]}

echo
echo "### gpu_check summary ($RES, $(( $(date +%s) - t0 )) s)"
for k in "${!status[@]}"; do echo "  $k: ${status[$k]}"; done | sort
grep -E "passed|failed" "$RES/tests_cuda.log" | tail -1
