#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py for the steps and docs/gpu.md for how to read it).
#
#   bash benchmarks/gpu_check.sh                    # fresh venv in .venv-gpu, installs, all steps, <= 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run          # no venv, no installs: the current Python on the CPU, tiny sizes
#
# Environment: PYTHON (interpreter that makes the venv, or runs the dry run; default python3), GPU_CHECK_VENV
# (venv folder, default .venv-gpu), GPU_CHECK_SYSTEM_SITE=1 (the venv sees the system's packages: a machine
# without internet access that has torch installed), TORCH_SPEC (what pip installs for torch, default "torch").
# Other arguments go to gpu_check.py (--out DIR, --budget SECONDS, --only STEP,...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then
        exec "$PYTHON" benchmarks/gpu_check.py "$@"
    fi
done

OUT=gpu_check
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == "--out" ]]; then OUT=${args[i + 1]}; fi
done
mkdir -p "$OUT/logs"
VENV=${GPU_CHECK_VENV:-.venv-gpu}
START=$(date +%s.%N)
status=ok
error=""
{
    site=()
    if [[ "${GPU_CHECK_SYSTEM_SITE:-0}" == "1" ]]; then site=(--system-site-packages); fi
    timeout 60 "$PYTHON" -m venv "${site[@]}" "$VENV" &&
        timeout 240 "$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch}" &&
        timeout 120 "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
} >"$OUT/logs/setup.log" 2>&1 || { status=failed; error="venv or pip install failed or timed out: see $OUT/logs/setup.log"; }
END=$(date +%s.%N)
"$PYTHON" - "$OUT/setup.json" "$status" "$START" "$END" "$error" "$VENV" "$OUT/logs/setup.log" <<'EOF'
import json, sys
path, status, start, end, error, venv, log = sys.argv[1:]
json.dump({"name": "setup", "status": status, "seconds": round(float(end) - float(start), 2), "log": log,
           "error": error or None, "venv": venv}, open(path, "w"))
EOF
if [[ "$status" == "ok" ]]; then
    exec "$VENV/bin/python" benchmarks/gpu_check.py --setup-json "$OUT/setup.json" "$@"
fi
# no usable environment: the driver (standard library only) still writes the JSON and the summary
exec "$PYTHON" benchmarks/gpu_check.py --setup-json "$OUT/setup.json" "$@"
