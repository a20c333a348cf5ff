#!/usr/bin/env bash
# The whole GPU run: gpu tests, then every benchmark, results under $OUT (default ./out).
# Usage on a GPU machine: bash bench/gpu_run.sh [suite ...]
# (suites: tests kvbench permute paged transfers contention disk remote sharing demo ttft prefetch)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-out}"
mkdir -p "$out"
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(tests kvbench permute paged transfers contention disk remote sharing)
# Clocks, power and throttle reasons every 0.5 s, to tell a slow kernel from a slowed GPU.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 500 >"$out/gpu_clocks.csv" 2>/dev/null &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT
for suite in "${suites[@]}"; do
    case "$suite" in
        demo) for model in llama-3.2-1b llama-3.1-8b; do
                  python3 -m kvblocks.cli demo --model "$model" --json \
                      >"$out/demo-$model.json" 2>"$out/demo-$model.log"
                  echo "demo $model: rc=$?"
              done ;;
        ttft|prefetch) python3 "bench/$suite.py" >"$out/$suite.csv" 2>"$out/$suite.log"
              echo "$suite: rc=$? $(wc -l <"$out/$suite.csv") lines" ;;
        tests) python3 -m pytest -q -m "gpu or not gpu" tests -p no:cacheprovider 2>&1 \
               | tee "$out/gpu_tests.log" | tail -3 ;;
        *) python3 -m kvblocks.cli bench "$suite" --csv "$out/$suite.csv" 2>"$out/$suite.log"
           echo "$suite: rc=$? $(wc -l <"$out/$suite.csv") lines" ;;
    esac
done
