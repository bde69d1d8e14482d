#!/usr/bin/env bash
# benchmarks/gpu.sh: what a session with a GPU runs, as one call (under 8 minutes on one H200).
#
#   1. the GPU tests                      pytest -m gpu tests/test_gpu.py            (limit 140 s)
#   2. one optimizer step per method at the paper's shapes, random weights, both Table I pairs:
#                                         python -m benchmarks.bench_gpu --parts steps (limit 260 s)
#   3. the chunked loss alone at Liger-Kernel's shape (hidden 4096, vocabulary 128,256, 8,192 tokens):
#                                         python -m benchmarks.bench_gpu --parts loss  (limit 70 s)
# The benchmark writes its JSON and table after every row, so a part stopped by its limit still
# returns the rows it finished.
#
# Each part has its own time limit, so a hang costs that part only; the script goes on to the next
# and exits non-zero at the end if any part failed. Output is teed to files in $OUT (the device
# tool brings back what is written there; at most 8 files), else in benchmarks/results/gpu-<time>/:
# tests.log (with nvidia-smi and versions first), steps.{log,json,md}, loss.{log,json,md}.
#
#   bash benchmarks/gpu.sh         # needs CUDA: without a CUDA device it stops at once and says so
#   bash benchmarks/gpu.sh --cpu   # a smoke run of the same script on the CPU: the tests' CPU dry
#                                  # runs, the benchmarks at --scale 32 and a smaller batch (checks the
#                                  # plumbing, not speed)
#
# Nothing is downloaded: models are random, built from benchmarks/configs/*.json; the tests and
# benchmarks need torch, transformers, PEFT and pytest (not lm-eval, not gguf).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

mode=cuda
if [ "${1:-}" = "--cpu" ]; then mode=cpu; elif [ -n "${1:-}" ]; then
  echo "usage: bash benchmarks/gpu.sh [--cpu]" >&2; exit 2
fi
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python   # this project's set-up (setup.sh)
else PY=python3; fi                                      # a GPU machine's own Python with torch
if [ $mode = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device (torch.cuda.is_available() is False for $PY): nothing to measure here." >&2
  echo "        Run it on a machine with a GPU, or 'bash benchmarks/gpu.sh --cpu' for a CPU smoke run." >&2
  exit 3
fi

OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
failed=()
part() {  # part NAME SECONDS LOGFILE COMMAND...: run with a time limit, tee the output, note a failure
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "== $name: TIMED OUT after ${limit}s" | tee -a "$log"
  echo "== $name: exit $rc in $((SECONDS - t0))s" | tee -a "$log"
  [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"; git log -1 --oneline 2>/dev/null || true
  [ $mode = cuda ] && nvidia-smi 2>/dev/null
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  $PY -c "import peft; print('peft', peft.__version__)" 2>/dev/null || echo "peft: not installed"
} 2>&1 | tee "$OUT/tests.log"

if [ $mode = cuda ]; then
  part tests 140 "$OUT/tests.log" $PY -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider
  part steps 260 "$OUT/steps.log" $PY -m benchmarks.bench_gpu --device cuda --parts steps --steps 3 --warmup 2 \
    --timeout 60 --output "$OUT/steps.json"
  part loss 70 "$OUT/loss.log" $PY -m benchmarks.bench_gpu --device cuda --parts loss --steps 5 --warmup 2 \
    --timeout 40 --output "$OUT/loss.json"
else
  part tests 300 "$OUT/tests.log" $PY -m pytest tests/test_gpu.py -v -rs -m "not gpu" -p no:cacheprovider
  part steps 400 "$OUT/steps.log" $PY -m benchmarks.bench_gpu --device cpu --scale 32 --parts steps --steps 1 \
    --warmup 1 --pairs llama3 --batch-size 2 --max-len 128 --output "$OUT/steps.json"
  part loss 200 "$OUT/loss.log" $PY -m benchmarks.bench_gpu --device cpu --scale 32 --parts loss --steps 1 \
    --warmup 1 --output "$OUT/loss.json"
fi

echo "gpu.sh ($mode): output in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: failed parts: ${failed[*]}"; exit 1
fi
echo "gpu.sh: every part passed"
