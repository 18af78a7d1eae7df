"""The flash backend: tiled CUDA kernels with online softmax on tensor cores.

Forward: on sm_90 GPUs the Hopper kernel (kernels_cu/flash_fwd_sm90.cu, wgmma + TMA, see
_flash_sm90.py) runs whatever it supports; everything else runs the sm80 kernel below
(kernels_cu/flash_fwd.cu, mma.sync). Backward: kernels_cu/flash_bwd.cu (see _flash_bwd.py).

One kernel template, instantiated per dtype x padded head dim x mask kind; causal, GQA packing,
split-KV and the batch strides are runtime arguments. Inputs are read in place through their
strides (two batch levels per launch; more levels are looped over launches, never copied); only a
tensor whose last axis is not contiguous is copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from . import _flash_bwd, _flash_sm90
from ._kernels import KernelSpec
from ._layout import collapse_batch as _collapse_batch, device_props as _device_props, elem_strides as _elem_strides
from ._layout import flash_input_reasons, launch_offsets, vector_ok
from ._problem import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, Problem
from ._registry import Backend

SOURCE = "flash_fwd.cu"
WIDTHS = (32, 64, 96, 128, 160, 192, 224, 256)      # padded head dims with an instantiation
MAX_HEAD_DIM = WIDTHS[-1]
_CTYPES = {FLOAT16: "__half", BFLOAT16: "__nv_bfloat16"}
_MASK_KINDS = {None: 0, "bool": 1, "bias": 2}
_BIAS_CODES = {FLOAT16: 0, BFLOAT16: 1, FLOAT32: 2, FLOAT64: 3}
DECODE_MAX_LQ = 16          # split-KV and GQA packing for Lq up to this
MAX_SPLITS = 128
_INT32_LIMIT = 2**31 - 1 - 4096

# Tests switch this on: out and lse are filled with NaN before every launch, so an element the
# kernel fails to write shows up.
POISON_OUTPUTS = False

# False keeps the Hopper kernel out (tests use it to cover the sm80 kernel on an H100 too).
HOPPER_KERNEL = True



def config(width: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, NWARPS) for a padded head dim."""
    return (128, 64, 8) if width <= 128 else (64, 32, 4)


def shared_bytes(width: int) -> int:
    block_m, block_n, _ = config(width)
    return (block_m + 4 * block_n) * (width + 8) * 2      # Q + 2 stages x (K, V), 16-byte row padding


def padded_width(problem: Problem) -> int:
    need = max(problem.head_dim, problem.head_dim_v)
    return next(w for w in WIDTHS if w >= need)


def forward_spec(dtype, width: int, mask_kind: Optional[str]) -> KernelSpec:
    block_m, block_n, nwarps = config(width)
    return KernelSpec(SOURCE, f"flash_fwd_kernel<{_CTYPES[np.dtype(dtype)]}, {width}, {block_m}, "
                              f"{block_n}, {nwarps}, {_MASK_KINDS[mask_kind]}>")


def merge_spec(dtype) -> KernelSpec:
    return KernelSpec(SOURCE, f"flash_merge_kernel<{_CTYPES[np.dtype(dtype)]}>")


# ---------------------------------------------------------------------------------------------
# Launch planning (shared by notes and forward so explain says what forward does)

@dataclass
class _Plan:
    q: object
    k: object
    v: object
    copies: List[str]
    levels: list                # collapsed batch levels [(size, [q, k, v, mask strides])]
    width: int
    block_m: int
    block_n: int
    nwarps: int
    pack_gqa: bool
    num_m_blocks: int
    num_splits: int
    keys_per_split: int
    launches: int               # > 1 when more than two batch levels remain


