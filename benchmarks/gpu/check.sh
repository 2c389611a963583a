#!/usr/bin/env bash
# The GPU check: one script for a lent GPU machine (an H200), run from the repository root as
# `bash benchmarks/gpu/check.sh`. It builds the CUDA backend for sm_90 in build/gpu, runs the C++
# GPU tests plainly and under compute-sanitizer memcheck, then, when the machine's python3 can
# build and import lorart._core, the Python GPU tests (tests/python/test_cuda_ops.py) and
# benchmarks/gpu/ops_bench.py, and last the attention and LoRA tests under racecheck. Every step has a time cap and
# the whole stays inside CHECK_BUDGET_S seconds (default 450: a device call's 8 minutes with room
# for the transfers). It always goes on to the end and leaves under $OUT (./gpu_out when unset):
#   summary.txt       one line per step (ok / FAILED rc / TIMED OUT / skipped: why), then the result
#   logs.tar.gz       every step's log, the gtest and pytest XML, CMake's logs
#   ops_bench.jsonl   the benchmark's records (benchmarks/README.md's format)
# and exits 1 when a step failed (a time-capped sanitizer step that ran out of time is reported,
# not failed). The machine has no network: GoogleTest comes from the system or, failing that, from
# .gpu_carry/googletest (`bash benchmarks/gpu/prepare_carry.sh` here, then carry `.gpu_carry`).
# Knobs (environment): PYTHON (python3), JOBS (16), BUILD_DIR (build/gpu), CHECK_BUDGET_S,
# GPU_TEST_FILTER, MEMCHECK_FILTER, RACECHECK_FILTER, SKIP_BUILD=1 (reuse BUILD_DIR as built).
set -u -o pipefail

ROOT=$(pwd)
if [ ! -f "$ROOT/CMakeLists.txt" ] || [ ! -d "$ROOT/csrc" ]; then
  echo "check.sh: run it from the repository root (bash benchmarks/gpu/check.sh)" >&2
  exit 2
