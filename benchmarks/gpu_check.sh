#!/usr/bin/env bash
# The prepared GPU check, for a fresh GPU machine with no network (torch, triton, transformers,
# peft, pytest, pytest-xdist, hypothesis preinstalled). Within 7 minutes on one H100 with a cold
# Triton cache (each stage has a time limit; the limits sum to 7m30s):
#   1. the tests, in two processes side by side: the kernel, library and model tests on CUDA with
#      the compiled kernels (fp16, bf16, fp32; one autotune config per kernel variant) in 12
#      xdist workers, and the CPU/interpreter tests (ALIGNER_TEST_DEVICE=cpu, same process as a
#      visible GPU: the isolation of part 1 of issue 9) in 3;
#   2. the kernel-level decode rows (B = 1, 8, 32; L_k = 2k, 8k, 32k; N = 0, 1, 10; vs SDPA);
#   3. the key attention rows: L = 2k and 8k, D = 128, N in {0, 1, 10}, every method (fused, split,
#      auto and the baselines; auto's measured choices land in $OUT/cache/aligner/backend_choice.json);
#   4. one training-step row per method on a few LLaMA-2-7B-shaped layers.
# Every stage is stopped with SIGINT at its limit (pytest then still prints its failures) and
# writes its log to $OUT as it runs, so a run cut short still reports; $OUT/summary.txt gets one
# line per stage. Results: JSON (device, versions, date) plus markdown tables in $OUT.
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh        (default OUT: benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The kernels/ folder is imported as `aligner_kernels` (setup.py package_dir); without installing
# anything, a link under that name on PYTHONPATH serves the checkout as it is.
ALIASES=$(mktemp -d)
ln -s "$PWD/kernels" "$ALIASES/aligner_kernels"
export PYTHONPATH=$PWD:$ALIASES${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
: >"$OUT/summary.txt"

# run_stage NAME LIMIT_S COMMAND...: COMMAND's output to $OUT/NAME.log, SIGINT at the limit.
run_stage() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout -s INT -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local last
    last=$(grep -E "(passed|failed|error|no tests ran)" "$OUT/$name.log" | tail -n 1)
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && last="STOPPED at the ${limit} s limit; $last"
    echo "$name: exit $rc, $((SECONDS - start)) s${last:+, $last}" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

python - >"$OUT/environment.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from common import environment
print(json.dumps(environment(), indent=2))
PY
cat "$OUT/environment.json"

echo "== 1. tests: CUDA (12 workers) and CPU/interpreter (3 workers), side by side"
PYTEST=(python -m pytest -q -p no:cacheprovider -rfE)
run_stage tests-cuda 170 env ALIGNER_TEST_DEVICE=cuda ALIGNER_AUTOTUNE=0 "${PYTEST[@]}" -n 12 \
    tests/test_kernels.py tests/test_decode.py tests/test_isolation.py tests/test_modules.py \
    tests/test_errors.py tests/test_reference.py tests/test_patch.py tests/test_split.py \
    tests/test_backend_choice.py --junitxml="$OUT/tests-cuda.xml" &
run_stage tests-cpu 170 env ALIGNER_TEST_DEVICE=cpu "${PYTEST[@]}" -n 3 \
    tests/test_isolation.py tests/test_decode.py tests/test_errors.py --junitxml="$OUT/tests-cpu.xml" &
wait
# (run_stage in the background cannot set $status here: read the stages' exit codes back.)
grep -qE "^tests-(cuda|cpu): exit [^0]" "$OUT/summary.txt" && status=1
tail -n 25 "$OUT/tests-cuda.log"

echo "== 2. decode rows (kernel level)"
run_stage decode-kernel 75 python benchmarks/bench_decode.py --kernel --rounds 5 --results-dir "$OUT"
tail -n 4 "$OUT/decode-kernel.log"

echo "== 3. attention rows"
run_stage attention 150 env XDG_CACHE_HOME="$OUT/cache" python benchmarks/bench_attention.py --seqlens 2048 8192 --head-dims 128 \
    --kv-heads 8 --num-tokens 0 1 10 --results-dir "$OUT"
tail -n 3 "$OUT/attention.log"

echo "== 4. training-step rows"
run_stage training 55 python benchmarks/bench_training.py --model llama2-7b --layers 4 --batch 4 \
    --seqlen 2048 --rounds 3 --results-dir "$OUT"
tail -n 8 "$OUT/training.log"

echo "gpu check exit status: $status"
cat "$OUT/summary.txt"
exit "$status"
