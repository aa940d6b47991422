#!/bin/bash
# One short GPU session from the source tree (no install): the cuda-marked tests, then the
# target benchmarks one suite at a time, each under a time limit so partial results survive,
# then the tile sweeps of benchmarks/tune.py with the time left (SKIP_TUNE=1 to skip), rendered
# and packed into one archive.
#
#   OUT=/some/dir BUDGET=560 bash benchmarks/gpu_session.sh [suite ...]
#
# Suites (benchmarks/test_bench_<suite>.py) default to every target suite. Needs python3 with
# torch, triton, pytest, pytest-benchmark (pytest-xdist for the parallel tests). Writes
# $OUT/results.tgz (logs, JSON, Markdown).
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/session}
BUDGET=${BUDGET:-560}
RES=$(mktemp -d)
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
suites=${*:-attention pool poe pool_linear likelihoods gaussian_terms}

python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$RES/env.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout "${TEST_TIME:-200}" python3 -m pytest tests -m cuda -q -p no:cacheprovider $xdist -rfE \
    > "$RES/cuda_tests.log" 2>&1
  echo "cuda tests rc=$?"; tail -3 "$RES/cuda_tests.log"
fi
# Host time per call on this machine, for real (tiny shapes, kernels of a few µs), beside the
# stubbed figures of benchmarks/results/cpu_host_overhead/.
timeout 90 python3 benchmarks/host_overhead.py --cuda --calls 200 > "$RES/host_overhead_cuda.txt" 2>&1
echo "host overhead rc=$?"; cat "$RES/host_overhead_cuda.txt"
for suite in $suites; do
  t=$(left); [ "$t" -lt 30 ] && { echo "no time left for $suite"; continue; }
  timeout "$t" python3 -m pytest "benchmarks/test_bench_$suite.py" -q -p no:cacheprovider \
    --targets-only ${EXTRA:-} --benchmark-json="$RES/targets_$suite.json" > "$RES/bench_$suite.log" 2>&1
  echo "bench $suite rc=$? after $(( $(date +%s) - START ))s"; tail -1 "$RES/bench_$suite.log"
done
# The attention suite again on the general (tl.dot) kernel for every M, to compare it with the
# small-M kernel that M <= 8 takes by default (kernels/subset_attention_small.py).
case " $suites " in *" attention "*)
  t=$(left)
  if [ "$t" -ge 30 ]; then
    MMFAST_ATTENTION_SMALL_M=0 timeout "$t" python3 -m pytest benchmarks/test_bench_attention.py \
      -q -p no:cacheprovider --targets-only ${EXTRA:-} \
      --benchmark-json="$RES/targets_attention_general.json" > "$RES/bench_attention_general.log" 2>&1
    echo "bench attention (general kernel) rc=$? after $(( $(date +%s) - START ))s"
  fi;;
esac
t=$(left)
if [ -z "${SKIP_TUNE:-}" ] && [ "$t" -ge 60 ]; then
  timeout "$t" python3 benchmarks/tune.py --out "$RES" > "$RES/tune.log" 2>&1
  echo "tune rc=$? after $(( $(date +%s) - START ))s"
fi
for j in "$RES"/targets_*.json; do
  [ -s "$j" ] && python3 benchmarks/report.py "$j" > "${j%.json}.md" 2>&1
done
mkdir -p "$OUT" && tar czf "$OUT/results.tgz" -C "$RES" .
echo "results: $OUT/results.tgz"
