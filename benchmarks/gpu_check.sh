#!/usr/bin/env bash
# The one GPU check (see benchmarks/gpu_check.py): kernels vs their twins on CUDA, kernel bandwidth, engine
# decode tokens/s vs the roofline, transformers parity. Results: benchmarks/results/gpu_check.json.
#   bash benchmarks/gpu_check.sh [--out PATH] [--skip-8b]        PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import splitserve" 2>/dev/null; then
    echo "gpu_check: splitserve is not importable with $PYTHON; install it first: $PYTHON -m pip install -e ." >&2
    exit 2
fi
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
