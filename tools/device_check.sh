#!/usr/bin/env bash
# One full device pass: environment, GPU tests, compute-sanitizer on a small case, quick bench.
# Usage on the device machine, from the repo root: bash tools/device_check.sh [pytest args...]
# Logs go to $OUT (or ./device_logs).
set -u
out="${OUT:-device_logs}"; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.log"
git rev-parse HEAD 2>/dev/null | tee -a "$out/env.log"
echo "== GPU tests"
timeout 420 python3 -m pytest -q -m gpu -x -p no:cacheprovider "${@:-tests}" > "$out/tests.log" 2>&1
echo "pytest rc=$?"; tail -n 15 "$out/tests.log"
echo "== compute-sanitizer"
for tool in memcheck racecheck synccheck; do
  timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitizer_case.py > "$out/sanitizer_$tool.log" 2>&1
  echo "$tool rc=$?"; tail -n 4 "$out/sanitizer_$tool.log"
done
