#!/usr/bin/env bash
# One prepared GPU check of lslo (benchmarks/gpu_check.py says what it runs):
#   benchmarks/gpu_check.sh               on a GPU machine: at most ~8 minutes, writes benchmarks/RESULTS-gpu.md
#   benchmarks/gpu_check.sh --cpu-smoke   without a GPU: the same steps at a tiny shape (the test suite runs it)
# Python: $PYTHON, else the checkout's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
