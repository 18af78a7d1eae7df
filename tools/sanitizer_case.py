"""A small case for compute-sanitizer: every kernel backend, forward and backward where built.

Run as `compute-sanitizer --tool memcheck python tools/sanitizer_case.py`. CuPy's memory pool
is switched off so that out-of-bounds accesses land outside any allocation and are caught.
"""
import numpy as np
import cupy

import cupyattn
from cupyattn import _flash_sm90
from cupyattn._problem import normalize

cupy.cuda.set_allocator(None)
rng = np.random.default_rng(0)


def arr(*shape, dtype=cupyattn.bfloat16):
    return cupy.asarray(rng.standard_normal(shape).astype(dtype))


# (D, Dv) = (72, 40) runs the sm80 flash kernel, (128, 128) without a mask the Hopper one on sm_90.
for backend, d, dv in (("flash", 72, 40), ("flash", 128, 128), ("chunked", 72, 40)):
    for dtype in (cupyattn.bfloat16, np.float16):
        for causal in (False, True):
            q, k, v = arr(1, 4, 77, d, dtype=dtype), arr(1, 2, 93, d, dtype=dtype), arr(1, 2, 93, dv, dtype=dtype)
            mask = cupy.asarray(rng.random((77, 93)) < 0.8)
            for m in (None, mask):
                print(backend, d, dv, np.dtype(dtype).name, causal, m is not None, flush=True)
                try:
                    out, lse = cupyattn.attention(q, k, v, causal=causal, mask=m, backend=backend, return_lse=True)
                except cupyattn.BackendUnavailable as exc:
                    print(f"{backend}: skipped ({exc})")
                    continue
                try:
                    cupyattn.attention_backward(out, q, k, v, out, lse, causal=causal, mask=m, backend=backend)
                except cupyattn.BackendUnavailable:
                    pass
# More Hopper forward tiles than SMs (persistent blocks draw several tiles each: the dynamic
# scheduler's queue and counters) at D=64, forward and backward.
q, k, v = arr(2, 80, 100, 64), arr(2, 80, 120, 64), arr(2, 80, 120, 64)
for causal in (False, True):
    print("flash 64 64 many tiles", causal, flush=True)
    out, lse = cupyattn.attention(q, k, v, causal=causal, backend="flash", return_lse=True)
    cupyattn.attention_backward(out, q, k, v, out, lse, causal=causal, backend="flash")
# Causal rows long enough (Lk >= SHORT_CAUSAL_KEYS) for D=64's three consumer warpgroups, with a
# partial 192-row tile; the short cases above run D=64 causal with two.
q, k, v = arr(1, 4, 300, 64), arr(1, 4, 2100, 64), arr(1, 4, 2100, 64)
print("flash 64 64 causal three consumers", flush=True)
cupyattn.attention(q, k, v, causal=True, backend="flash", return_lse=True)
# D=256 stages its TMA-store epilogue in the Q buffer (no room for an O buffer of its own), with
# more tiles than SMs so that a Q part is refilled after its store; a partial last tile clips rows.
q, k, v = arr(2, 40, 300, 256), arr(2, 40, 200, 256), arr(2, 40, 200, 256)
for causal in (False, True):
    print("flash 256 256 many tiles", causal, flush=True)
    cupyattn.attention(q, k, v, causal=causal, backend="flash", return_lse=True)
# D=128 at 128x2 defers each tile's end into the next tile's first turn (Plan::kDeferEnd): more
# tiles than SMs so that blocks carry a pending tile, and causal with Lq - Lk >= 128 so that tiles
# with no key flush it.
q, k, v = arr(2, 40, 400, 128), arr(2, 40, 200, 128), arr(2, 40, 200, 128)
for causal in (False, True):
    print("flash 128 128 many tiles", causal, flush=True)
    cupyattn.attention(q, k, v, causal=causal, backend="flash", return_lse=True)
# Full D=128 rows from MEDIUM_KEYS on may take BN=160 (also a deferred end): the same inputs with
# that configuration forced (Lk = 200 is one partial key tile), where the device runs it.
if _flash_sm90.supports(normalize(q, k, v)) == []:
    print("flash 128 128 many tiles 160x2", flush=True)
    _flash_sm90.forward(normalize(q, k, v), config=_flash_sm90.MEDIUM_FULL_CONFIGS[128])
    # causal tiles in (batch, head) groups with a short last group (80 pairs in groups of 3):
    # the default rule puts a small problem's pairs all in one group, so the width is forced
    print("flash 128 128 causal groups of 3", flush=True)
    _flash_sm90.SWIZZLE_WIDTH = 3
    _flash_sm90.forward(normalize(q, k, v, causal=True))
    _flash_sm90.SWIZZLE_WIDTH = None
cupy.cuda.Device().synchronize()
print("sanitizer case done")
