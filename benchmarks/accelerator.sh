#!/usr/bin/env bash
# One command on an accelerator machine (one GPU), at most 8 minutes, nothing installed beyond the
# project's extras:
#
#   bash benchmarks/accelerator.sh
#
# 1. the step-cost benchmark on a ResNet-18-sized convnet (widths 64-128-256-512, 2 blocks per stage,
#    GroupNorm, ~11.2M params) at batch 256 on synthetic 32x32x3 data: base, SAM, optax.contrib.sam,
#    WSAM, GSAM, ASAM, ESAM (and SWP / SDS alone), LookSAM (lax.cond, host-chosen, reuse step alone),
#    m-sharpness chunks (m = B/8 and B/4, default / vmap / unroll), with compile times, XLA's memory
#    analysis and the device's peak memory (memory_stats) -> benchmarks/results/step_cost_<backend>.json
#    (written even when a later stage fails; a stage cut by its timeout gets SIGINT first, and the
#    benchmark then saves the rounds it has timed);
# 2. its markdown table -> benchmarks/results/step_cost_<backend>.md (benchmarks/summarize.py);
# 3. the test suite's fast tier on the device (SAM_OPTAX_TEST_ON_DEVICE=1: no forced CPU platform,
#    the 8-device tests skipped) -> benchmarks/results/accelerator_tests.txt.
# Every stage has a timeout, cut to what is left of the 8 minutes; a log of the stages goes to
# benchmarks/results/accelerator_log.txt. Exit status: 0 when every stage passed, else 1.
#
# SAM_OPTAX_ACCEL_SMOKE=1: a tiny run to check the script anywhere (convnet widths 8-16, batch 16,
# 2 rounds, only tests/test_benchmarking.py), written to SAM_OPTAX_ACCEL_OUT (default: a new
# temporary folder) instead of benchmarks/results.

set -u
cd "$(dirname "$0")/.."
TOTAL=${SAM_OPTAX_ACCEL_SECONDS:-470}  # the whole script, seconds (8 minutes, less a margin)
SMOKE=${SAM_OPTAX_ACCEL_SMOKE:-0}
PY=${PYTHON:-python}
if [ "$SMOKE" != "0" ]; then
  OUT=${SAM_OPTAX_ACCEL_OUT:-$(mktemp -d)}
  BENCH=(--models convnet --convnet-widths 8 16 --convnet-blocks 1 --batch-size 16 --rounds 2
         --steps-per-round 1 --max-seconds 60)
  TESTS=(tests/test_benchmarking.py)
  BENCH_S=150; TEST_S=90
else
  OUT=${SAM_OPTAX_ACCEL_OUT:-benchmarks/results}
  BENCH=(--models convnet --convnet-widths 64 128 256 512 --convnet-blocks 2 --batch-size 256 --rounds 20
         --steps-per-round 10 --max-seconds 230)
  TESTS=(tests/test_two_pass.py tests/test_rules.py tests/test_benchmarking.py)
  BENCH_S=280; TEST_S=110
fi
mkdir -p "$OUT"
LOG="$OUT/accelerator_log.txt"
: > "$LOG"
FAILED=0

stage() {  # stage NAME SECONDS CMD...: runs CMD under timeout (SIGINT, then KILL 30 s later), logs its status
  local name=$1 want=$2; shift 2
  local left=$((TOTAL - SECONDS - 50))  # the 30 s grace after SIGINT and a margin
  local limit=$(( want < left ? want : left ))
  if [ "$limit" -lt 10 ]; then
    echo "$name: skipped (no time left)" | tee -a "$LOG"; FAILED=1; return 1
  fi
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$@"
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED=1
  return "$rc"
}

if ! timeout 60 "$PY" -c "import sam_optax" 2>/dev/null; then
  stage install 120 "$PY" -m pip install -q -e ".[test]"
fi
BACKEND=$(timeout 90 "$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -1)
BACKEND=${BACKEND:-unknown}
echo "backend: $BACKEND; output: $OUT" | tee -a "$LOG"
"$PY" -c "import jax; print(jax.devices())" 2>&1 | tail -1 | tee -a "$LOG"

stage bench "$BENCH_S" "$PY" -m sam_optax.benchmarking "${BENCH[@]}" --threads all --out "$OUT"
JSON="$OUT/step_cost_$BACKEND.json"
if [ -f "$JSON" ]; then
  stage summarize 60 "$PY" benchmarks/summarize.py "$JSON" --out "$OUT/step_cost_$BACKEND.md"
else
  echo "summarize: no $JSON" | tee -a "$LOG"; FAILED=1
fi

SAM_OPTAX_TEST_ON_DEVICE=1 stage tests "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
  > "$OUT/accelerator_tests.txt" 2>&1
tail -3 "$OUT/accelerator_tests.txt" | tee -a "$LOG"

echo "total: $SECONDS s; $([ $FAILED -eq 0 ] && echo 'every stage passed' || echo 'some stage failed')" | tee -a "$LOG"
exit $FAILED
