"""Flash backward: tiled CUDA kernels recomputing the probabilities from the forward's lse
(kernels_cu/flash_bwd.cu; on sm_90 the main kernel of kernels_cu/flash_bwd_sm90.cu where it applies, see
_flash_bwd_sm90.py). Wired into FlashBackend by `backward_reasons` and `flash_backward`.

Three kernels per call: a pre-pass (delta = rowsum(dO * O) and lse in the log2 domain), the main
kernel over key tiles (dK, dV in registers, GQA groups summed inside the block, dQ by fp32
atomics) and, with deterministic=True, a separate dQ kernel over query tiles instead of atomics.

deterministic=False is the default: the atomic dQ adds one matrix product per tile to the main
kernel, while the deterministic pass recomputes S and dP once more (roughly 1.4x the backward's
work). With atomics the order of the float additions into dQ varies between runs, so dQ can
differ in its last bits; dK and dV are bitwise reproducible in both modes.

Outputs are float32 (the API sums broadcast batch axes and casts to the input dtype).
Inputs are read in place through their strides (two batch levels per launch, more are looped
over launches); only a q/k/v whose last axis is not contiguous is copied, and dout/out/lse are
made contiguous (no copy when they already are, as the forward returns them).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from . import _flash_bwd_sm90
from ._kernels import KernelSpec
from ._layout import collapse_batch as _collapse_batch, device_props as _device_props, elem_strides as _elem_strides
from ._layout import flash_input_reasons, launch_offsets, vector_ok
from ._problem import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, Problem

SOURCE = "flash_bwd.cu"
WIDTHS = (32, 64, 96, 128, 192, 256)     # padded head dims with an instantiation
MAX_HEAD_DIM = WIDTHS[-1]
_CTYPES = {FLOAT16: "__half", BFLOAT16: "__nv_bfloat16"}
_MASK_CODES = {None: 0, "bool": 1, "bias": 2}
_BIAS_CODES = {FLOAT16: 0, BFLOAT16: 1, FLOAT32: 2, FLOAT64: 3}
_INT32_LIMIT = 2**31 - 1 - 4096
_SMEM_PORTABLE = 163 * 1024              # sm_80's opt-in limit: a second Q/dO stage only below it
PREP_ROWS_PER_BLOCK = 8

# Tests switch this on: dq (deterministic mode), dk, dv and the delta / lse2 workspaces are filled
# with NaN before the launches, so an element a kernel fails to write shows up. (The atomic dq
# workspace must start at zero and is not poisoned.)
POISON_OUTPUTS = False


# Main-kernel configurations: (BLOCK_M, BLOCK_N, NWARPS, KW, CW)
#   BLOCK_M query rows per inner tile, BLOCK_N keys per block, NWARPS warps,
#   KW keys per warp in the S/dP and dK/dV phases (16 or 32: KW/16 m-tiles share each B fragment),
#   CW query rows per warp in the dQ phase (16 or 32).
# The Q/dO double buffer (STAGES = 2) is used where it fits the device's shared memory.
# Candidates are listed best first; `main_config` takes the first whose shared memory fits.
# Per-thread registers ~ 2 * KW * HD / (16 * WQ) ... (dK, dV) + KW * MQ / 32 * 1.5 (P packed, dP),
# WQ = NWARPS * KW / BLOCK_N, MQ = BLOCK_M / WQ; every default compiles with zero spills.
_DEFAULTS = {
    32: [(64, 128, 8, 16, 16)],
    64: [(64, 128, 8, 16, 16)],
    96: [(64, 64, 8, 16, 16)],
    128: [(32, 128, 8, 16, 16)],
    192: [(64, 32, 8, 16, 16)],
    # Hopper (227 KB): 64 keys per block, warps of 32 keys, Q/dO double-buffered (~217 KB);
    # sm_80 (163 KB) cannot double-buffer it and the single-buffered form spills: old tiles there.
    256: [((64, 64, 8, 32, 16), 2), (64, 32, 8, 16, 16)],
}

# Tuning hook (tools/tune_flash_bwd.py): width -> (BLOCK_M, BLOCK_N, NWARPS, KW, CW) or
# ((BLOCK_M, BLOCK_N, NWARPS, KW, CW), STAGES). Overrides are not in kernel_specs(); they compile
# on first use.
CONFIG_OVERRIDE = {}


def _candidates(width: int):
    """[(config, forced stages or None)] for a padded head dim, override first."""
    raw = [CONFIG_OVERRIDE[width]] if width in CONFIG_OVERRIDE else _DEFAULTS[width]
    out = []
    for entry in raw:
        if len(entry) == 2 and isinstance(entry[0], tuple):
            out.append((tuple(entry[0]), int(entry[1])))
        else:
            out.append((tuple(entry), None))
    return out


def main_bytes(config, stages: int, width: int) -> int:
    """Dynamic shared memory of flash_bwd_kernel for `config` at padded head dim `width`."""
    bm, bn, nw, kw, _ = config
    wq = nw // (bn // kw)
    lds, ldp = width + 8, bm + 8
    return (2 * bn * lds + 2 * stages * bm * lds + (2 if wq > 1 else 1) * bn * ldp) * 2 + 2 * stages * bm * 4


def main_plan(width: int, smem_limit: int = _SMEM_PORTABLE):
    """(config, stages) of flash_bwd_kernel for a padded head dim on a device allowing
    `smem_limit` bytes of shared memory per block: the first candidate that fits, with two Q/dO
    stages where they fit (a candidate with forced stages is taken only at that depth)."""
    cands = _candidates(width)
    for config, stages in cands:
        if stages is not None:
            if main_bytes(config, stages, width) <= smem_limit:
                return config, stages
            continue
        return config, (2 if main_bytes(config, 2, width) <= smem_limit else 1)
    config, stages = cands[-1]
    return config, stages or 1


def main_config(width: int, smem_limit: int = _SMEM_PORTABLE):
    """(BLOCK_M, BLOCK_N, NWARPS, KW, CW) of flash_bwd_kernel for a padded head dim."""
    return main_plan(width, smem_limit)[0]


def dq_config(width: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, NWARPS) of flash_bwd_dq_kernel."""
    return (64, 64, 4) if width <= 128 else (64, 32, 4)


