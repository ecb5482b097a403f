#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool's `run`), prepared so that a session
# with a GPU spends its few minutes measuring, not typing. From the repository root:
#   COMMIT=<git rev-parse HEAD, taken here> bash bench/gpu_session.sh
# (the copy of the tree there has no .git; budgets in seconds: TEST_S, QUICK_S, BENCH_S;
# PY: the interpreter holding the machine's CUDA torch, python3 on the lent H200 image)
# Writes to $OUT (or /tmp/pk_gpu) six files at most (the device tool returns eight):
# gpu.txt (GPU, driver, versions, commit), log.txt (every step's output), and the quick
# and full benchmark JSON + PNG (`python -m bench`), which a session then commits under
# bench/results/. Every step has its own time limit, so a
# hang in one still returns the others' results; the exit status is the worst step's.
set -uo pipefail
OUT=${OUT:-/tmp/pk_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
export PK_GIT_COMMIT=${COMMIT:-}       # recorded in the benchmark JSON (bench/report.py)
status=0
step() {  # step NAME SECONDS CMD...: run with a limit, append to $OUT/log.txt, keep going
  local name=$1 limit=$2 tmp
  shift 2
  tmp=$(mktemp)
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" > "$tmp" 2>&1
  local rc=$?
  cat "$tmp" >> "$OUT/log.txt"
  tail -n 25 "$tmp"
  rm -f "$tmp"
  echo "== $name: exit $rc" | tee -a "$OUT/log.txt"
  [ "$rc" -ne 0 ] && status=$rc
  return 0
}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  date -u +%Y-%m-%dT%H:%M:%SZ
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# The machine's own CUDA torch, Triton, pytest and pybind11 stay (nothing can be fetched
# there): the package alone installs, without dependencies, and builds its kernels there.
step install 300 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
step tests "${TEST_S:-180}" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider
step quick "${QUICK_S:-90}" "$PY" -m bench --quick --out-dir "$OUT"
step bench "${BENCH_S:-240}" "$PY" -m bench --runs 20 --out-dir "$OUT"
ls -la "$OUT"
exit $status