def _contiguous_strides(shape) -> Tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _plan(problem: Problem, sms: Optional[int], materialize: bool = False) -> _Plan:
    """How forward launches `problem`. Copies (of a q/k/v whose last axis is not contiguous) are
    only made with materialize=True; otherwise their strides are those the copy would have."""
    copies = []
    arrays = {}
    strides = []
    for name in ("q", "k", "v"):
        a = getattr(problem, name)
        if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
            copies.append(name)
            if materialize:
                a = problem.xp.ascontiguousarray(a)
            strides.append(_contiguous_strides(a.shape))
        else:
            strides.append(_elem_strides(a))
        arrays[name] = a
    if problem.mask is not None:
        strides.append(_elem_strides(problem.mask))
    nb = len(problem.batch_shape)
    levels = _collapse_batch(problem.batch_shape, [st[:nb] for st in strides])
    launches = math.prod(n for n, _ in levels[:-2]) if len(levels) > 2 else 1

    width = padded_width(problem)
    block_m, block_n, nwarps = config(width)
    group = problem.group_size
    pack_gqa = group > 1 and problem.len_q <= DECODE_MAX_LQ
    rows = group * problem.len_q if pack_gqa else problem.len_q
    num_m_blocks = -(-rows // block_m)
    heads = problem.num_heads_kv if pack_gqa else problem.num_heads_q
    inner_batch = math.prod(n for n, _ in levels[-2:]) if levels else 1
    blocks = num_m_blocks * heads * inner_batch

    num_splits, keys_per_split = 1, problem.len_k
    if sms and problem.len_q <= DECODE_MAX_LQ and blocks < sms and problem.len_k >= 4 * block_n:
        want = min(max(1, (2 * sms) // blocks), -(-problem.len_k // (2 * block_n)), MAX_SPLITS)
        if want > 1:
            keys_per_split = -(-problem.len_k // want)
            keys_per_split = -(-keys_per_split // block_n) * block_n
            num_splits = -(-problem.len_k // keys_per_split)
            if num_splits == 1:
                keys_per_split = problem.len_k
    return _Plan(q=arrays["q"], k=arrays["k"], v=arrays["v"], copies=copies, levels=levels,
                 width=width, block_m=block_m, block_n=block_n, nwarps=nwarps, pack_gqa=pack_gqa,
                 num_m_blocks=num_m_blocks, num_splits=num_splits, keys_per_split=keys_per_split,
                 launches=launches)


def _sms_or_none(problem):
    try:
        return _device_props(problem.device_id)[3]
    except Exception:
        return None


class FlashBackend(Backend):
    name = "flash"

    def kernel_specs(self) -> List[KernelSpec]:
        specs = []
        for dtype in (FLOAT16, BFLOAT16):
            for width in WIDTHS:
                for kind in _MASK_KINDS:
                    specs.append(forward_spec(dtype, width, kind))
            specs.append(merge_spec(dtype))
        return specs + _flash_sm90.kernel_specs() + _flash_bwd.kernel_specs()

    @staticmethod
    def hopper_reasons(problem) -> List[str]:
        """Why the Hopper (wgmma + TMA) forward kernel does not run this problem (empty = it does)."""
        if not HOPPER_KERNEL:
            return ["switched off (cupyattn._flash.HOPPER_KERNEL = False)"]
        if problem.len_q <= DECODE_MAX_LQ:
            # 128-row query tiles would sit mostly empty; the sm80 kernel's decode path packs the
            # query heads of a group and splits the keys over blocks instead
            return [f"Lq={problem.len_q} <= {DECODE_MAX_LQ}: the decode path (split-KV) is faster"]
        return _flash_sm90.supports(problem)

    def forward_reasons(self, problem):
        why, props = flash_input_reasons(problem, MAX_HEAD_DIM, _INT32_LIMIT)
        lengths_ok = max(problem.len_q, problem.len_k) <= _INT32_LIMIT
        if problem.library == "cupy" and lengths_ok and problem.group_size * problem.len_q > _INT32_LIMIT:
            why.append("sequence length past 2^31 keys or queries")   # the decode path packs a group's rows
        if props is None:
            return why
        smem = props[2]
        if not why:
            need = shared_bytes(padded_width(problem))
            if need > smem:
                why.append(f"needs {need} bytes of shared memory per block, the device allows {smem}")
        # A launch covers at most the whole batch; only near the block limit is the exact launch
        # plan worth building (it costs host time on every call).
        if not why and -(-problem.len_q // 16) * problem.num_heads_q * problem.batch_size * MAX_SPLITS > 2**31 - 1:
            plan = _plan(problem, None)
            inner = math.prod(n for n, _ in plan.levels[-2:]) if plan.levels else 1
            heads = problem.num_heads_kv if plan.pack_gqa else problem.num_heads_q
            if plan.num_m_blocks * heads * inner * MAX_SPLITS > 2**31 - 1:
                why.append("more than 2^31 thread blocks in one launch")
        return why

    def backward_reasons(self, problem):
        return _flash_bwd.backward_reasons(problem)

    def backward(self, problem, dout, out, lse, deterministic=False):
        return _flash_bwd.flash_backward(problem, dout, out, lse, deterministic=deterministic)

    def notes(self, problem):
        if problem.library != "cupy":
            return []
        hopper_why = self.hopper_reasons(problem)
        if not hopper_why:
            grid = {"dynamic": "persistent grid drawing tiles on demand", "static": "persistent grid, static stride",
                    "per-tile": "one block per tile"}[_flash_sm90.grid_kind(problem)]
            config = _flash_sm90.tile_config(problem.head_dim, problem.len_k, problem.causal)
            return [f"Hopper kernel {_flash_sm90.kernel_name(problem.dtype, problem.head_dim, config)} "
                    f"(wgmma + TMA, warp-specialised, {grid})"] + _flash_bwd.backward_notes(problem)
        out = ["sm80 kernel (mma.sync) because the Hopper kernel cannot run: " + "; ".join(hopper_why)]
        return out + self._sm80_notes(problem) + _flash_bwd.backward_notes(problem)

    def _sm80_notes(self, problem):
        plan = _plan(problem, _sms_or_none(problem))
        spec = forward_spec(problem.dtype, plan.width, problem.mask_kind)
        out = [f"kernel {spec.name}"]
        if plan.width != problem.head_dim or plan.width != problem.head_dim_v:
            out.append(f"head dims padded to {plan.width} inside the kernel (no copy)")
        for name in plan.copies:
            out.append(f"copies {name} to make its last axis contiguous")
        if plan.launches > 1:
            out.append(f"{plan.launches} launches over the leading batch dims (more than two "
                       f"non-mergeable batch levels)")
        if plan.pack_gqa:
            out.append(f"decode path: {problem.group_size} query heads per kv head packed into one block")
        if plan.num_splits > 1:
            rows = problem.batch_size * problem.num_heads_q * problem.len_q
            extra = plan.num_splits * rows * (problem.head_dim_v + 1) * 4
            out.append(f"split-KV over {plan.num_splits} splits of {plan.keys_per_split} keys "
                       f"({extra / 2**20:.2f} MiB float32 partials, then a merge kernel)")
        return out

    def forward(self, problem, want_lse):
        if not self.hopper_reasons(problem):
            return _flash_sm90.forward(problem, checked=True)
        return self.forward_sm80(problem)

    def forward_sm80(self, problem):
        """The mma.sync kernel (any sm_80+ GPU); tests call it directly to cover it on Hopper too."""
        import cupy
        from ._kernels import get_function, set_dynamic_shared_memory

        plan = _plan(problem, _sms_or_none(problem), materialize=True)
        hq, lq, lk = problem.num_heads_q, problem.len_q, problem.len_k
        d, dv = problem.head_dim, problem.head_dim_v
        rows_shape = problem.batch_shape + (hq, lq)
        out = cupy.empty(rows_shape + (dv,), dtype=problem.dtype)
        lse = cupy.empty(rows_shape, dtype=np.float32)
        if POISON_OUTPUTS:   # NaN bit patterns (fill through uint16 so bfloat16 needs no cast kernel)
            out.view(np.uint16).fill(0x7FC0 if problem.dtype == BFLOAT16 else 0x7E00)
            lse.fill(np.nan)

        spec = forward_spec(problem.dtype, plan.width, problem.mask_kind)
        fn = get_function(spec)
        smem = shared_bytes(plan.width)
        set_dynamic_shared_memory(fn, smem)
        threads = plan.nwarps * 32

        q, k, v, mask = plan.q, plan.k, plan.v, problem.mask
        tensors = [q, k, v] + ([mask] if mask is not None else [])
        nb = len(problem.batch_shape)
        tail = [_elem_strides(t)[nb:] for t in tensors]          # (h, l[, k]) strides per tensor
        levels = plan.levels
        inner_levels = levels[-2:]
        while len(inner_levels) < 2:
            inner_levels = [(1, [0] * len(tensors))] + list(inner_levels)
        outer_levels = levels[:-2]
        (n0, st0), (n1, st1) = inner_levels
        launch_batch = n0 * n1
        launch_rows = launch_batch * hq * lq

        heads = problem.num_heads_kv if plan.pack_gqa else hq
        grid = plan.num_m_blocks * plan.num_splits * heads * launch_batch
        bias_code = _BIAS_CODES.get(np.dtype(mask.dtype), 0) if problem.mask_kind == "bias" else 0

        part_out = part_lse = None
        if plan.num_splits > 1:
            part_out = cupy.empty((plan.num_splits, launch_rows, dv), dtype=np.float32)
            part_lse = cupy.empty((plan.num_splits, launch_rows), dtype=np.float32)
            merge = get_function(merge_spec(problem.dtype))

        i32, i64 = np.int32, np.int64

        def ptr(a, off=0):
            return np.uint64(a.data.ptr + off * a.itemsize) if a is not None else np.uint64(0)

        for launch in range(plan.launches):
            # element offsets of this launch's slice of the looped (outer) batch levels
            offs = launch_offsets(launch, outer_levels, len(tensors))
            pq, pk, pv = ptr(q, offs[0]), ptr(k, offs[1]), ptr(v, offs[2])
            pm = ptr(mask, offs[3]) if mask is not None else np.uint64(0)
            sq = (st0[0], st1[0]) + tuple(tail[0][:2])
            sk = (st0[1], st1[1]) + tuple(tail[1][:2])
            sv = (st0[2], st1[2]) + tuple(tail[2][:2])
            sm = ((st0[3], st1[3]) + tuple(tail[3][:3])) if mask is not None else (0,) * 5
            vec = ((1 if vector_ok(d, pq, sq) else 0) | (2 if vector_ok(d, pk, sk) else 0)
                   | (4 if vector_ok(dv, pv, sv) else 0))
            out_off = launch * launch_rows
            o_ptr = np.uint64(out.data.ptr + out_off * dv * out.itemsize)
            l_ptr = np.uint64(lse.data.ptr + out_off * 4)
            args = (pq, pk, pv, pm, o_ptr, l_ptr,
                    ptr(part_out), ptr(part_lse),
                    i32(lq), i32(lk), i32(d), i32(dv), i32(hq), i32(problem.group_size), i32(n1),
                    i32(plan.num_m_blocks), i32(plan.num_splits), i32(plan.keys_per_split),
                    i32(problem.causal), i32(plan.pack_gqa), i32(bias_code), i32(vec),
                    np.float32(problem.scale * math.log2(math.e)), i64(launch_rows),
                    *(i64(s) for s in sq), *(i64(s) for s in sk), *(i64(s) for s in sv),
                    *(i64(s) for s in sm))
            fn((grid,), (threads,), args, shared_mem=smem)
            if plan.num_splits > 1:
                merge((launch_rows,), (128,),
                      (ptr(part_out), ptr(part_lse), o_ptr, l_ptr, i64(launch_rows),
                       i32(plan.num_splits), i32(dv)))
        return out, lse