def main_stages(width: int, smem_limit: int = _SMEM_PORTABLE) -> int:
    return main_plan(width, smem_limit)[1]


def main_shared_bytes(width: int, smem_limit: int = _SMEM_PORTABLE) -> int:
    config, stages = main_plan(width, smem_limit)
    return main_bytes(config, stages, width)


def dq_shared_bytes(width: int) -> int:
    bm, bn, _ = dq_config(width)
    return (2 * bm + 4 * bn) * (width + 8) * 2


def padded_width(problem: Problem) -> int:
    need = max(problem.head_dim, problem.head_dim_v)
    return next(w for w in WIDTHS if w >= need)


def main_spec(dtype, width: int, masked: bool, smem_limit: int = _SMEM_PORTABLE, plan=None) -> KernelSpec:
    (bm, bn, nw, kw, cw), stages = plan or main_plan(width, smem_limit)
    return KernelSpec(SOURCE, f"flash_bwd_kernel<{_CTYPES[np.dtype(dtype)]}, {width}, {bm}, {bn}, {nw}, "
                              f"{kw}, {cw}, {stages}, {'true' if masked else 'false'}>")


def dq_spec(dtype, width: int, masked: bool) -> KernelSpec:
    bm, bn, nw = dq_config(width)
    return KernelSpec(SOURCE, f"flash_bwd_dq_kernel<{_CTYPES[np.dtype(dtype)]}, {width}, {bm}, {bn}, {nw}, "
                              f"{'true' if masked else 'false'}>")


def prep_spec(dtype) -> KernelSpec:
    return KernelSpec(SOURCE, f"flash_bwd_prep_kernel<{_CTYPES[np.dtype(dtype)]}>")


_SMEM_LIMITS = (99 * 1024, _SMEM_PORTABLE, 227 * 1024)   # sm_86/89/120, sm_80/87, sm_90/100


