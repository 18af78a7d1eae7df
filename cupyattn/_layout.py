"""Helpers shared by the kernel launchers: strides in elements, merging batch axes, the device
properties launch planning needs, and the input checks every flash kernel makes."""
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


def launch_offsets(launch: int, outer_levels, count: int) -> List[int]:
    """Element offsets of `count` tensors in launch number `launch` of a loop over the outer batch
    levels [(size, [stride of each tensor])] (collapse_batch's order, outermost first; the last
    level varies fastest across launches)."""
    offs = [0] * count
    rem = launch
    for n, st in reversed(outer_levels):
        idx = rem % n
        rem //= n
        offs = [o + idx * s for o, s in zip(offs, st)]
    return offs


def vector_ok(width: int, ptr_value, strides) -> bool:
    """Whether rows of `width` 2-byte elements at address ptr_value with these element strides can
    be read in 16-byte vectors (8 elements): width, address and every stride aligned."""
    return width % 8 == 0 and int(ptr_value) % 16 == 0 and all(s % 8 == 0 for s in strides)


def flash_input_reasons(problem, max_head_dim: int, max_rows: int):
    """(reasons, device properties or None): what rules out every flash kernel (forward and
    backward) for `problem`: NumPy inputs, a dtype other than float16/bfloat16, head dims past
    max_head_dim, more than max_rows queries or keys (row indices are int32), no device, or a
    device older than sm_80. Properties are None when the device could not be asked."""
    from ._problem import HALF_DTYPES, dtype_name
    if problem.library != "cupy":
        return ["inputs are NumPy arrays (flash runs on CUDA GPUs)"], None
    why = []
    if problem.dtype not in HALF_DTYPES:
        why.append(f"dtype {dtype_name(problem.dtype)} is not supported (flash takes float16 and bfloat16)")
    if problem.head_dim > max_head_dim:
        why.append(f"head dim D={problem.head_dim} > {max_head_dim}")
    if problem.head_dim_v > max_head_dim:
        why.append(f"value head dim Dv={problem.head_dim_v} > {max_head_dim}")
    if max(problem.len_q, problem.len_k) > max_rows:
        why.append("sequence length past 2^31 keys or queries")
    try:
        props = device_props(problem.device_id)
    except Exception as exc:   # no driver or no device
        return why + [f"cannot query the CUDA device ({type(exc).__name__})"], None
    major, minor = props[:2]
    if major < 8:
        why.append(f"compute capability {major}.{minor} < 8.0 (flash needs sm_80 or newer)")
    return why, props


@functools.lru_cache(maxsize=None)
def device_props(device_id: int) -> Tuple[int, int, int, int]:
    """(major, minor, opt-in shared memory per block in bytes, multiprocessor count)."""
    import cupy
    cc = cupy.cuda.Device(device_id).compute_capability
    rt = cupy.cuda.runtime
    smem = rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id)
    sms = rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device_id)
    return int(cc[:-1]), int(cc[-1]), smem, sms
