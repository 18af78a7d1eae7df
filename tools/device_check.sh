#!/usr/bin/env bash
# One full device pass: GPU tests, compute-sanitizer on a small case, the bench headline.
# On the device machine, from the repo root:  CUPYATTN_COMMIT=<sha> bash tools/device_check.sh
# Logs go to $OUT (or ./device_logs): at most 4 files here (device_measure.sh adds 3), since the device tool returns 8 at most.
set -u
out="${OUT:-device_logs}"; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.log"
echo "commit ${CUPYATTN_COMMIT:-unknown}" | tee -a "$out/env.log"

echo "== GPU tests"
timeout "${TEST_SECONDS:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:-} tests > "$out/tests.log" 2>&1
echo "pytest rc=$? ($((SECONDS - start)) s)"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20; tail -n 1 "$out/tests.log"

echo "== compute-sanitizer"
for tool in memcheck racecheck synccheck; do
  echo "=== $tool" >> "$out/sanitizer.log"
  timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitizer_case.py > /tmp/san.log 2>&1
  echo "$tool rc=$?: $(grep -E 'SUMMARY' /tmp/san.log)"; cat /tmp/san.log >> "$out/sanitizer.log"
done

if [ -n "${SKIP_BENCH:-}" ]; then echo "total $((SECONDS - start)) s"; exit 0; fi
echo "== bench headline ($((SECONDS - start)) s so far)"
timeout "${BENCH_SECONDS:-150}" python3 bench/attention.py --group headline,decode --budget 0.2 --no-progress --no-plots \
  --backend flash,chunked,torch-flash,torch-efficient,torch-cudnn --out "$out/headline.json" > "$out/bench.log" 2>&1
echo "bench rc=$?"; sed -n '/^Summary/,/^wrote/p' "$out/bench.log" | cut -c1-140
echo "total $((SECONDS - start)) s"