def _plans(width: int):
    """Every (config, stages) main_plan can return for `width` on some device: the choice only
    changes where the limit crosses one candidate's size, so those sizes and the known limits
    cover every device."""
    limits = set(_SMEM_LIMITS)
    for config, stages in _candidates(width):
        for st in ((stages,) if stages else (1, 2)):
            limits.add(main_bytes(config, st, width))
    limits = {limit for limit in limits if limit >= _SMEM_LIMITS[0]}   # sm_80+ devices allow >= 99 KB
    plans = []
    for limit in sorted(limits):
        if limit > 227 * 1024:
            continue
        plan = main_plan(width, limit)
        if main_bytes(plan[0], plan[1], width) <= limit and plan not in plans:
            plans.append(plan)
    return plans


def kernel_specs() -> List[KernelSpec]:
    """Every instantiation flash_backward can request (the prep kernel, and per dtype, width and
    mask the main kernel of every shared-memory plan and the deterministic dQ kernel)."""
    specs = list(_flash_bwd_sm90.kernel_specs())
    for dtype in (FLOAT16, BFLOAT16):
        specs.append(prep_spec(dtype))
        for width in WIDTHS:
            for masked in (False, True):
                for plan in _plans(width):
                    specs.append(main_spec(dtype, width, masked, plan=plan))
                specs.append(dq_spec(dtype, width, masked))
    return list(dict.fromkeys(specs))


# ---------------------------------------------------------------------------------------------
# Launch planning helpers (same conventions as _flash.py; kept here so the two files move apart
# freely)

def _levels(problem: Problem, tensors):
    nb = len(problem.batch_shape)
    return _collapse_batch(problem.batch_shape, [_elem_strides(t)[:nb] for t in tensors])