fi
START=$(date +%s)
BUDGET=${CHECK_BUDGET_S:-450}
OUT=${OUT:-$ROOT/gpu_out}
PY=${PYTHON:-python3}
JOBS=${JOBS:-16}
B=${BUILD_DIR:-build/gpu}
case "$B" in /*) ;; *) B=$ROOT/$B ;; esac
LOGS=$B/check_logs
GPU_TEST_FILTER=${GPU_TEST_FILTER:-Cuda*}
MEMCHECK_FILTER=${MEMCHECK_FILTER:-CudaLinearTest.*:CudaSamplingTest.*:CudaPagedAttentionTest.*:CudaLora*}
RACECHECK_FILTER=${RACECHECK_FILTER:-CudaPagedAttentionTest.*:CudaLora*}
mkdir -p "$OUT" "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.xml "$OUT/ops_bench.jsonl"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME CAP_S KIND CMD...: runs CMD with its output in $LOGS/NAME.log, capped at CAP_S seconds
# and at what is left of the budget (20 s kept for packing). KIND "must" counts a failure or a
# time-out as a failure; "capped" reports a time-out without failing; "try" reports a failure
# (the caller falls back) without failing.
step() {
  local name=$1 cap=$2 kind=$3
  shift 3
  local avail=$(($(left) - 20))
  [ "$cap" -gt "$avail" ] && cap=$avail
  if [ "$cap" -lt 5 ]; then
    note "$(printf '%-22s skipped: out of time budget' "$name")"
    [ "$kind" = capped ] || FAILED=1
    return 1
  fi
  local t0=$(date +%s) rc
  echo "== $name (cap ${cap}s): $*" | tee "$LOGS/$name.log"
  timeout -k 5 "$cap" "$@" >>"$LOGS/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 15 "$LOGS/$name.log"
  if [ $rc -eq 0 ]; then
    note "$(printf '%-22s ok (%ss)' "$name" "$dt")"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "$(printf '%-22s TIMED OUT after %ss%s' "$name" "$dt" \
      "$([ "$kind" = capped ] && echo ' (capped: not a failure; see its log for how far it got)')")"
    [ "$kind" = capped ] || FAILED=1
  elif [ "$kind" = try ]; then
    note "$(printf '%-22s failed rc=%s (%ss): trying another way' "$name" "$rc" "$dt")"
  else
    note "$(printf '%-22s FAILED rc=%s (%ss)' "$name" "$rc" "$dt")"
    FAILED=1
  fi
  return $rc
}

# gist NAME PATTERN: the last line of NAME's log matching PATTERN, into the summary.
gist() {
  local line
  line=$(grep -E "$2" "$LOGS/$1.log" 2>/dev/null | tail -n 1)
  [ -n "$line" ] && note "    $1: $line"
  return 0
}

pack() {
  cp -f "$B"/CMakeFiles/CMakeConfigureLog.yaml "$LOGS"/ 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$B" check_logs 2>/dev/null
  note "total $(($(date +%s) - START))s of a ${BUDGET}s budget; result: $([ $FAILED = 0 ] && echo PASS || echo FAIL)"
}
trap pack EXIT

# ---------------------------------------------------------------------------- the machine
{
  echo "date: $(date -u)  host: $(uname -a)"
  echo "git: $(git -C "$ROOT" log --oneline -1 2>/dev/null || echo 'no git')"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version || echo "no nvcc"
  cmake --version | head -1
  ninja --version
  command -v compute-sanitizer || echo "no compute-sanitizer"
  "$PY" -c 'import sys; print("python", sys.version)'
  "$PY" -c 'import numpy, pybind11; print("numpy", numpy.__version__, "pybind11", pybind11.__version__)'
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} >"$LOGS/machine.log" 2>&1
cat "$LOGS/machine.log"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
note "machine: ${GPUS} GPU(s); $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'no nvcc')"
if [ "$GPUS" = 0 ]; then
  note "machine: NO GPU visible: the GPU tests will skip and nothing is verified (FAIL)"
  FAILED=1
fi

# Python: what the machine's interpreter can do (the C++ steps need none of it).
PY_OK=0
PYBIND_DIR=""
if "$PY" -c 'import numpy, pybind11' >/dev/null 2>&1; then
  PYBIND_DIR=$("$PY" -m pybind11 --cmakedir)
  PY_OK=1
else
  note "python: $PY lacks numpy or pybind11: the Python module, tests and benchmarks are skipped"
fi

# ---------------------------------------------------------------------------- configure, build
GTEST_ARGS=()
WITH_TESTS=ON
# configure NAME: build/gpu with the CUDA backend for sm_90, the tests (WITH_TESTS) and the
# Python module (PY_OK), from a fresh cache.
configure() {
  local py_args=(-DLORART_BUILD_PYTHON=OFF)
  if [ $PY_OK = 1 ]; then
    py_args=(-DLORART_BUILD_PYTHON=ON "-DPython_EXECUTABLE=$(command -v "$PY")" "-Dpybind11_DIR=$PYBIND_DIR")
  fi
  rm -f "$B/CMakeCache.txt"
  step "$1" 90 try cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORART_CUDA=ON \
    -DLORART_CUDA_ARCHS=90 "-DLORART_BUILD_TESTS=$WITH_TESTS" "${py_args[@]}" "${GTEST_ARGS[@]}"
}

CONFIGURED=0
if [ "${SKIP_BUILD:-0}" = 1 ] && [ -f "$B/build.ninja" ]; then
  note "configure/build: skipped (SKIP_BUILD=1, reusing $B)"
  CONFIGURED=1
  grep -q 'LORART_BUILD_TESTS:BOOL=ON' "$B/CMakeCache.txt" || WITH_TESTS=OFF
else
  configure configure && CONFIGURED=1
  if [ $CONFIGURED = 0 ] && grep -q 'GTest' "$LOGS/configure.log" &&
    [ -f "$ROOT/.gpu_carry/googletest/CMakeLists.txt" ]; then
    # No GoogleTest on the machine: build the carried source and point CMake at it.
    GT=$B/googletest
    step gtest-build 90 must bash -c "cmake -S '$ROOT/.gpu_carry/googletest' -B '$GT/build' \
      -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF -DCMAKE_INSTALL_PREFIX='$GT/install' &&
      ninja -C '$GT/build' -j $JOBS install" &&
      GTEST_ARGS=("-DGTest_ROOT=$GT/install") && configure configure-gtest && CONFIGURED=1
  fi
  if [ $CONFIGURED = 0 ] && [ $PY_OK = 1 ] && grep -Eq 'Python|pybind11' "$LOGS"/configure*.log; then
    note "configure: the Python module cannot be configured here; building without it"
    PY_OK=0
    configure configure-nopython && CONFIGURED=1
  fi
  if [ $CONFIGURED = 0 ]; then
    note "configure: building without the C++ tests (no GoogleTest here? see configure.log; run" \
      "benchmarks/gpu/prepare_carry.sh where you call from and carry .gpu_carry)"
    FAILED=1
    WITH_TESTS=OFF
    configure configure-notests && CONFIGURED=1
  fi
  if [ $CONFIGURED = 1 ]; then
    step build 300 must ninja -C "$B" -j "$JOBS"
  else
    note "configure: FAILED every way (see the configure logs); nothing to build or run"
    FAILED=1
  fi
fi

# ---------------------------------------------------------------------------- C++ GPU tests
T=$B/lorart_cpp_tests
if [ $WITH_TESTS = ON ] && [ -x "$T" ]; then
  step gpu-tests 120 must "$T" --gtest_filter="$GPU_TEST_FILTER" --gtest_brief=0 \
    --gtest_output="xml:$LOGS/gpu-tests.xml"
  gist gpu-tests '^\[  PASSED  \] [0-9]+ test'
  gist gpu-tests '^\[  FAILED  \] [0-9]+ test'
  SKIPS=$(grep -m1 -o '^\[  SKIPPED \] [0-9]* tests\?' "$LOGS/gpu-tests.log" | grep -o '[0-9]*' || true)
  [ -n "$SKIPS" ] && note "    gpu-tests: $SKIPS skipped (the first says: $(grep -m1 -B1 '^\[  SKIPPED \]' "$LOGS/gpu-tests.log" | head -1))"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck 90 capped compute-sanitizer --tool memcheck --error-exitcode 86 \
      --print-limit 50 "$T" --gtest_filter="$MEMCHECK_FILTER"
    gist memcheck 'ERROR SUMMARY'
  else
    note "sanitizers: skipped (no compute-sanitizer on PATH)"
  fi
else
  note "gpu-tests: NOT RUN (lorart_cpp_tests was not built)"
  FAILED=1
fi

# ---------------------------------------------------------------------------- Python
if [ $PY_OK = 1 ] && ls "$B"/_core*.so >/dev/null 2>&1; then
  # The package from the source tree with this build's module beside it, in build/gpu/py, so
  # the checkout's python/lorart (and a CPU build linked there) stays as it is.
  rm -rf "$B/py" && mkdir -p "$B/py" && cp -r "$ROOT/python/lorart" "$B/py/" &&
    rm -f "$B"/py/lorart/_core*.so && cp "$B"/_core*.so "$B/py/lorart/"
  export PYTHONPATH=$B/py PYTHONUNBUFFERED=1
  if "$PY" -c 'import lorart; i = lorart.build_info(); assert i["cuda"], i; print(i)' \
    >"$LOGS/py-import.log" 2>&1; then
    cat "$LOGS/py-import.log"
    if "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
      step py-cuda-tests 120 must "$PY" -m pytest -q -p no:cacheprovider -rs \
        --junitxml="$LOGS/py-cuda-tests.xml" tests/python/test_cuda_ops.py \
        tests/python/test_core_ops.py tests/python/test_device_errors.py
      gist py-cuda-tests '(passed|failed|error)'
      # The benchmark stops starting cases 20 s before its cap, so its records are written.
      cap=$(($(left) - 20 - 60))  # the racecheck below keeps a minute
      [ $cap -gt 180 ] && cap=180
      step ops-bench $cap must "$PY" benchmarks/gpu/ops_bench.py --json "$OUT/ops_bench.jsonl" \
        --budget-s $((cap - 20))
      gist ops-bench '^ops_bench: '
    else
      note "python: torch cannot see a GPU here: the Python GPU tests and benchmarks are skipped"
    fi
  else
    cat "$LOGS/py-import.log"
    note "python: lorart._core from $B does not import with CUDA (py-import.log): Python steps skipped"
    FAILED=1
  fi
elif [ $PY_OK = 1 ]; then
  note "python: no _core module was built: Python steps skipped"
fi

# ---------------------------------------------------------------------------- racecheck, last
if [ $WITH_TESTS = ON ] && [ -x "$T" ] && command -v compute-sanitizer >/dev/null 2>&1; then
  step racecheck 80 capped compute-sanitizer --tool racecheck --error-exitcode 86 \
    --print-limit 50 "$T" --gtest_filter="$RACECHECK_FILTER"
  gist racecheck 'RACECHECK SUMMARY|ERROR SUMMARY'
fi

exit $FAILED
