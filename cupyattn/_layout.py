"""Memory-layout helpers shared by the kernel backends: strides in elements, merging batch axes,
and the device properties launch planning needs."""
from __future__ import annotations

import functools
from typing import List, Tuple


def elem_strides(a) -> Tuple[int, ...]:
    """Strides in elements (CuPy and NumPy give bytes)."""
    return tuple(s // a.itemsize for s in a.strides)


def collapse_batch(shape, strides_per_tensor) -> List[Tuple[int, list]]:
    """Batch axes as few as possible: drop size-1 axes and merge neighbours whose strides allow it
    for every tensor at once. Returns [(size, [stride of each tensor])], outermost first; a kernel
    then indexes a handful of levels instead of an arbitrary number of axes."""
    merged: List[Tuple[int, list]] = []
    for i, n in enumerate(shape):
        if n == 1:
            continue
        st = [s[i] for s in strides_per_tensor]
        if merged and all(ps == s * n for ps, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    return merged


@functools.lru_cache(maxsize=None)
def device_props(device_id: int) -> Tuple[int, int, int, int]:
    """(major, minor, opt-in shared memory per block in bytes, multiprocessor count)."""
    import cupy
    cc = cupy.cuda.Device(device_id).compute_capability
    rt = cupy.cuda.runtime
    smem = rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id)
    sms = rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device_id)
    return int(cc[:-1]), int(cc[-1]), smem, sms
