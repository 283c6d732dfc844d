#!/usr/bin/env bash
# The `paper` profile's sampling and training speed on one CUDA GPU, beside the paper's 2.14 s/image
# (bench/gpu.py says what it times). Finishes in under 5 minutes; without a GPU it prints one line and exits 0.
#   bench/gpu.sh [bench/gpu.py options, e.g. --budget 60 --no-compile]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# 290 s: the 5-minute promise, with the interpreter's start-up inside it
exec timeout 290 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu.py "$@"
