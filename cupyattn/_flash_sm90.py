"""Hopper (sm_90a) flash-attention forward: TMA + mbarrier ring + wgmma (kernels_cu/flash_fwd_sm90.cu).

Entry points for the flash backend:
    supports(problem) -> list[str]    reasons this kernel cannot run `problem` (empty = it can)
    kernel_specs() -> list[KernelSpec] every instantiation (for the CI compile gate)
    forward(problem) -> (out, lse)     out batch_shape + (Hq, Lq, Dv) in problem.dtype,
                                       lse batch_shape + (Hq, Lq) float32 (natural log)

The kernel reads q, k and v in place through TMA tensor maps built here from the arrays' real
strides (`cuTensorMapEncodeTiled` from the driver, libcuda.so.1, through ctypes). A tensor map has
at most 5 dims: (D, L, H, B1, B0). Batch axes are collapsed where the three inputs allow it; axes
of extent 1 are dropped; a batch axis with stride 0 (broadcast) gets extent 1 in that tensor's map
and coordinate 0 in the kernel; if more than two batch axes remain, the leading ones are looped
over on the host (one launch each).
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from typing import List, Tuple

import numpy as np

from ._kernels import KernelSpec, get_function, launch, set_dynamic_shared_memory
from ._layout import collapse_batch as _collapse_batch, device_props as _device_props
from ._problem import BFLOAT16, FLOAT16, Problem, dtype_name

SOURCE = "flash_fwd_sm90.cu"
# A configuration is (BN, STAGES) or (BN, STAGES, CONSUMERS): keys per tile, K/V ring stages and
# consumer warpgroups of 64 query rows each (2 when not given, or 3: a block of 64 * CONSUMERS
# rows and 128 * (CONSUMERS + 1) threads, see sm90::Roles in the kernel; full_config).
DEFAULT_CONSUMERS = 2
BLOCK_M = 64 * DEFAULT_CONSUMERS            # query rows per block with the default two consumers
THREADS = 128 * (DEFAULT_CONSUMERS + 1)     # producer warpgroup + two consumer warpgroups
# head dim -> (keys per tile BN, K/V ring stages[, consumer warpgroups]) of the default configuration.
# D=64 runs three consumer warpgroups (192 query rows per K/V tile, as FlashAttention-3 runs D=64):
# at 64 columns a tile's products are short, and two warpgroups' worth of rows per K/V tile leaves
# the tensor cores waiting (tools/ab_sm90.py on an H200, 2026-11-28, interleaved, TFLOP/s with
# (128,4,3) against two consumers' best config: L=4k 462 vs 408 full, 397 vs 373 causal; L=16k
# 526 vs 445 full, 488 vs 432 causal; cuDNN 432 / 397 / 444 / 429).
# D=256 runs BN=80 (FlashAttention-3's hdim-256 tile is 128 x 80): it fits once the consumers get
# 240 registers (sm90::Roles), and two stages of 80-key K and V tiles plus Q fill 224 KB of shared
# memory. Same tool, H200, 2026-11-28, bursts / sustained, TFLOP/s BN=80 vs BN=64: L=4k full
# 737 / 660 vs 710 / 619, causal 645 / 592 vs 620 / 554; L=16k full 767 / 708 vs 721 / 658,
# causal 749 / 680 vs 717 / 624; L=1k full 623 / 584 vs 599 / 552, causal 465 / 438 vs 462 / 431
# (cuDNN 732 / 625, 606 / 529, 689 / 636, 648 / 537, 642 / 585, 469 / 445).
CONFIGS = {64: (128, 4, 3), 128: (128, 2), 256: (80, 2)}
HEAD_DIMS = tuple(sorted(CONFIGS))
# Long key ranges (Lk >= LONG_KEYS) take wider key tiles: fewer online-softmax rescales and
# barrier rounds per key, which pays once a row has many tiles to walk and costs at short ones
# (tools/tune_sm90.py on an H200, 2026-11-28, same run: D=128 BN=176 vs 128 at L=16k +3% full,
# +15% causal, -4% at L=1k). D=256 has none: BN=96 does not fit shared memory. D=64 has none: with
# three consumers BN=192 does not fit 160 registers, and (128,4,3) beats two consumers' (192,3) at
# L=16k by 14-18%.
LONG_CONFIGS = {128: (176, 2)}
LONG_KEYS = 8192
# Full (non-causal) rows with Lk >= MEDIUM_KEYS at D=128 choose between BN=160, the widest tile
# whose ring leaves room for the O staging buffer of the deferred tile end, and the long tile
# (176, which does not defer but walks fewer tiles a key): 160 wherever it pads the last key tile
# with at least 1% of Lk fewer keys than 176 does (the deferral is worth ~1% at L=4k, 176's wider
# turns 1-2% at L >= 6k). tools/ab_sm90.py on an H200, 2026-11-28, interleaved, full rows, TFLOP/s
# 128 / 160 / 176: L=3k 576 / 564 / -; L=4k 568 / 583 / 572 and - / 576 / 560; L=5k - / 596 / 575;
# L=6k - / 585 / 599; L=7k - / 588 / 594; L=8k 585 / 605 / 615; L=16k - / 620 / 634; at 9cc6fe4,
# L=4600 - / 588 / 579 and L=9216 - / 640 / 615, the one point against the rule (paddings 64 / 112
# keys; rows move by 2-3% between calls). Causal rows keep 128 below LONG_KEYS (L=4k 507 / 501 /
# 483; L=2k 128 441, 160 421).
MEDIUM_FULL_CONFIGS = {128: (160, 2)}
MEDIUM_KEYS = 4096
# Short causal rows (Lk < SHORT_CAUSAL_KEYS) at D=64 keep two consumers: 128-row tiles waste less
# of the diagonal and give the scheduler more, shorter tiles to even out (same A/B, L=1k causal:
# 266 vs 244 TFLOP/s; L=1k full favours three consumers, 371 vs 352).
SHORT_CAUSAL_CONFIGS = {64: (128, 4)}
SHORT_CAUSAL_KEYS = 2048
# Instantiated (so the CI compile gate covers them) but never chosen by tile_config: for tools and
# tests that force them (forward(config=...), tools/ab_sm90.py). Three consumers get 160 registers
# a thread, which holds BN=128 and not BN=192 (ptxas spills).
EXTRA_CONFIGS = {64: [(128, 2, 3), (192, 3)]}
_CTYPES = {FLOAT16: "__half", BFLOAT16: "__nv_bfloat16"}
_TMA_DTYPE = {FLOAT16: 6, BFLOAT16: 9}    # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_MAX_LEN = 2**31 - 1024                   # TMA coordinates and row indices are int32
_SMEM_LIMIT = 227 * 1024


# Tests set this (or pass poison=True) to fill out and lse with NaN before every launch, so rows
# the kernel forgets to write cannot pass.
POISON_OUTPUTS = False

# How blocks find their tiles (see the top of kernels_cu/flash_fwd_sm90.cu):
#   "dynamic"   one block per SM, each drawing its next tile from a global counter;
#   "static"    one block per SM, block b taking tiles b, b + grid, b + 2 grid, ...;
#   "per-tile"  one block per tile, scheduled by the hardware.
GRIDS = ("dynamic", "static", "per-tile")
# None: choose per problem (grid_kind); a name from GRIDS forces it (tests, tuning).
GRID = None


def grid_kind(problem: Problem) -> str:
    """The persistent grid avoids a per-block prologue (barrier set-up, Q load, an empty K/V ring)
    and lets the producer load the next tile's keys under the current tile's math; drawing tiles
    on demand ("dynamic") also evens out causal tiles of uneven cost, which a static stride does
    not. tools/ab_sm90.py on an H100 (2026-11-28, interleaved rounds, TFLOP/s dynamic / static /
    per-tile): D=128 L=4k causal 532 / 500 / 489, L=16k causal 575 / 514 / 579; D=64 L=4k full
    409 / 406 / 381. The exception is D=256 with long causal rows (L=16k: 610 / 392 / 687): a
    block draws its next tile when it starts the current one, and with tiles this long that
    claim ahead leaves SMs idle at the end, where the hardware hands a free SM the next block.
    The module's GRID, when set, overrides the choice."""
    if GRID is not None:
        return GRID
    if problem.causal and problem.head_dim == 256 and problem.len_k >= LONG_KEYS:
        return "per-tile"
    return "dynamic"


