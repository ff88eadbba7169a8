#!/usr/bin/env bash
# The prepared GPU check, for a fresh GPU machine with no network (torch, triton, transformers,
# peft, pytest, hypothesis preinstalled). In one go, in about 6 minutes:
#   1. the kernel, library and model tests on CUDA with the compiled kernels (fp16, bf16, fp32);
#   2. the key attention rows: L = 2k and 8k, D = 128, N in {0, 1, 10}, every method;
#   3. one training-step row per method on a few LLaMA-2-7B-shaped layers;
# and writes JSON (device, versions, date) plus markdown tables to $OUT (default benchmarks/results/).
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
status=0

python - >"$OUT/environment.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from common import environment
print(json.dumps(environment(), indent=2))
PY
cat "$OUT/environment.json"

echo "== 1. tests on CUDA (one autotune config per kernel variant: each config costs a compile)"
ALIGNER_AUTOTUNE=0 ALIGNER_TEST_DEVICE=cuda timeout 240 python -m pytest -q -p no:cacheprovider -x \
    tests/test_kernels.py tests/test_modules.py tests/test_errors.py tests/test_reference.py tests/test_patch.py \
    --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.log" 2>&1 || status=1
tail -n 15 "$OUT/gpu-tests.log"

echo "== 2. attention rows"
timeout 150 python benchmarks/bench_attention.py --seqlens 2048 8192 --head-dims 128 --kv-heads 8 \
    --num-tokens 0 1 10 --results-dir "$OUT" >"$OUT/attention.log" 2>&1 || status=1
tail -n 3 "$OUT/attention.log"

echo "== 3. training-step rows"
timeout 90 python benchmarks/bench_training.py --model llama2-7b --layers 4 --batch 4 --seqlen 2048 \
    --rounds 4 --results-dir "$OUT" >"$OUT/training.log" 2>&1 || status=1
tail -n 8 "$OUT/training.log"

echo "gpu check exit status: $status"
exit "$status"
