#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool's `run`), prepared so that a session
# with a GPU spends its few minutes measuring, not typing. From the repository root:
#   COMMIT=<git rev-parse HEAD, taken here> bash bench/gpu_session.sh
# with `carry: ["pykernels/_kernels", ".peer_ptx"]`: the kernels built here (nvcc 13,
# sm_90a; only pykernels._C is compiled there) and
# DeepGEMM's kernel prepared here by `python -m bench.peers.gpu_gemm prepare --dir .peer_ptx`
# (the machine has neither DeepGEMM's headers nor a network).
# The copy of the tree there has no .git; budgets in seconds: INSTALL_S, PEERS_S, TEST_S,
# NCU_S, GEMM_S, MLA_S; PY: the interpreter holding the machine's CUDA torch (python3 on the H200).
# Writes to $OUT (or /tmp/pk_gpu) eight files at most (the device tool returns eight):
# gpu.txt (GPU, driver, versions, commit), log.txt (every step's output),
# deepgemm-vs-ours.json, ncu.txt (Nsight Compute on the largest shape), and the benchmark
# JSON + PNG of the GEMM layouts (gemm/) and of MLA decode + EP (mla/), which a session
# then commits under bench/results/<gpu>-<date>-<commit>/. Every step has its own time limit, so a hang in one still returns the others' results; the exit status
# is the worst step's. The steps run most valuable first.
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
# there), and the kernels come built from here (carried): only pykernels._C is compiled
# there (g++, pybind11, the CUDA driver header), and every step imports the tree itself
# (PYTHONPATH). `pip install -e .` would do the same but may recompile every kernel when
# that machine's nvcc reports another version than the manifest's (docs/build.md).
EXT=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
step build_c "${INSTALL_S:-120}" g++ -O2 -shared -fPIC -std=c++17 $("$PY" -m pybind11 --includes) -Icsrc/host \
  -I/usr/local/cuda/include csrc/host/module.cpp csrc/host/driver.cpp -ldl -o "pykernels/_C$EXT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
if [ -f .peer_ptx/manifest.json ]; then
  step peers "${PEERS_S:-120}" "$PY" -m bench.peers.gpu_gemm run --dir .peer_ptx --runs 20 --sweep-ours --profile-host \
    --out "$OUT/deepgemm-vs-ours.json"
fi
# why our GEMM is slower than DeepGEMM's on the largest shape: one launch of each under
# Nsight Compute (throughputs, stall reasons, occupancy), clocks left to the GPU
if [ -f .peer_ptx/manifest.json ] && command -v ncu > /dev/null; then
  step ncu "${NCU_S:-120}" ncu --clock-control none --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis -k "regex:pk_fp8_gemm|deep_gemm" -c 3 --log-file "$OUT/ncu.txt" \
    "$PY" -m bench.peers.gpu_gemm run --dir .peer_ptx --shapes 4096x7168x16384 --probe-only \
    --out /tmp/ncu-rows.json
fi
# only the files holding GPU tests: collecting the whole suite costs time, and a module
# that cannot import there must not stop the others
step tests "${TEST_S:-100}" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --continue-on-collection-errors \
  $(grep -rl "mark.gpu" tests --include="test_*.py")
step gemm "${GEMM_S:-150}" "$PY" -m bench --ops normal,contiguous,masked --runs 20 --out-dir "$OUT/gemm"
step mla "${MLA_S:-90}" "$PY" -m bench --ops mla,ep --runs 20 --out-dir "$OUT/mla"
ls -laR "$OUT"
exit $status
