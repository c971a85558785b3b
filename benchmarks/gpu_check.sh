#!/usr/bin/env bash
# One command for a GPU machine, within 8 minutes on an H100/H200: build the extension there
# (for the GPU present only, with all cores), run the self-test (python -m rlhf_kernels.selftest:
# every op against its float64 reference, batch invariance, graph capture, no host sync), the CUDA tests, run compute-sanitizer on every
# op once (forward and backward, float32 and bfloat16), run every benchmark family, and leave it
# all in one results folder, with a summary printed last: each stage's status and time, and the
# figures against their targets.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]    # default: benchmarks/results/<gpu>/
#
# The stages run in order of what they prove (build, self-test, CUDA tests, sanitizer, microbenchmarks,
# the policy head, vocabulary parallelism on one GPU, integrations, the whole-PPO-step bench), each
# within what is left of a budget (GPU_CHECK_BUDGET, default 450 s) so that the summary always
# prints inside one 8-minute call; a stage the budget cannot fit is reported as skipped.
# STAGES="ppo_bench" (a space-separated subset, build included when the extension is not yet built
# there) runs only those, e.g. in a second call.
#
# Works offline: wheels for missing Python packages (e.g. Liger-Kernel, cut-cross-entropy)
# found in ./.whl are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

slug=$($PY -c "import torch,re; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-'))") \
  || { echo "gpu_check: no CUDA device visible to torch"; exit 1; }
RES=${1:-benchmarks/results/$slug}
mkdir -p "$RES"
declare -A status seconds

BUDGET=${GPU_CHECK_BUDGET:-450}
STAGES=${STAGES:-build selftest tests_cuda sanitizer benchmarks policy_head vocab_parallel integrations ppo_bench ppo_bench_dist}

# within CAP COMMAND...: run it under a time limit of CAP seconds or what is left of the budget
within() {
  local cap=$1 left=$(( BUDGET - ($(date +%s) - start) )); shift
  (( left < cap )) && cap=$left
  (( cap >= 20 )) || { echo "no time left in the ${BUDGET} s budget"; return 125; }
  timeout --kill-after=10 "$cap" "$@"
}

# stage NAME COMMAND...: run it (if STAGES names it and the budget has room), record its exit
# status and wall time
stage() {
  local name=$1; shift
  [[ " $STAGES " == *" $name "* ]] || return 0
  if (( BUDGET - ($(date +%s) - start) < 20 )); then
    status[$name]=skipped; seconds[$name]=0; echo "== $name: skipped (budget spent)"; return
  fi
  local t0=$(date +%s)
  "$@"
  status[$name]=$?
  seconds[$name]=$(( $(date +%s) - t0 ))
  echo "== $name: rc ${status[$name]} in ${seconds[$name]} s"
}

build() {
  local arch
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) within 240 $PY -m pip install -q --no-build-isolation --no-deps -e . \
    >"$RES/build.log" 2>&1 || { tail -30 "$RES/build.log"; return 1; }
  $PY -m rlhf_kernels.info | tee "$RES/info.txt"
}

# what a user runs after installing: its table kept in selftest.log (under a minute on an H100)
selftest() {
  within 120 $PY -m rlhf_kernels.selftest 2>&1 | tee "$RES/selftest.log" | grep -E "^FAIL |checks, "
  return "${PIPESTATUS[0]}"
}

cuda_tests() {
  local xdist=()
  $PY -c "import xdist" 2>/dev/null && xdist=(-n auto)
  within 180 $PY -m pytest -q -m cuda tests -p no:cacheprovider "${xdist[@]}" 2>&1 | tee "$RES/tests_cuda.log" | tail -15
  return "${PIPESTATUS[0]}"
}

sanitize() {
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not installed"; return 1; }
  local rc=0 tool
  for tool in memcheck racecheck synccheck; do
    within 60 compute-sanitizer --tool $tool --error-exitcode 99 $PY benchmarks/sanitize_ops.py >"$RES/sanitizer_$tool.log" 2>&1 \
      || rc=1
    tail -2 "$RES/sanitizer_$tool.log"
  done
  return $rc
}

