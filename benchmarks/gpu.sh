#!/usr/bin/env bash
# The GPU window in one command (issue 16), from the project root on the GPU machine:
#
#   bash benchmarks/gpu.sh --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
#
# Arguments go to benchmarks/gpu.py (--budget-s, --only, ...). If the machine lacks a package the
# script imports, it is installed offline from .whl/, which `bash ../shared/gpu/wheels.sh` fills on
# the development machine (carry ".whl" with the run). A hard `timeout` backs up gpu.py's own
# global budget (default 480 s); the JSON is rewritten after every row, so a cut run keeps its rows.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
check='import torch, numpy, yaml, tqdm, psutil'
if ! "$PY" -c "$check" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "[gpu.sh] installing missing packages from .whl/ into /tmp/site" >&2
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "[gpu.sh] missing packages and no .whl/: run 'bash ../shared/gpu/wheels.sh' here and carry .whl" >&2
    fi
    "$PY" -c "$check" || { echo "[gpu.sh] still missing: $check" >&2; exit 3; }
fi
"$PY" -c 'import torch; print("[gpu.sh] torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")' >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true
exec timeout -k 10 "${GPU_BENCH_TIMEOUT:-570}" "$PY" benchmarks/gpu.py "$@"
