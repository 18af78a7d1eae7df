#!/usr/bin/env bash
# Measurements beside the tests (one device call): where a call's time goes (host vs GPU), the
# chunked backend's GEMM/softmax split, cold-start compile and disk-cache load times, chunked
# float32 against torch's efficient backend, and ncu's tensor-pipe reading of the Hopper forward
# at D=128, L=16k.   On the device, from the repo root:  bash tools/device_measure.sh
# Logs go to $OUT (or ./device_logs): measure.log, cold_start.json, ncu.log. With CUPY_CACHE_DIR
# set to an empty dir, the cold-start bench runs first and fills that cache for the rest.
set -u
out="${OUT:-device_logs}"; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
start=$SECONDS
log="$out/measure.log"
if [ -n "${CUPY_CACHE_DIR:-}" ] && [ -z "$(ls -A "$CUPY_CACHE_DIR" 2>/dev/null)" ]; then
  # First on a fresh machine: true compile times, and the cache it leaves serves everything after.
  echo "== cold start"
  timeout 300 python3 bench/cold_start.py --jobs 16 --cache-dir "$CUPY_CACHE_DIR" --keep-cache \
    --out "$out/cold_start.json" > /tmp/cold_start.log 2>&1
  echo "cold start rc=$? ($((SECONDS - start)) s)"; tail -n 12 /tmp/cold_start.log
fi
{
echo "== host vs GPU per call";   timeout 120 python3 tools/profile_call.py --backward --profile
echo "== chunked: where time goes"; timeout 150 python3 tools/tune_chunked.py
echo "== chunked float32 vs torch efficient float32"
timeout 120 python3 bench/attention.py --full --group dtypes --op fwd --l 4096,16384 --budget 0.2 \
  --backend chunked,torch-efficient --no-progress --no-plots --out /tmp/float32.json
} > "$log" 2>&1
echo "measure rc=$? ($((SECONDS - start)) s)"
echo "== ncu"
if [ -z "${SKIP_NCU:-}" ]; then
  timeout 150 ncu --clock-control none --kernel-name regex:flash_fwd_sm90 --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
    --metrics regex:sm__pipe_tensor_op.*cycles_active.avg.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_tensor.*\.sum \
    python3 -c "
import cupy, numpy as np, cupyattn
bf = np.dtype(cupyattn.bfloat16)
q, k, v = (cupy.random.default_rng(i).standard_normal((1, 16, 16384, 128), dtype=np.float32).astype(bf) for i in range(3))
for _ in range(4): cupyattn.attention(q, k, v)
cupy.cuda.Device().synchronize()" > "$out/ncu.log" 2>&1
  echo "ncu rc=$?"; grep -iE "tensor|Duration|SM Busy|Compute \(SM\)|Memory Throughput|Registers|Achieved Occ" "$out/ncu.log" | head -30
fi
echo "total $((SECONDS - start)) s"
