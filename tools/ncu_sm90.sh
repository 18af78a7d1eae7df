#!/usr/bin/env bash
# ncu's view of the Hopper forward on a few shapes, to compare where the time goes at L=4k against
# L=16k (tensor-pipe activity, warp stall reasons, the top stall locations in the SASS).
#   On the device, from the repo root:  bash tools/ncu_sm90.sh "128:4096 128:16384 256:4096"
# Each entry is D:L (bf16, B*L = 16k tokens, H*D = 2048, full); logs go to $OUT (or ./device_logs).
set -u
out="${OUT:-device_logs}"; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
for shape in ${1:-128:4096 128:16384}; do
  d=${shape%%:*}; l=${shape##*:}
  timeout 120 ncu --clock-control none --kernel-name regex:flash_fwd_sm90 --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    --metrics regex:sm__pipe_tensor_op.*cycles_active.avg.pct_of_peak_sustained_active \
    python3 -c "
import cupy, numpy as np, cupyattn
bf = np.dtype(cupyattn.bfloat16)
D, L = $d, $l
q, k, v = (cupy.random.default_rng(i).standard_normal((16384 // L, 2048 // D, L, D), dtype=np.float32).astype(bf) for i in range(3))
for _ in range(4): cupyattn.attention(q, k, v)
cupy.cuda.Device().synchronize()" > "$out/ncu_D${d}_L${l}.log" 2>&1
  echo "== D=$d L=$l rc=$?"
  grep -iE "tensor_op|Duration|Stall|Issued Warp|No Eligible|Active Warps|Eligible Warps" "$out/ncu_D${d}_L${l}.log" | head -30
done