def full_config(config) -> Tuple[int, int, int]:
    """(BN, STAGES, CONSUMERS) of a configuration given as (BN, STAGES) (two consumers) or
    (BN, STAGES, CONSUMERS)."""
    try:
        return _FULL_CONFIGS[config]     # a call asks several times, for a handful of configs
    except (KeyError, TypeError):        # TypeError: a list, which cannot be a key
        pass
    c = tuple(int(x) for x in config)
    if len(c) == 2:
        c += (DEFAULT_CONSUMERS,)
    if len(c) != 3 or c[2] not in (2, 3):
        raise ValueError(f"a configuration is (BN, STAGES) or (BN, STAGES, CONSUMERS in 2, 3), not {config!r}")
    if isinstance(config, tuple):
        _FULL_CONFIGS[config] = c
    return c


_FULL_CONFIGS = {}


def block_m(config) -> int:
    """Query rows per block (tile) of a configuration: 64 per consumer warpgroup."""
    return 64 * full_config(config)[2]


def threads(config) -> int:
    """Threads per block of a configuration: the producer warpgroup and the consumers."""
    return 128 * (full_config(config)[2] + 1)


def tile_config(head_dim: int, len_k: int = 0, causal: bool = False) -> Tuple[int, int, int]:
    """(BN, STAGES, CONSUMERS) the kernel runs with for this head dim, number of keys and mask."""
    if causal and len_k < SHORT_CAUSAL_KEYS and head_dim in SHORT_CAUSAL_CONFIGS:
        return full_config(SHORT_CAUSAL_CONFIGS[head_dim])
    if not causal and len_k >= MEDIUM_KEYS and head_dim in MEDIUM_FULL_CONFIGS:
        medium = MEDIUM_FULL_CONFIGS[head_dim]
        wide = LONG_CONFIGS.get(head_dim, medium)
        padding = [-len_k % cfg[0] for cfg in (medium, wide)]   # keys the last key tile is short of BN
        return full_config(medium if padding[0] + len_k // 100 <= padding[1] else wide)
    if len_k >= LONG_KEYS and head_dim in LONG_CONFIGS:
        return full_config(LONG_CONFIGS[head_dim])
    return full_config(CONFIGS[head_dim])


def configs(head_dim: int) -> List[Tuple[int, int, int]]:
    """Every (BN, STAGES, CONSUMERS) tile_config can choose for a head dim."""
    out = [full_config(CONFIGS[head_dim])]
    for table in (LONG_CONFIGS, MEDIUM_FULL_CONFIGS, SHORT_CAUSAL_CONFIGS):
        if head_dim in table and full_config(table[head_dim]) not in out:
            out.append(full_config(table[head_dim]))
    return out


def instantiated_configs(head_dim: int) -> List[Tuple[int, int, int]]:
    """Every (BN, STAGES, CONSUMERS) instantiated for a head dim: configs() and EXTRA_CONFIGS."""
    out = configs(head_dim)
    for c in EXTRA_CONFIGS.get(head_dim, ()):
        if full_config(c) not in out:
            out.append(full_config(c))
    return out


def kernel_name(dtype, head_dim: int, config=None) -> str:
    """The C++ name of the instantiation for `dtype`, `head_dim` and `config` (default:
    CONFIGS[head_dim]). Two consumers is the template's default and stays unnamed, so the
    name also fits sources from before the parameter (tools/ab_sm90.py compiles old revisions)."""
    bn, stages, consumers = full_config(config or CONFIGS[head_dim])
    extra = "" if consumers == DEFAULT_CONSUMERS else f", {consumers}"
    return f"flash_fwd_sm90_kernel<{_CTYPES[np.dtype(dtype)]}, {head_dim}, {bn}, {stages}{extra}>"


@functools.lru_cache(maxsize=None)
def spec_for(dtype, head_dim: int, config=None) -> KernelSpec:
    """The instantiation for `dtype`, `head_dim` and `config` (cached: CONFIGS is fixed once a
    process has launched a kernel; tools/tune_sm90.py changes it only before that)."""
    return KernelSpec(source=SOURCE, name=kernel_name(dtype, head_dim, config), hopper_only=True)


def kernel_specs() -> List[KernelSpec]:
    """Every instantiation forward() can request."""
    return [spec_for(dt, d, c) for dt in (FLOAT16, BFLOAT16) for d in HEAD_DIMS for c in instantiated_configs(d)]


def _plain_smem_bytes(head_dim: int, config) -> Tuple[int, int]:
    """(bytes without an O staging buffer, bytes of Q) of sm90::Plan: Q, the K/V ring, the
    barriers (Q full/empty per consumer; K, V full/empty per stage), the tile queue (80) and the
    slack for aligning the base (1024)."""
    bn, stages, consumers = full_config(config or CONFIGS[head_dim])
    q = 64 * consumers * head_dim * 2
    bars = 2 * consumers + 4 * stages
    return q + 2 * stages * bn * head_dim * 2 + 8 * bars + 80 + 1024, q


def smem_bytes(head_dim: int, config=None) -> int:
    """Dynamic shared memory of one block; mirrors sm90::Plan in the kernel source."""
    return _smem_bytes(head_dim, full_config(config or CONFIGS[head_dim]))


@functools.lru_cache(maxsize=None)
def _smem_bytes(head_dim: int, config: Tuple[int, int, int]) -> int:
    plain, q = _plain_smem_bytes(head_dim, config)
    return plain + (q if defers_tile_end(head_dim, config) else 0)


def defers_tile_end(head_dim: int, config=None) -> bool:
    """Whether the kernel stages O in a buffer of its own and defers each tile's last PV product
    and epilogue into the next tile's first turn (sm90::Plan::kDeferEnd): two consumers, where
    the second Q-sized buffer fits in 227 KB."""
    plain, q = _plain_smem_bytes(head_dim, config)
    return full_config(config or CONFIGS[head_dim])[2] == 2 and plain + q <= _SMEM_LIMIT


assert all(smem_bytes(d, c) <= _SMEM_LIMIT for d in HEAD_DIMS for c in instantiated_configs(d))


# ---------------------------------------------------------------------------------------------
# What the kernel can run

def _base_address(a) -> int:
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return a.data.ptr


def _layout_reasons(name: str, a) -> List[str]:
    """Why TMA cannot describe the (..., H, L, D) view `a` (empty = it can)."""
    return list(_layout_reasons_of(name, a.shape, a.strides, a.itemsize, _base_address(a) % 16 != 0))


@functools.lru_cache(maxsize=1024)   # asked for q, k and v on every call, mostly of a few layouts
def _layout_reasons_of(name: str, shape, strides, item: int, misaligned: bool) -> Tuple[str, ...]:
    reasons = []
    if shape[-1] > 1 and strides[-1] != item:
        reasons.append(f"{name}'s last axis is not contiguous (stride {strides[-1] // item} elements)")
    for axis in range(len(shape) - 2, -1, -1):
        label = {len(shape) - 2: "L", len(shape) - 3: "H"}.get(axis, f"batch axis {axis}")
        n, st = shape[axis], strides[axis]
        if n <= 1:
            continue
        if st < 0:
            reasons.append(f"{name} has a negative stride on its {label} axis")
        elif st == 0:
            if label == "L":
                reasons.append(f"{name} is broadcast along its sequence axis (stride 0)")
        elif st % 16:
            reasons.append(f"{name}'s {label} stride ({st} bytes) is not a multiple of 16 bytes")
        elif st >= 2**40:
            reasons.append(f"{name}'s {label} stride ({st} bytes) is too large for a tensor map")
    if misaligned:
        reasons.append(f"{name}'s base address is not 16-byte aligned")
    return tuple(reasons)


def _device_reason(problem: Problem):
    try:
        major, minor = _device_props(problem.device_id)[:2]
    except Exception as exc:   # no driver / no device
        return f"no CUDA device ({type(exc).__name__})"
    if (major, minor) != (9, 0):
        return f"needs an sm_90 (Hopper) GPU, device is sm_{major}{minor}"
    return None


def tma_kernel_reasons(problem: Problem, head_dims, kernel: str, mask_goes_to: str) -> List[str]:
    """What rules a Hopper (TMA + wgmma) flash kernel out for `problem`, grid limits aside: no CuPy
    arrays on an sm_90 GPU, a dtype other than float16/bfloat16, D != Dv or a head dim not in
    `head_dims`, a mask, lengths past int32 tile coordinates, inputs a tensor map cannot describe.
    `kernel` names the kernel in the messages, `mask_goes_to` where masked problems run instead."""
    reasons = []
    if problem.library != "cupy":
        reasons.append(f"inputs are NumPy arrays (the {kernel} needs CuPy arrays on an sm_90 GPU)")
    else:
        why = _device_reason(problem)
        if why:
            reasons.append(why)
    if problem.dtype not in _CTYPES:
        reasons.append(f"dtype {dtype_name(problem.dtype)} (the {kernel} runs float16 and bfloat16)")
    if problem.head_dim != problem.head_dim_v:
        reasons.append(f"D={problem.head_dim} != Dv={problem.head_dim_v} (the {kernel} needs D == Dv)")
    if problem.head_dim not in head_dims:
        reasons.append(f"head dim {problem.head_dim} is not instantiated for the {kernel} (only {list(head_dims)})")
    if problem.mask is not None:
        reasons.append(f"mask/bias given (masks run on {mask_goes_to})")
    if problem.len_q > _MAX_LEN or problem.len_k > _MAX_LEN:
        reasons.append("sequence length too long for int32 tile coordinates")
    for name, a in (("q", problem.q), ("k", problem.k), ("v", problem.v)):
        reasons.extend(_layout_reasons(name, a))
    return reasons


def supports(problem: Problem) -> List[str]:
    """Reasons this kernel cannot compute the forward of `problem` (empty list = it can)."""
    reasons = tma_kernel_reasons(problem, HEAD_DIMS, "sm90 kernel", "the sm80 flash kernel")
    num_m = -(-problem.len_q // BLOCK_M)   # the smallest block (two consumers): the most tiles
    if num_m * problem.batch_size * problem.num_heads_q >= 2**30:
        reasons.append("more than 2^30 tiles in one launch (tile numbers plus the grid must fit int32)")
    return reasons


# ---------------------------------------------------------------------------------------------
# Tensor maps (cuTensorMapEncodeTiled through ctypes)

class TensorMapError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _encode_fn():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise TensorMapError(
            "the sm90 flash kernel needs the CUDA driver library libcuda.so.1 to build TMA tensor "
            f"maps (cuTensorMapEncodeTiled), and it could not be loaded: {exc}") from None
    try:
        fn = lib.cuTensorMapEncodeTiled
    except AttributeError:
        raise TensorMapError("libcuda.so.1 has no cuTensorMapEncodeTiled (driver older than CUDA 12)") from None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


_TMAP_DTYPE = np.dtype([("v", "<u8", (16,))])   # 128 bytes, passed by value to the kernel


# Encoded maps by (address, dtype, dims, strides, box): a training loop hands the same buffers back
# call after call (CuPy's memory pool reuses addresses), and encoding costs tens of microseconds of
# host time, as much as a whole short attention call on the GPU. A map holds no reference to the
# memory, so a stale entry is only ever reused for the very same address and layout.
_TMAP_CACHE: "dict" = {}
_TMAP_CACHE_SIZE = 256


def tensor_map(address: int, dtype, dims, strides_bytes, box) -> np.ndarray:
    """encode_tensor_map through a small cache (see _TMAP_CACHE)."""
    key = (address, dtype, tuple(dims), tuple(strides_bytes), tuple(box))
    tmap = _TMAP_CACHE.get(key)
    if tmap is None:
        if len(_TMAP_CACHE) >= _TMAP_CACHE_SIZE:
            _TMAP_CACHE.pop(next(iter(_TMAP_CACHE)))    # oldest first (dicts keep insertion order)
        tmap = _TMAP_CACHE[key] = encode_tensor_map(address, dtype, dims, strides_bytes, box)
    return tmap


def encode_tensor_map(address: int, dtype, dims, strides_bytes, box) -> np.ndarray:
    """A CUtensorMap for tiled TMA loads (zero fill out of bounds) and stores (out-of-bounds
    elements not written) with 128-byte swizzle.

    dims: extents innermost first (dims[0] contiguous); strides_bytes: the byte strides of
    dims[1:]; box: the tile extents. Returns a one-element numpy structured array (128 bytes)
    that CuPy passes by value to a `const __grid_constant__` 64-byte-aligned struct parameter.
    """
    fn = _encode_fn()
    rank = len(dims)
    raw = (ctypes.c_uint8 * (128 + 64))()              # the driver wants a 64-byte aligned CUtensorMap
    ptr = (ctypes.addressof(raw) + 63) // 64 * 64
    c_dims = (ctypes.c_uint64 * rank)(*dims)
    c_strides = (ctypes.c_uint64 * max(rank - 1, 1))(*strides_bytes)
    c_box = (ctypes.c_uint32 * rank)(*box)
    c_elem = (ctypes.c_uint32 * rank)(*([1] * rank))
    status = fn(ptr, _TMA_DTYPE[np.dtype(dtype)], rank, ctypes.c_void_p(address), c_dims, c_strides,
                c_box, c_elem, 0,   # CU_TENSOR_MAP_INTERLEAVE_NONE
                3,                  # CU_TENSOR_MAP_SWIZZLE_128B
                2,                  # CU_TENSOR_MAP_L2_PROMOTION_L2_128B
                0)                  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (zeros)
    if status != 0:
        raise TensorMapError(
            f"cuTensorMapEncodeTiled failed with CUresult {status} (address 0x{address:x}, dims {list(dims)}, "
            f"strides {list(strides_bytes)} bytes, box {list(box)})")
    out = np.zeros(1, dtype=_TMAP_DTYPE)
    out.view(np.uint8)[:] = np.frombuffer(ctypes.string_at(ptr, 128), dtype=np.uint8)
    del raw
    return out


# ---------------------------------------------------------------------------------------------
# Batch axes: collapse what the three inputs allow (_layout.collapse_batch), then split into
# (looped, B0, B1)

def batch_split(problem: Problem, arrays):
    """How the batch axes of `arrays` (each batch_shape + (H, L, D)) are launched: the leading
    axes looped over on the host and two kept in every tensor map, as
    (looped [(size, byte strides)], (nb0, byte strides), (nb1, byte strides))."""
    nbatch = len(problem.batch_shape)
    axes = _collapse_batch(problem.batch_shape, [a.strides[:nbatch] for a in arrays])
    looped, kept = axes[:-2], list(axes[-2:])   # more than two batch axes: loop over the leading ones
    while len(kept) < 2:
        kept.insert(0, (1, (0,) * len(arrays)))
    return looped, kept[0], kept[1]


def launch_maps(arrays, shapes, idx, split, dtype, head_dim: int):
    """The tensor maps of one launch and their broadcast bits.

    arrays[t] is read as (D, L, H, B1, B0) with shapes[t] = (heads, length, box rows); idx is the
    launch's index over the looped batch axes of `split` (batch_split). Bits 3t..3t+2 of the
    returned mask say that array t's H, B1, B0 axis is broadcast (extent 1 in the map)."""
    looped, (nb0, st0), (nb1, st1) = split
    placeholder = head_dim * dtype.itemsize   # stride for dims of extent 1 (any multiple of 16 works)
    maps, bcast = [], 0
    for t, (a, (heads, length, box_rows)) in enumerate(zip(arrays, shapes)):
        offset = sum(i * st[t] for i, (_, st) in zip(idx, looped))
        l_ext, l_st, _ = _dim_entry(length, a.strides[-2], placeholder)
        h_ext, h_st, h_b = _dim_entry(heads, a.strides[-3], placeholder)
        b1_ext, b1_st, b1_b = _dim_entry(nb1, st1[t], placeholder)
        b0_ext, b0_st, b0_b = _dim_entry(nb0, st0[t], placeholder)
        bcast |= (h_b | (b1_b << 1) | (b0_b << 2)) << (3 * t)
        maps.append(tensor_map(a.data.ptr + offset, dtype, (head_dim, l_ext, h_ext, b1_ext, b0_ext),
                               (l_st, h_st, b1_st, b0_st), (64, box_rows, 1, 1, 1)))
    return maps, bcast


def out_map(address: int, dtype, head_dim: int, len_q: int, heads: int, nb1: int, nb0: int) -> np.ndarray:
    """The tensor map the kernel's TMA-store epilogue writes out through: out of one launch is
    contiguous (nb0, nb1, heads, len_q, head_dim) from `address`, mapped (D, L, H, B1, B0) like q
    (never broadcast, so no bcast bits) with a box of 64 columns x 64 rows (one consumer
    warpgroup's rows, one 128-byte swizzle chunk; the kernel stores D/64 boxes)."""
    item = np.dtype(dtype).itemsize
    row = head_dim * item
    placeholder = row
    dims, strides = [head_dim], []
    stride = row
    for extent in (len_q, heads, nb1, nb0):
        ext, st, _ = _dim_entry(extent, stride, placeholder)
        dims.append(ext)
        strides.append(st)
        stride *= extent
    return tensor_map(address, dtype, tuple(dims), tuple(strides), (64, 64, 1, 1, 1))


def launch_indices(split):
    """(launch number, index over the looped batch axes) of every launch."""
    return enumerate(itertools.product(*[range(n) for n, _ in split[0]]))


def _dim_entry(extent, stride, placeholder):
    """(extent, stride, broadcast?) of one map dim: stride-0 axes become extent 1."""
    if extent <= 1:
        return 1, placeholder, False
    if stride == 0:
        return 1, placeholder, True
    return extent, stride, False


def forward(problem: Problem, poison=None, grid=None, checked=False, config=None) -> Tuple[object, object]:
    """(out, lse): out batch_shape + (Hq, Lq, D) in problem.dtype, lse batch_shape + (Hq, Lq) float32.

    poison: fill the outputs with NaN before the launch (default: the module's POISON_OUTPUTS);
    grid: one of GRIDS; default: grid_kind(problem);
    config: (BN, STAGES) or (BN, STAGES, CONSUMERS), one of instantiated_configs(D) (tests,
    tools); default: tile_config(D, Lk);
    checked: the caller has just seen supports(problem) come back empty (saves asking twice)."""
    reasons = [] if checked else supports(problem)
    if reasons:
        raise ValueError("the sm90 flash kernel cannot run this problem: " + "; ".join(reasons))
    import cupy
    poison = POISON_OUTPUTS if poison is None else poison
    grid = grid_kind(problem) if grid is None else grid
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, not {grid!r}")
    D, Lq, Lk, Hq, Hkv = problem.head_dim, problem.len_q, problem.len_k, problem.num_heads_q, problem.num_heads_kv
    dtype = problem.dtype
    out = cupy.empty(problem.batch_shape + (Hq, Lq, D), dtype=dtype)
    lse = cupy.empty(problem.batch_shape + (Hq, Lq), dtype=np.float32)
    if poison:
        out.view(np.uint16).fill(0x7FFF)   # NaN in float16 and in bfloat16
        lse.fill(np.nan)
    if out.size == 0 and lse.size == 0:
        return out, lse
    if Lk == 0:
        out.fill(0)
        lse.fill(-np.inf)
        return out, lse

    q, k, v = problem.q, problem.k, problem.v
    split = batch_split(problem, (q, k, v))
    (nb0, _), (nb1, _) = split[1], split[2]

    config = full_config(config) if config is not None else tile_config(D, Lk, problem.causal)
    if config[2] != DEFAULT_CONSUMERS and D != 64:
        raise ValueError(f"{config[2]} consumer warpgroups are instantiated for D=64 only, not D={D}")
    bn = config[0]
    group = Hq // Hkv
    num_m = -(-Lq // block_m(config))
    num_bh = nb0 * nb1 * Hq
    num_tiles = num_m * num_bh
    device_id = problem.device_id
    fn = get_function(spec_for(dtype, D, config), cupy.cuda.Device(device_id))
    nbytes = smem_bytes(D, config)
    blocks = num_tiles if grid == "per-tile" else min(num_tiles, _sm_count(device_id))
    sched = np.uint64(_scheduler_counters(device_id).data.ptr if grid == "dynamic" else 0)
    set_dynamic_shared_memory(fn, nbytes)
    swz_bh = _swizzle_width(device_id, Lk, D, group, num_bh, problem.causal)
    scale_log2 = np.float32(problem.scale * math.log2(math.e))
    item = dtype.itemsize

    # out and lse are contiguous (B, Hq, Lq, D) / (B, Hq, Lq): each launch writes the next
    # per_launch batch entries, addressed by pointer (no per-launch views)
    per_launch = nb0 * nb1
    out_step = per_launch * Hq * Lq * D * item
    lse_step = per_launch * Hq * Lq * 4
    shapes = ((Hq, Lq, 64), (Hkv, Lk, bn), (Hkv, Lk, bn))
    for launch_no, idx in launch_indices(split):
        maps, bcast = launch_maps((q, k, v), shapes, idx, split, dtype, D)
        o_ptr = out.data.ptr + launch_no * out_step
        o = np.uint64(o_ptr)
        s = np.uint64(lse.data.ptr + launch_no * lse_step)
        # the last argument, tm_o, is new with the TMA-store epilogue: sources from before it
        # (tools/ab_sm90.py) do not declare it and the launch ignores it
        launch(fn, blocks, threads(config),
               (maps[0], maps[1], maps[2], o, s, np.int32(Lq), np.int32(Lk), np.int32(Hq), np.int32(group),
                np.int32(nb1), np.int32(num_m), np.int32(num_bh), np.int32(swz_bh), np.int32(problem.causal),
                np.int32(bcast), scale_log2, np.int32(num_tiles), sched,
                out_map(o_ptr, dtype, D, Lq, Hq, nb1, nb0)),
               shared_mem=nbytes)
    return out, lse


_counters = {}
_PER_THREAD_STREAM = 2


def _scheduler_counters(device_id: int):
    """The dynamic scheduler's two int32 counters for the current stream of `device_id`. They must
    be zero when a launch starts; the kernel leaves them zero when it ends, so launches on one
    stream (which run one after the other) can share them without a memset. Streams get their own:
    launches on two streams may run at once."""
    import cupy
    ptr = cupy.cuda.get_current_stream(device_id).ptr
    # the per-thread default stream has one handle (cudaStreamPerThread = 2) for a different stream
    # in every host thread
    key = (device_id, ptr, threading.get_ident() if ptr == _PER_THREAD_STREAM else 0)
    buf = _counters.get(key)
    if buf is None:
        buf = _counters[key] = cupy.zeros(2, dtype=np.int32)
    return buf


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy
    try:
        return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])
    except Exception:
        return 132


@functools.lru_cache(maxsize=None)
def _l2_bytes(device_id: int) -> int:
    import cupy
    try:
        return int(cupy.cuda.runtime.getDeviceProperties(device_id)["l2CacheSize"])
    except Exception:
        return 50 * 2**20


# Tests may force the width of the (batch, head) groups of the block order (None = from L2 size).
SWIZZLE_WIDTH = None
# Causal rows with at least this many keys schedule all (batch, head) pairs as one group.
CAUSAL_GROUP_KEYS = 8192


def _swizzle_width(device_id, Lk, D, group, num_bh, causal=False) -> int:
    """(batch, head) pairs whose tiles are scheduled together (the block order walks one group's
    tiles, heaviest first, before the next group's).

    Full rows take one pair at a time: the ~132 blocks in flight then read the K and V of a few
    heads, which stay in L2 (ncu, H200, D=128 L=4k: DRAM reads 589 -> 202 MB, L2 hit rate 77 ->
    91%). Causal rows with fewer than CAUSAL_GROUP_KEYS keys group as many pairs as keep K and V
    in half of L2, rounded up to a divisor of the pair count (a short last group ends the launch
    on its heavy diagonal tiles: D=256 L=4k causal, 32 pairs, width 16 636 TFLOP/s, 15 564);
    longer causal rows take all pairs in one group, whose heaviest-first order balances the
    blocks best. tools/ab_sm90.py on an H200, 2026-11-28, TFLOP/s in bench-like bursts / under
    sustained load, this rule against the former one (full: K and V of a group in half of L2;
    causal: one group): full D=128 L=1k 593 / 564 vs 561 / 527, L=4k 672 / 562 vs 654 / 559,
    L=16k 687 / 618 vs 662 / 607, D=256 L=4k 714 / 604 vs 703 / 601; causal L=1k D=128 455 /
    396 vs 373 / 351, D=256 464 / 418 vs 385 / 362, D=64 297 / 264 vs 295 / 271; L=4k D=128 623
    / 539 vs 576 / 539, D=256 626 / 562 vs 630 / 592 (the same config read 557 in another call),
    D=64 446 / 400 vs 434 / 402; at L=16k the groups lose as often as they gain (D=128 702 / 607
    vs 686 / 620, D=64 536 / 482 vs 537 / 491)."""
    if SWIZZLE_WIDTH is not None:
        return int(min(max(SWIZZLE_WIDTH, 1), num_bh))
    if not causal:
        return 1
    if Lk >= CAUSAL_GROUP_KEYS:
        return int(num_bh)
    kv_bytes_per_q_head = max(1, 2 * Lk * D * 2 // group)
    width = max(1, (_l2_bytes(device_id) // 2) // kv_bytes_per_q_head)
    if width >= num_bh:
        return int(num_bh)
    # a divisor within a factor 2 above the L2 width, else the L2 width and a short last group
    return next((w for w in range(width, min(2 * width, num_bh) + 1) if num_bh % w == 0), width)
