#!/usr/bin/env bash
# The prepared GPU check: on a fresh GPU machine (no network, torch/triton/pytest preinstalled),
# run the kernel and library tests on CUDA with the compiled kernels (no interpreter; fp16, bf16
# and fp32 cases) and record the environment. Results go to $OUT (default benchmarks/results/).
#   usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

python - >"$OUT/environment.json" <<'PY'
import datetime, json, torch, triton
print(json.dumps({
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}, indent=2))
PY
cat "$OUT/environment.json"

# One config per kernel variant while testing (each autotune config costs a compile).
ALIGNER_AUTOTUNE=0 ALIGNER_TEST_DEVICE=cuda timeout 420 python -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_modules.py tests/test_errors.py tests/test_reference.py tests/test_patch.py \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
status=${PIPESTATUS[0]}
echo "gpu tests exit status: $status"
exit "$status"