def _grids(problem: Problem, levels, smem_limit: int = _SMEM_PORTABLE):
    width = padded_width(problem)
    inner = math.prod(n for n, _ in levels[-2:]) if levels else 1
    bn = main_config(width, smem_limit)[1]
    dbm, _, _ = dq_config(width)
    main = -(-problem.len_k // bn) * problem.num_heads_kv * inner
    dq = -(-problem.len_q // dbm) * problem.num_heads_q * inner
    return main, dq


def backward_reasons(problem: Problem) -> List[str]:
    """Why flash_backward cannot run `problem` (empty list = it can)."""
    why, props = flash_input_reasons(problem, MAX_HEAD_DIM, _INT32_LIMIT)
    if props is None:
        return why
    smem = props[2]
    if not why:
        width = padded_width(problem)
        need = max(main_shared_bytes(width, smem), dq_shared_bytes(width))
        if need > smem:
            why.append(f"backward needs {need} bytes of shared memory per block, the device allows {smem}")
    if not why:
        tensors = [problem.q, problem.k, problem.v] + ([problem.mask] if problem.mask is not None else [])
        if max(_grids(problem, _levels(problem, tensors), smem)) > 2**31 - 1:
            why.append("more than 2^31 thread blocks in one launch")
    return why


def backward_notes(problem: Problem) -> List[str]:
    if not _flash_bwd_sm90.supports(problem):
        rows = problem.batch_size * problem.num_heads_q * problem.len_q
        return [f"backward kernel {_flash_bwd_sm90.kernel_name(problem.dtype, problem.head_dim)} (wgmma + TMA; "
                f"deterministic=True runs the mma.sync kernels)",
                f"{rows * (problem.head_dim + 2) * 4 / 2**20:.2f} MiB float32 dq/delta workspace"]
    width = padded_width(problem)
    try:
        smem = _device_props(problem.device_id)[2]
    except Exception:   # no driver or no device
        smem = _SMEM_PORTABLE
    out = [f"backward kernel {main_spec(problem.dtype, width, problem.mask is not None, smem).name}"]
    rows = problem.batch_size * problem.num_heads_q * problem.len_q
    out.append(f"{rows * (problem.head_dim + 2) * 4 / 2**20:.2f} MiB float32 dq/delta workspace")
    return out


def _contiguous_last(a, xp):
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return xp.ascontiguousarray(a)
    return a


def flash_backward(problem: Problem, dout, out, lse, deterministic: bool = False):
    """(dq, dk, dv) shaped like problem.q / problem.k / problem.v (batch_shape + (H, L, D)), in
    float32, except dk and dv from the Hopper kernel where nothing is left to sum (K and V not
    broadcast over batch entries): those come in the input dtype, final.

    dout, out: batch_shape + (Hq, Lq, Dv) in the input dtype; lse: batch_shape + (Hq, Lq) float32
    (natural log, -inf for rows that see no key). deterministic=True computes dQ without atomics
    in a second kernel (bitwise reproducible, slower); the default uses fp32 atomics.
    """
    import cupy
    from ._kernels import get_function, set_dynamic_shared_memory

    xp = cupy
    hq, hkv, lq, lk = problem.num_heads_q, problem.num_heads_kv, problem.len_q, problem.len_k
    d, dv_dim = problem.head_dim, problem.head_dim_v
    q, k, v = (_contiguous_last(a, xp) for a in (problem.q, problem.k, problem.v))
    mask = problem.mask
    masked = mask is not None
    dout = xp.ascontiguousarray(dout)
    out = xp.ascontiguousarray(out)
    lse = xp.ascontiguousarray(lse, dtype=np.float32)

    batch = problem.batch_size
    rows = batch * hq * lq
    hopper = not _flash_bwd_sm90.supports(problem, deterministic)
    # the Hopper kernel copies whole 64-row tiles of delta / lse2: rows padded, pads P-neutral
    pitch = _flash_bwd_sm90.row_pitch(lq) if hopper else lq
    delta = xp.empty(batch * hq * pitch, dtype=np.float32)
    lse2 = xp.empty(batch * hq * pitch, dtype=np.float32)
    if pitch != lq:
        delta.fill(0)
        lse2.fill(np.inf)
    dk_shape, dv_shape = problem.batch_shape + (hkv, lk, d), problem.batch_shape + (hkv, lk, dv_dim)
    # the Hopper kernel sums each K/V head's query group itself; the caller sums only over batch
    # entries that share a broadcast K or V, and needs float32 for that
    kv_final = hopper and math.prod(problem.k_shape) == math.prod(dk_shape) \
        and math.prod(problem.v_shape) == math.prod(dv_shape)
    kv_dtype = problem.dtype if kv_final else np.float32
    dk = xp.empty(dk_shape, dtype=kv_dtype)
    dv = xp.empty(dv_shape, dtype=kv_dtype)
    dq_shape = problem.batch_shape + (hq, lq, d)
    dq = xp.empty(dq_shape, dtype=np.float32) if deterministic else xp.zeros(dq_shape, dtype=np.float32)
    if POISON_OUTPUTS:
        for a in ((dk, dv) if pitch != lq else (delta, lse2, dk, dv)) + ((dq,) if deterministic else ()):
            if a.dtype.itemsize == 2:
                a.view(np.uint16).fill(0x7FFF)   # NaN in float16 and in bfloat16
            else:
                a.fill(np.nan)
    if rows == 0 or lk == 0 or batch * hkv == 0:   # nothing to compute (the API handles these first)
        dk.fill(0)
        dv.fill(0)
        dq.fill(0)
        return dq, dk, dv

    i32, i64 = np.int32, np.int64

    def ptr(a, off=0):
        return np.uint64(a.data.ptr + off * a.itemsize) if a is not None else np.uint64(0)

    prep = get_function(prep_spec(problem.dtype))
    prep((-(-rows // PREP_ROWS_PER_BLOCK),), (32 * PREP_ROWS_PER_BLOCK,),
         (ptr(dout), ptr(out), ptr(lse), ptr(delta), ptr(lse2), i64(rows), i32(dv_dim), i32(lq), i32(pitch)))
    if hopper:
        _flash_bwd_sm90.run_main(problem, dout, lse2, delta, dq, dk, dv)
        return dq, dk, dv

    width = padded_width(problem)
    smem_limit = _device_props(problem.device_id)[2]
    plan = main_plan(width, smem_limit)
    (bm, bn, nw, _, _), stages = plan
    dbm, dbn, dnw = dq_config(width)
    main_fn = get_function(main_spec(problem.dtype, width, masked, plan=plan))
    main_smem = main_bytes(plan[0], stages, width)
    set_dynamic_shared_memory(main_fn, main_smem)
    if deterministic:
        dq_fn = get_function(dq_spec(problem.dtype, width, masked))
        dq_smem = dq_shared_bytes(width)
        set_dynamic_shared_memory(dq_fn, dq_smem)

    tensors = [q, k, v] + ([mask] if masked else [])
    nb = len(problem.batch_shape)
    tail = [_elem_strides(t)[nb:] for t in tensors]          # (h, l[, k]) strides per tensor
    levels = _levels(problem, tensors)
    inner_levels = levels[-2:]
    while len(inner_levels) < 2:
        inner_levels = [(1, [0] * len(tensors))] + list(inner_levels)
    outer_levels = levels[:-2]
    launches = math.prod(n for n, _ in outer_levels) if outer_levels else 1
    (n0, st0), (n1, st1) = inner_levels
    launch_batch = n0 * n1
    q_rows = launch_batch * hq * lq            # rows of dout / lse2 / delta / dq per launch
    kv_rows = launch_batch * hkv * lk          # rows of dk / dv per launch

    mask_code = _MASK_CODES[problem.mask_kind]
    bias_code = _BIAS_CODES.get(np.dtype(mask.dtype), 0) if problem.mask_kind == "bias" else 0
    scale = float(problem.scale)
    scale_log2 = np.float32(scale * math.log2(math.e))
    num_n_blocks = -(-lk // bn)
    num_m_blocks = -(-lq // dbm)
    main_grid = num_n_blocks * hkv * launch_batch
    dq_grid = num_m_blocks * hq * launch_batch

    for launch in range(launches):
        offs = launch_offsets(launch, outer_levels, len(tensors))
        pq, pk, pv = ptr(q, offs[0]), ptr(k, offs[1]), ptr(v, offs[2])
        pm = ptr(mask, offs[3]) if masked else np.uint64(0)
        sq = (st0[0], st1[0]) + tuple(tail[0][:2])
        sk = (st0[1], st1[1]) + tuple(tail[1][:2])
        sv = (st0[2], st1[2]) + tuple(tail[2][:2])
        sm = ((st0[3], st1[3]) + tuple(tail[3][:3])) if masked else (0,) * 5
        qoff = launch * q_rows
        p_do = ptr(dout, qoff * dv_dim)
        vec = ((1 if vector_ok(d, pq, sq) else 0) | (2 if vector_ok(d, pk, sk) else 0)
               | (4 if vector_ok(dv_dim, pv, sv) else 0) | (8 if vector_ok(dv_dim, p_do, ()) else 0))
        p_l2, p_dl = ptr(lse2, qoff), ptr(delta, qoff)
        p_dq = ptr(dq, qoff * d)
        koff = launch * kv_rows
        strides = (*(i64(s) for s in sq), *(i64(s) for s in sk), *(i64(s) for s in sv),
                   *(i64(s) for s in sm))
        main_fn((main_grid,), (nw * 32,),
                (pq, pk, pv, pm, p_do, p_l2, p_dl, p_dq, ptr(dk, koff * d), ptr(dv, koff * dv_dim),
                 i32(lq), i32(lk), i32(d), i32(dv_dim), i32(hq), i32(problem.group_size), i32(n1),
                 i32(num_n_blocks), i32(problem.causal), i32(mask_code), i32(bias_code), i32(vec),
                 i32(0 if deterministic else 1), scale_log2, np.float32(scale), *strides),
                shared_mem=main_smem)
        if deterministic:
            dq_fn((dq_grid,), (dnw * 32,),
                  (pq, pk, pv, pm, p_do, p_l2, p_dl, p_dq,
                   i32(lq), i32(lk), i32(d), i32(dv_dim), i32(hq), i32(problem.group_size), i32(n1),
                   i32(num_m_blocks), i32(problem.causal), i32(mask_code), i32(bias_code), i32(vec),
                   scale_log2, np.float32(scale), *strides),
                  shared_mem=dq_smem)
    return dq, dk, dv