benchmarks() {  # every family but the policy head, vocab_parallel and the integrations (their own stages below)
  local fams=() f
  for f in benchmarks/bench_*.py; do
    f=${f#benchmarks/bench_}; f=${f%.py}
    [ "$f" = policy_head ] || [ "$f" = vocab_parallel ] || [ "$f" = integrations ] || fams+=(--family "$f")
  done
  within 200 $PY benchmarks/run.py --device cuda --out "$RES" --timeout 120 "${fams[@]}" 2>&1 | tee "$RES/bench.log" | tail -25
  return "${PIPESTATUS[0]}"
}

# A whole PPO step, kernels off vs on (Qwen2.5-0.5B shape, bf16, 8x4 responses of 1024 tokens):
# ppo_step.{md,csv,png} with the step, memory and largest-micro-batch targets. Its rollouts
# (HF generate, 1024 tokens each) are most of its time: 2 measured steps per mode, an estimated
# 3-4 minutes (not yet measured on a GPU): it runs last, in what is left of the budget, or alone
# in a second call (STAGES=ppo_bench).
ppo_bench() {
  within 540 $PY -m rlhf_trainer bench --device cuda --steps 2 --warmup 1 --out "$RES" 2>&1 | tee "$RES/ppo_step.log" | tail -12
  return "${PIPESTATUS[0]}"
}

# the policy head's GPU targets: linear_policy_loss against the unfused path, Liger and
# cut-cross-entropy (when installed), linear_token_logprobs with and without gradients against the
# bare matmul (bench_policy_head.py, bf16 N=16384 H=4096 V=131072), and token_logprobs' forward
# against its one-read floor at the second shape of its targets (8192 x 151936; bench_logprobs.py in the
# benchmarks stage has 16384 x 152064)
policy_head() {
  local rc
  within 150 $PY benchmarks/run.py --device cuda --out "$RES" --timeout 150 --family policy_head >"$RES/bench_policy_head.log" 2>&1
  rc=$?
  grep -E "target|MET|MISSED|FAILED" "$RES/bench_policy_head.log"
  within 60 $PY benchmarks/bench_logprobs.py --device cuda --N 8192 --V 151936 --providers cuda,triton \
    --csv "$RES/logprobs_8192x151936.csv" >"$RES/logprobs_8192x151936.md" 2>&1 || rc=1
  grep -E "target" "$RES/logprobs_8192x151936.md"
  return $rc
}

# vocabulary parallelism on one GPU: per-rank kernel time of token_logprobs and linear_policy_loss
# on the V/TP slice (V = 151936, N = 16384, H = 4096, bf16) at TP = 1, 2, 4, 8, the collective
# excluded (a fake process group of TP ranks in this one process; bench_vocab_parallel.py)
vocab_parallel() {
  within 120 $PY benchmarks/bench_vocab_parallel.py --device cuda --csv "$RES/vocab_parallel.csv" 2>&1 \
    | tee "$RES/vocab_parallel.md" | tail -25
  return "${PIPESTATUS[0]}"
}

stage build build
stage selftest selftest
stage tests_cuda cuda_tests
stage sanitizer sanitize
stage benchmarks benchmarks
stage policy_head policy_head
stage vocab_parallel vocab_parallel

# rlhf_kernels.integrations: each library's replaced functions against ours (patched), one
# realistic shape each, CUDA-event medians (benchmarks/bench_integrations.py). The libraries come
# from the environment or from wheels in ./.whl (benchmarks/RESULTS.md lists them); one that does
# not import is reported as skipped, with the reason, in integrations.log.
integrations() {
  within 90 $PY benchmarks/bench_integrations.py --device cuda --csv "$RES/integrations.csv" 2>&1 \
    | tee "$RES/integrations.log" | tail -70
  return "${PIPESTATUS[0]}"
}
stage integrations integrations
stage ppo_bench ppo_bench

# The whole PPO step data-parallel (torchrun, FSDP2, kernels on), one process per visible GPU:
# tokens/s over all ranks and each rank's peak memory (ppo_step_dist.json). Only when more than
# one GPU is visible; on one GPU it reports itself skipped.
ppo_bench_dist() {
  local n
  n=$($PY -c "import torch; print(torch.cuda.device_count())")
  if (( n < 2 )); then echo "ppo_bench_dist: $n GPU visible, needs 2 or more: skipped"; return 0; fi
  within 540 $PY -m torch.distributed.run --nproc_per_node="$n" -m rlhf_trainer bench --device cuda --steps 2 \
    --warmup 1 --out "$RES" 2>&1 | tee "$RES/ppo_step_dist.log" | tail -8
  return "${PIPESTATUS[0]}"
}
stage ppo_bench_dist ppo_bench_dist

echo
echo "### gpu_check summary ($RES, $(( $(date +%s) - start )) s in all)"
for k in $STAGES; do
  case "${status[$k]:-}" in
    0) printf "  %-12s ok in %s s\n" "$k" "${seconds[$k]}" ;;
    skipped) printf "  %-12s skipped: the %s s budget was spent (run it alone: STAGES=%s)\n" "$k" "$BUDGET" "$k" ;;
    124|137) printf "  %-12s TIMED OUT after %s s\n" "$k" "${seconds[$k]}" ;;
    *) printf "  %-12s FAILED (rc %s) in %s s\n" "$k" "${status[$k]:-?}" "${seconds[$k]:-0}" ;;
  esac
done
grep -s "checks, " "$RES/selftest.log" | sed 's/^/selftest: /'
grep -sE "passed|failed" "$RES/tests_cuda.log" | tail -1
echo "figures against their targets (benchmarks/RESULTS.md):"
grep -hE "\b(met|MET|MISSED)\b|target" "$RES"/*.md 2>/dev/null | grep -v "^|.*---" | head -40
