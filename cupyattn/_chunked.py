"""The chunked (memory-efficient) backend: query chunks over all keys in a bounded workspace.

One Python driver serves NumPy and CuPy. The batch axes are folded into the head axis where the
arrays' strides allow it as a view (`fold_batch`), else the driver goes one batch element at a
time. The (Hkv, G, Lq) query rows are cut into rectangular chunks (several kv heads, several
groups of one head, or a range of rows of one query head), sized so the chunk's intermediates fit
the workspace budget. Per chunk:

    S   = Q_c K^T                  (batched GEMM; float32 result for half inputs, never rounded)
    P   = fused softmax step(S)    (scale, causal, mask/bias, row max/sum, normalise, lse)
    O_c = P V                      (batched GEMM)

P is stored in the input dtype (for half inputs that is what the P V product on tensor cores
consumes; cuBLAS needs both operands in one type, and it halves P's memory), scores and lse in the
accumulation dtype; O_c is written by the P V product itself (float32 accumulation inside cuBLAS,
one rounding to the output dtype). Score rows have a pitch of a multiple of 8 elements
(`row_pitch`), so the fused kernels use 16-byte vector loads.
Causal problems are cut into tiles of rows along the diagonal (several heads each, `row_tile`), and
a tile's products and softmax stop at the last key its last row can see, so the work above the
diagonal is mostly skipped; as a tile's score rows are shorter, its chunks hold more rows (up to
the same workspace bytes, `problem_chunks`), so early tiles take many heads per product.
GQA: K/V are never repeated; the G query heads of one kv head are a broadcast (stride 0) batch
axis of the GEMM, folded into its rows when the layout allows.

Backward recomputes P per chunk from the saved lse (same fused kernel), then
dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)) * scale (fused kernel),
dQ_c = dS K, dK += dS^T Q_c. P is never stored for the whole problem.

On CuPy the GEMMs call cuBLAS (cublasGemmStridedBatchedEx) directly on the strided memory, so no
operand is copied or transposed per chunk (an input cuBLAS cannot read in place, with no unit
stride in its last two axes or negative strides, is copied once per call), half inputs accumulate
and write float32 and dK/dV accumulate in place (beta = 1); the fused steps are the kernels of
kernels_cu/chunked_softmax.cu. The Python per chunk is only integer address arithmetic: cuBLAS'
arguments, the launch shapes and the kernels' constant arguments are planned once per call and
chunk shape (`GemmPlan`, `_ChunkPlan`), so the GPU, not the host, sets the pace.
On NumPy the same driver runs the same chunks with NumPy (the fused steps reuse the eager
backend's softmax_rows / probs_from_lse), so CI exercises the chunking without a GPU; the CuPy
path's planning and address arithmetic run on NumPy memory in the tests too (an emulated device).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

import numpy as np

from . import _kernels
from ._eager import _errstate, causal_allowed, probs_from_lse, softmax_rows
from ._kernels import KernelSpec
from ._problem import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, HALF_DTYPES, Problem
from ._registry import Backend

SOURCE = "chunked_softmax.cu"
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
DEVICE_FRACTION = 0.25            # the default budget is capped at this fraction of free device memory
EAGER_INTERMEDIATES = 4           # eager keeps about this many score-sized arrays alive at once

_global_workspace: Optional[int] = None
_call_workspace: contextvars.ContextVar = contextvars.ContextVar("cupyattn_workspace", default=None)


def _check_bytes(nbytes) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"workspace bytes must be an integer, got {nbytes!r}")
    if nbytes <= 0:
        raise ValueError(f"workspace bytes must be positive, got {nbytes}")
    return int(nbytes)


def set_workspace_bytes(nbytes: Optional[int]) -> None:
    """Set the chunked backend's workspace budget in bytes for every later call (None: default,
    256 MiB capped at a quarter of the device's free memory)."""
    global _global_workspace
    _global_workspace = None if nbytes is None else _check_bytes(nbytes)


def get_workspace_bytes() -> Optional[int]:
    """The budget set with set_workspace_bytes or the innermost `workspace(...)` block (None: default)."""
    local = _call_workspace.get()
    return local if local is not None else _global_workspace


@contextlib.contextmanager
def workspace(nbytes: int):
    """Within the block, the chunked backend (and auto's choice) uses this workspace budget:
    `with cupyattn.workspace(64 << 20): out = cupyattn.attention(q, k, v)`."""
    token = _call_workspace.set(_check_bytes(nbytes))
    try:
        yield
    finally:
        _call_workspace.reset(token)


def workspace_budget(problem: Problem) -> int:
    explicit = get_workspace_bytes()
    if explicit is not None:
        return explicit
    if problem.library == "cupy":
        try:
            import cupy
            with cupy.cuda.Device(problem.device_id):
                free = cupy.cuda.runtime.memGetInfo()[0] + cupy.get_default_memory_pool().free_bytes()
            return max(1 << 20, min(DEFAULT_WORKSPACE_BYTES, int(free * DEVICE_FRACTION)))
        except Exception:  # no device to ask: keep the default
            pass
    return DEFAULT_WORKSPACE_BYTES


# ---------------------------------------------------------------------------------------------
# Planning: how many query rows a chunk holds.

def p_dtype(problem: Problem) -> np.dtype:
    """P (and dS) are stored in the input dtype: float16/bfloat16 for half inputs (what cuBLAS
    multiplies with V / K / Q of that dtype), else the accumulation dtype itself."""
    return problem.dtype


ROW_ALIGN = 8                     # score rows start every multiple of 8 elements (16-byte vectors)


def row_pitch(n: int) -> int:
    """Elements between consecutive score rows of a chunk with n keys."""
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def bytes_per_row(problem: Problem, direction: str) -> int:
    """Workspace bytes one query row of a chunk needs (scores over all Lk keys, padded pitch)."""
    cs = problem.compute_dtype.itemsize
    ps = p_dtype(problem).itemsize
    half = problem.dtype in HALF_DTYPES
    lk = row_pitch(problem.len_k)
    if direction == "forward":
        # S (accumulation dtype); P separate for half inputs (else written over S)
        return lk * cs + (lk * ps if half else 0)
    # S then dP (accumulation dtype) and P then dS (input dtype; a second accumulation-dtype
    # buffer when P is written over S).
    return lk * (cs + ps)


def chunk_rows(problem: Problem, direction: str, budget: Optional[int] = None) -> int:
    """Query rows per chunk: as many as fit the budget (at least one), at most one batch element."""
    budget = workspace_budget(problem) if budget is None else budget
    per_batch = problem.num_heads_q * problem.len_q
    return max(1, min(per_batch, budget // max(1, bytes_per_row(problem, direction))))


def workspace_bytes_used(problem: Problem, direction: str, budget: Optional[int] = None) -> int:
    return chunk_rows(problem, direction, budget) * bytes_per_row(problem, direction)


Chunk = Tuple[int, int, int, int, int, int]   # kv heads h0:h1, groups g0:g1, rows r0:r1

CAUSAL_TILES = 8                  # a causal chunk covers about 1/8 of the rows (work ~ 9/16 of full)
MIN_CAUSAL_TILE = 256             # rows; smaller tiles make the products too thin
CAUSAL_TILE_ALIGN = 64            # tile rows are a multiple of this (whole GEMM tiles)


def row_tile(problem: Problem) -> int:
    """Query rows per tile: all of them, or for causal problems a slice of the diagonal so that a
    chunk's key range (up to its last row's last visible key) skips most of the upper triangle."""
    if not problem.causal:
        return max(1, problem.len_q)
    return row_tile_for(problem.len_q)


def row_tile_for(len_q: int, tiles: Optional[int] = None, min_rows: Optional[int] = None) -> int:
    """Causal row tile for len_q queries: about len_q / tiles rows (default CAUSAL_TILES), a
    multiple of CAUSAL_TILE_ALIGN, at least min_rows (default MIN_CAUSAL_TILE)."""
    tiles = CAUSAL_TILES if tiles is None else tiles
    min_rows = MIN_CAUSAL_TILE if min_rows is None else min_rows
    if len_q <= min_rows:
        return max(1, len_q)
    per_tile = -(-len_q // tiles)
    tile = max(min_rows, -(-per_tile // CAUSAL_TILE_ALIGN) * CAUSAL_TILE_ALIGN)
    return min(len_q, tile)


def iter_chunks(num_heads_kv: int, group: int, len_q: int, rows: int,
                tile: Optional[int] = None) -> Iterator[Chunk]:
    """Rectangular chunks of at most `rows` query rows covering (Hkv, G, Lq) of one batch element.

    Rows are cut in tiles of `tile` rows (default all); a chunk holds whole tiles of several kv
    heads, or of several groups of one kv head, or a part of one tile of one query head."""
    tile = len_q if tile is None else max(1, min(tile, len_q))
    per_head = group * tile
    if rows >= per_head:
        step = rows // per_head
        for h0 in range(0, num_heads_kv, step):
            for r0 in range(0, len_q, tile):
                yield h0, min(h0 + step, num_heads_kv), 0, group, r0, min(r0 + tile, len_q)
    elif rows >= tile:
        step = rows // tile
        for h in range(num_heads_kv):
            for g0 in range(0, group, step):
                for r0 in range(0, len_q, tile):
                    yield h, h + 1, g0, min(g0 + step, group), r0, min(r0 + tile, len_q)
    else:
        for h in range(num_heads_kv):
            for g in range(group):
                for t0 in range(0, len_q, tile):
                    t1 = min(t0 + tile, len_q)
                    for r0 in range(t0, t1, rows):
                        yield h, h + 1, g, g + 1, r0, min(r0 + rows, t1)

def visible_keys(problem: Problem, r1: int) -> int:
    """Keys a chunk ending at query row r1 (exclusive) needs: causal rows stop at the diagonal."""
    if not problem.causal:
        return problem.len_k
    return max(0, min(problem.len_k, r1 + problem.len_k - problem.len_q))


ChunkKeys = Tuple[int, int, int, int, int, int, int]   # a Chunk and the keys n it needs


def problem_chunks(problem: Problem, rows: int, tile: Optional[int] = None) -> List[ChunkKeys]:
    """The chunks of one batch element (the same for every one) with their key counts:
    (h0, h1, g0, g1, r0, r1, n); chunks whose rows see no key are left out.

    The workspace buffers hold `rows` score rows of all Lk keys. Without causal tiles every chunk
    has at most `rows` rows (iter_chunks). Causal problems go tile by tile along the diagonal, and
    a tile whose last row sees n_t keys takes rows * row_pitch(Lk) // row_pitch(n_t) rows: the same
    buffers hold more of the shorter score rows, so the tiles near the start take several heads
    per chunk (fewer, larger products and launches) and no chunk's blocks outgrow the buffers."""
    tile = row_tile(problem) if tile is None else max(1, tile)
    lq, hkv, group = problem.len_q, problem.num_heads_kv, problem.group_size
    chunks = []
    if tile >= lq:
        for h0, h1, g0, g1, r0, r1 in iter_chunks(hkv, group, lq, rows):
            n = visible_keys(problem, r1)
            if n > 0:
                chunks.append((h0, h1, g0, g1, r0, r1, n))
        return chunks
    capacity = rows * row_pitch(problem.len_k)          # elements of each workspace buffer
    for t0 in range(0, lq, tile):
        t1 = min(t0 + tile, lq)
        n_tile = visible_keys(problem, t1)
        if n_tile == 0:
            continue                                    # no row of the tile sees a key
        for h0, h1, g0, g1, r0, r1 in iter_chunks(hkv, group, t1 - t0, capacity // row_pitch(n_tile)):
            n = visible_keys(problem, t0 + r1)
            if n > 0:
                chunks.append((h0, h1, g0, g1, t0 + r0, t0 + r1, n))
    return chunks


def _grouped(problem: Problem, a):
    """(Hq, X, Y) -> (Hkv, G, X, Y) (always a view)."""
    return a.reshape((problem.num_heads_kv, problem.group_size) + a.shape[1:])


# ---------------------------------------------------------------------------------------------
# The array-library-specific pieces. Each steps object makes the per-call "runners" the driver
# calls once per batch element with the chunk list: forward_runner(...)(bi, chunks).

def _swap(a):
    return a.swapaxes(-1, -2)


def _block(buf, cshape, n):
    """A chunk's (heads, groups, rows, n) score block at the start of a workspace buffer, rows
    `row_pitch(n)` elements apart."""
    pitch = row_pitch(n)
    return buf[:math.prod(cshape) * pitch].reshape(cshape + (pitch,))[..., :n]


class _NumpySteps:
    """The chunk steps in NumPy (float64 / float32 math like the kernels), on array views."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.ct = problem.compute_dtype

    def gemm(self, c, a, b, accumulate=False):
        """c (=|+=) a @ b over broadcast batch axes; axes where c has size 1 and a/b do not are summed."""
        r = np.matmul(a.astype(self.ct, copy=False), b.astype(self.ct, copy=False))
        axes = tuple(i for i in range(r.ndim - 2) if c.shape[i] == 1 and r.shape[i] != 1)
        if axes:
            r = r.sum(axis=axes, keepdims=True)
        if accumulate:
            c += r
        else:
            c[...] = r

    def _visible(self, s, mask, r0):
        problem, ct = self.problem, self.ct
        s *= ct.type(problem.scale)
        if problem.mask_kind == "bias":
            s += mask.astype(ct)
        allowed = None
        if problem.causal:
            n = s.shape[-1]
            rows = s.shape[-2]
            allowed = causal_allowed(np, problem.len_q, problem.len_k)[r0:r0 + rows, :n]
        if problem.mask_kind == "bool":
            allowed = mask if allowed is None else (allowed & mask)
        if allowed is not None:
            np.copyto(s, ct.type(-np.inf), where=~np.broadcast_to(allowed, s.shape))
        return s

    def softmax(self, s, p, lse, mask, r0):
        with _errstate(np):
            probs, row_lse = softmax_rows(np, self._visible(s, mask, r0))
        p[...] = probs
        lse[...] = row_lse

    def recompute(self, s, p, lse, mask, r0):
        with _errstate(np):
            p[...] = probs_from_lse(np, self._visible(s, mask, r0), lse)

    def dscores(self, p, dp, dout, out):
        ct = self.ct
        delta = (dout.astype(ct) * out.astype(ct)).sum(axis=-1, keepdims=True)
        p[...] = p.astype(ct) * (dp - delta) * ct.type(self.problem.scale)

    def forward_runner(self, out, lse, s_buf, p_buf):
        problem = self.problem

        def run(bi, chunks):
            q, k, v = _grouped(problem, problem.q[bi]), problem.k[bi], problem.v[bi]
            mask = None if problem.mask is None else _grouped(problem, problem.mask[bi])
            out_b, lse_b = _grouped(problem, out[bi]), _grouped(problem, lse[bi][..., None])[..., 0]
            for h0, h1, g0, g1, r0, r1, n in chunks:
                cshape = (h1 - h0, g1 - g0, r1 - r0)
                s = _block(s_buf, cshape, n)
                p = _block(p_buf, cshape, n)
                self.gemm(s, q[h0:h1, g0:g1, r0:r1], _swap(k[h0:h1, None, :n]))
                m = None if mask is None else mask[h0:h1, g0:g1, r0:r1, :n]
                self.softmax(s, p, lse_b[h0:h1, g0:g1, r0:r1], m, r0)
                # O_c = P V straight into the output (accumulated in the compute dtype, one rounding)
                self.gemm(out_b[h0:h1, g0:g1, r0:r1], p, v[h0:h1, None, :n])
        return run

    def backward_runner(self, dout, out, lse, dq, dk, dv, s_buf, p_buf, dp_buf):
        problem = self.problem

        def run(bi, chunks):
            q, k, v = _grouped(problem, problem.q[bi]), problem.k[bi], problem.v[bi]
            mask = None if problem.mask is None else _grouped(problem, problem.mask[bi])
            do_b, o_b = _grouped(problem, dout[bi]), _grouped(problem, out[bi])
            lse_b = _grouped(problem, lse[bi][..., None])[..., 0]
            dq_b, dk_b, dv_b = _grouped(problem, dq[bi]), dk[bi], dv[bi]
            for h0, h1, g0, g1, r0, r1, n in chunks:
                cshape = (h1 - h0, g1 - g0, r1 - r0)
                s = _block(s_buf, cshape, n)
                p = _block(p_buf, cshape, n)
                dp = _block(dp_buf, cshape, n)
                qc, doc = q[h0:h1, g0:g1, r0:r1], do_b[h0:h1, g0:g1, r0:r1]
                self.gemm(s, qc, _swap(k[h0:h1, None, :n]))
                m = None if mask is None else mask[h0:h1, g0:g1, r0:r1, :n]
                self.recompute(s, p, lse_b[h0:h1, g0:g1, r0:r1], m, r0)
                self.gemm(dv_b[h0:h1, None, :n], _swap(p), doc, accumulate=True)
                self.gemm(dp, doc, _swap(v[h0:h1, None, :n]))
                self.dscores(p, dp, doc, o_b[h0:h1, g0:g1, r0:r1])
                self.gemm(dq_b[h0:h1, g0:g1, r0:r1], p, k[h0:h1, None, :n])
                self.gemm(dk_b[h0:h1, None, :n], _swap(p), qc, accumulate=True)
        return run


_CUDA_TYPES = {FLOAT16: ("__half", 2), BFLOAT16: ("__nv_bfloat16", 14),
               FLOAT32: ("float", 0), FLOAT64: ("double", 1)}     # cudaDataType values
_MASK_TYPES = (None, "bool") + tuple(_CUDA_TYPES)


def _mask_cxx(mask_type) -> str:
    if mask_type is None:
        return "chunked::NoMask"
    if mask_type == "bool":
        return "bool"
    return _CUDA_TYPES[np.dtype(mask_type)][0]


def softmax_spec(dtype, mask_type, recompute: bool, vpt: Optional[int] = None) -> KernelSpec:
    """The softmax step's kernel. Forward: `vpt` > 0 is the register-row kernel (each thread keeps
    vpt 16-byte vectors of its row in registers; default `forward_vpt`), vpt = 0 the shared-memory
    / two-pass kernel for the rows that do not fit. The recompute variant has no row to keep (0)."""
    dtype = np.dtype(dtype)
    t = _CUDA_TYPES[dtype][0]
    if recompute:
        vpt = 0
    elif vpt is None:
        vpt = forward_vpt(8 if dtype == FLOAT64 else 4)
    return KernelSpec(SOURCE, f"chunk_softmax<{t}, {_mask_cxx(mask_type)}, "
                              f"{'true' if recompute else 'false'}, {int(vpt)}>")


def dscores_spec(dtype) -> KernelSpec:
    return KernelSpec(SOURCE, f"chunk_dscores<{_CUDA_TYPES[np.dtype(dtype)][0]}>")


def all_specs() -> List[KernelSpec]:
    """Every kernel the chunked backend may launch: per dtype and mask type the forward's register
    rows and shared-memory / two-pass kernels, the recompute, and dscores per dtype."""
    specs = [softmax_spec(d, m, r, v) for d in _CUDA_TYPES for m in _MASK_TYPES
             for r, v in ((False, None), (False, 0), (True, 0))]
    return specs + [dscores_spec(d) for d in _CUDA_TYPES]


VECTORS_PER_THREAD = 4            # 16-byte vectors each thread of a row handles (about)
MAX_ROW_THREADS = 512
BLOCK_THREADS = 256               # short rows: several rows per block of this many threads
# Forward softmax, register rows: 16-byte vectors each thread keeps in registers, per accumulation
# itemsize: 8 float4 (32 registers) or 4 double2 (16; double exp needs many more), so that the
# kernel stays within 64 registers and two blocks of 512 threads share an SM. Rows of up to
# MAX_ROW_THREADS * vpt vectors (16384 float scores, 4096 double) live in registers; longer rows
# (and masks whose keys are not contiguous) use the shared-memory / two-pass kernel.
FORWARD_VPT = {4: 8, 8: 4}
REGISTER_ROW_MIN_THREADS = 32     # register rows are whole warps


def forward_vpt(itemsize: int) -> int:
    """Register vectors per thread of the forward softmax for an accumulation type of `itemsize`."""
    return FORWARD_VPT[itemsize]


def launch_shape(n: int, itemsize: int) -> Tuple[int, int, int]:
    """(threads per row, rows per block, 16-byte vectors per row) for rows of n accumulation-type
    elements: a power of two of threads per row (4..512) giving each about 4 vectors. The
    recompute and dscores kernels, and the forward's shared-memory / two-pass kernel."""
    vectors = max(1, -(-n * itemsize // 16))
    tpr = 4
    while tpr < MAX_ROW_THREADS and tpr * VECTORS_PER_THREAD < vectors:
        tpr *= 2
    return tpr, max(1, BLOCK_THREADS // tpr), vectors


def register_launch_shape(n: int, itemsize: int, vpt: int) -> Tuple[int, int, int]:
    """(threads per row, rows per block, vectors per row) of the forward's register rows, `vpt`
    vectors per thread: the fewest threads (32..512, whole warps) whose registers hold the row,
    e.g. float rows of 4096 keys: 128 threads, 2 rows per block; 16384 keys: 512 threads, one
    row per block. Needs vectors <= 512 * vpt. (Tools may replace it to try other shapes: the
    kernel takes any power of two >= 32 threads per row with tpr * vpt >= vectors, and blocks
    of at most 512 threads.)"""
    vectors = max(1, -(-n * itemsize // 16))
    tpr = REGISTER_ROW_MIN_THREADS
    while tpr < MAX_ROW_THREADS and tpr * vpt < vectors:
        tpr *= 2
    return tpr, max(1, BLOCK_THREADS // tpr), vectors


def forward_launch(n: int, itemsize: int, vpt: int, smem_limit: int,
                   unit_mask: bool = True) -> Tuple[int, int, int, int, bool]:
    """The forward softmax launch on rows of n accumulation-type elements:
    (kernel vpt, threads per row, rows per block, dynamic shared memory bytes, resident).

    Register rows (kernel vpt = `vpt` > 0) when the row fits 512 threads' registers and the mask
    (if any) has unit key stride: one read of S, no shared memory. Otherwise the vpt = 0 kernel
    with `launch_shape`: resident rows in shared memory when they fit `smem_limit` bytes per
    block, else two passes over S (no shared memory)."""
    vectors = max(1, -(-n * itemsize // 16))
    if vpt > 0 and unit_mask and vectors <= vpt * MAX_ROW_THREADS:
        tpr, rpb, _ = register_launch_shape(n, itemsize, vpt)
        return vpt, tpr, rpb, 0, True
    tpr, rpb, vectors = launch_shape(n, itemsize)
    smem = rpb * vectors * 16
    resident = 0 < smem <= smem_limit
    return 0, tpr, rpb, (smem if resident else 0), resident


_smem_limits = {}


def resident_smem_limit(device_id: int) -> int:
    """Dynamic shared memory a softmax block may use to keep its rows resident (one read of S)."""
    if device_id not in _smem_limits:
        import cupy
        try:
            optin = int(cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])
        except Exception:  # attribute missing: the portable 48 KB
            optin = 48 * 1024
        _smem_limits[device_id] = max(0, min(optin - 2048, 200 * 1024))
    return _smem_limits[device_id]


# ---------------------------------------------------------------------------------------------
# The CuPy path. Python per cuBLAS call or launch costs more than a chunk's GPU work when it
# builds array views and analyses strides every time, so everything that is the same for every
# chunk is worked out once per call: the arrays' address arithmetic (`_Tensor`), one `GemmPlan`
# per product and chunk shape (cuBLAS' integer arguments, strides and the byte offsets of its
# calls), the launch shapes and the kernels' constant arguments. Per chunk only integer addresses
# are added up and cuBLAS / the kernels are called with them; no CuPy array is made.

def _layout(shape, strides):
    """(cuBLAS op flag, leading dimension) for a row-major (r, c) operand view, or None when
    neither axis has unit stride."""
    r, c = shape
    sr, sc = strides
    if sr < 0 or sc < 0:
        return None
    if sc == 1 or c == 1:
        return 0, (sr if r > 1 else max(c, 1))     # memory is col-major X^T: op N
    if sr == 1 or r == 1:
        return 1, (sc if c > 1 else max(r, 1))     # memory is col-major X: op T
    return None


def _ld_ok(shape, layout) -> bool:
    """cuBLAS needs a leading dimension of at least the stored column-major matrix's rows."""
    op, ld = layout
    r, c = shape
    return ld >= max(1, c if op == 0 else r)


def gemm_ready(shape, strides) -> bool:
    """Whether a whole array (element strides) is a cuBLAS operand in place, and so is every
    chunk's part of it: no negative stride, unit stride along one of its last two axes and a
    valid leading dimension. Other arrays are copied once per call (`_CupySteps._tensor`)."""
    if min(strides, default=0) < 0:
        return False
    layout = _layout(shape[-2:], strides[-2:])
    return layout is not None and _ld_ok(shape[-2:], layout)


@dataclass(frozen=True)
class GemmOperand:
    """One operand of a chunk's product as planned: a (batch..., rows, cols) view's shape and
    element strides (broadcast axes: size 1 or stride 0), cudaDataType and itemsize. Its address
    is not part of it: that comes per chunk."""
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    ctype: int
    itemsize: int


@dataclass(frozen=True)
class GemmPlan:
    """The cublasGemmStridedBatchedEx calls of one product c (=|+=) a @ b of one chunk shape.

    Row-major C = A B is column-major C^T = B^T A^T, so cuBLAS' A is our b and its B our a: the
    fields are cuBLAS' arguments (strides in elements). `calls` holds, per call, the byte offsets
    added to our a's, b's and c's addresses and whether it accumulates (beta = 1)."""
    transa: int
    transb: int
    m: int
    n: int
    k: int
    a_type: int
    lda: int
    stride_a: int
    b_type: int
    ldb: int
    stride_b: int
    c_type: int
    ldc: int
    stride_c: int
    count: int
    calls: Tuple[Tuple[int, int, int, bool], ...]


@functools.lru_cache(maxsize=4096)
def plan_gemm(a: GemmOperand, b: GemmOperand, c: GemmOperand, accumulate: bool) -> GemmPlan:
    """Plan c (=|+=) a @ b over broadcast batch axes (axes where c has size 1 are summed).

    c must have unit stride along its last axis (only our buffers and outputs are passed); a and b
    must be `gemm_ready`. Cached across calls: the arguments are only shapes, strides and types."""
    nb = len(c.shape) - 2
    batch = tuple(max(x, y, z) for x, y, z in zip(a.shape[:nb], b.shape[:nb], c.shape[:nb]))
    M, K = a.shape[-2:]
    N = b.shape[-1]
    assert b.shape[-2] == K and tuple(c.shape[-2:]) == (M, N), (a.shape, b.shape, c.shape)
    if M == 0 or N == 0 or math.prod(batch) == 0:
        return GemmPlan(0, 0, 0, 0, 0, a.ctype, 1, 0, b.ctype, 1, 0, c.ctype, 1, 0, 0, calls=())

    def broadcast(op):   # strides of `op` broadcast to the batch shape (like broadcast_to)
        return [0 if (op.shape[i] == 1 and batch[i] != 1) else op.strides[i] for i in range(nb)] + list(op.strides[nb:])
    sa, sb, sc = broadcast(a), broadcast(b), broadcast(c)
    ma, mb, mc = sa[-2:], sb[-2:], sc[-2:]
    if K > 0:
        for op, s in ((a, sa), (b, sb)):
            if not gemm_ready(op.shape[-2:], s):
                raise AssertionError(f"chunked gemm: operand {op} is not a cuBLAS operand in place")
    assert mc[1] == 1 or N == 1, "chunked gemm: C needs unit stride along its last axis"
    # batch axes as (size, stride in a, in b, in c), size-1 axes dropped
    axes = [(batch[i], sa[i], sb[i], sc[i]) for i in range(nb) if batch[i] != 1]
    # Fold the innermost batch axis into M when B is broadcast along it (the G query heads
    # of one kv head become rows), or into K when C is (a sum over the G heads).
    # (Only while the leading dimensions stay valid for the taller matrix: a transposed
    # operand's rows may continue at the next batch entry with a leading dimension too short.)
    def valid(m, k):
        return all(lay is not None and _ld_ok(shape, lay)
                   for shape, lay in (((m, k), _layout((m, k), ma)), ((k, N), _layout((k, N), mb))))
    while axes:
        n, xa, xb, xc = axes[-1]
        if xb == 0 and xc != 0 and xa == M * ma[0] and xc == M * mc[0] and M > 0 and valid(M * n, K):
            M *= n
        elif xc == 0 and xa == K * ma[1] and xb == K * mb[0] and K > 0 and valid(M, K * n):
            K *= n
        else:
            break
        axes.pop()
    # Merge adjacent batch axes with compatible strides.
    merged = []
    for ax in axes:
        if merged:
            n0, a0, b0, c0 = merged[-1]
            n, xa, xb, xc = ax
            if a0 == n * xa and b0 == n * xb and c0 == n * xc:
                merged[-1] = (n0 * n, xa, xb, xc)
                continue
        merged.append(ax)
    # cuBLAS' own batch: the largest axis C is not shared along (the innermost of equal ones);
    # the others are a loop of calls.
    own = [i for i, ax in enumerate(merged) if ax[3] != 0]
    if own:
        count, str_a, str_b, str_c = merged.pop(max(own, key=lambda i: (merged[i][0], i)))
    else:
        count, str_a, str_b, str_c = 1, 0, 0, 0
    if K > 0:
        la, lb = _layout((M, K), ma), _layout((K, N), mb)     # after folding M or K
    else:                    # nothing to multiply: cuBLAS writes beta * C; any valid layout
        la, lb = (0, 1), (0, max(N, 1))
    ldc = mc[0] if M > 1 else max(N, 1)
    assert _ld_ok((M, K), la) and _ld_ok((K, N), lb) and ldc >= max(1, N), "chunked gemm: leading dimension"
    calls = []
    written = set()
    for idx in np.ndindex(*[m[0] for m in merged]):
        oa = sum(i * m[1] for i, m in zip(idx, merged))
        ob = sum(i * m[2] for i, m in zip(idx, merged))
        oc = sum(i * m[3] for i, m in zip(idx, merged))
        # a sum over an axis C is shared along: the first call to a C block overwrites, the
        # others add (C blocks of different calls are the same memory or disjoint)
        calls.append((oa * a.itemsize, ob * b.itemsize, oc * c.itemsize, accumulate or oc in written))
        written.add(oc)
    # row-major C = A B  <=>  col-major C^T = B^T A^T
    return GemmPlan(transa=lb[0], transb=la[0], m=N, n=M, k=K,
                    a_type=b.ctype, lda=lb[1], stride_a=str_b,
                    b_type=a.ctype, ldb=la[1], stride_b=str_a,
                    c_type=c.ctype, ldc=ldc, stride_c=str_c, count=count, calls=tuple(calls))


class _Tensor:
    """Address arithmetic for one whole array in the grouped form (batch..., Hkv, G, L[, C]):
    element (bi, h, g, r, 0) lies at base(bi) + h*bh + g*bg + r*br bytes.

    `strides` are the (h, g, r, c) element strides. Arrays of Hq heads (`group` = G) split their
    head axis like `_grouped`; arrays of Hkv heads (`group` None: K, V, dK, dV) get g stride 0,
    the axis every query head of a group shares (the `None` axis of the views)."""
    __slots__ = ("array", "ptr", "batch", "strides", "bh", "bg", "br")

    def __init__(self, array, ptr: int, nbatch: int, group: Optional[int]):
        itemsize = array.itemsize
        byte = tuple(int(s) for s in array.strides)
        assert all(s % itemsize == 0 for s in byte)
        self.array = array                      # keeps a copy made for this call alive
        self.ptr = int(ptr)
        self.batch = byte[:nbatch]
        sh, sr, sc = (byte[nbatch:] + (0,))[:3]     # lse has no column axis
        bh, bg = (group * sh, sh) if group else (sh, 0)
        self.bh, self.bg, self.br = bh, bg, sr
        self.strides = tuple(s // itemsize for s in (bh, bg, sr, sc))

    def base(self, bi) -> int:
        """Address of batch element bi's first element."""
        return self.ptr + sum(i * s for i, s in zip(bi, self.batch))

    def operand(self, shape, ctype, transpose=False) -> GemmOperand:
        """The (h, g, r, c) view of `shape` as a GEMM operand (transpose: its last two axes swapped)."""
        st = self.strides
        if transpose:
            shape, st = shape[:2] + (shape[3], shape[2]), st[:2] + (st[3], st[2])
        return GemmOperand(tuple(shape), tuple(st), ctype, self.array.itemsize)


def _block_operand(cshape, n, dtype, transpose=False) -> GemmOperand:
    """A workspace block (`_block`) as a GEMM operand: C-contiguous rows of pitch row_pitch(n)."""
    hh, gg, rr = cshape
    pitch = row_pitch(n)
    shape, strides = (hh, gg, rr, n), (gg * rr * pitch, rr * pitch, pitch, 1)
    if transpose:
        shape, strides = (hh, gg, n, rr), (gg * rr * pitch, rr * pitch, 1, pitch)
    return GemmOperand(shape, strides, _CUDA_TYPES[dtype][1], dtype.itemsize)


class _CudaDevice:
    """What the CuPy path needs from CUDA, bound once per call: cuBLAS' strided batched GEMM
    (handle, compute type, host pointers of alpha = 1 and beta = 0 / 1) and kernel launches.
    The CPU tests put an emulation in its place (same methods) to run the CuPy path on NumPy."""

    def __init__(self, problem: Problem):
        import cupy
        from cupy_backends.cuda.libs import cublas
        ct = problem.compute_dtype
        self._cupy = cupy
        self._gemm = cublas.gemmStridedBatchedEx
        self._handle = cupy.cuda.device.get_cublas_handle()
        self._compute = cublas.CUBLAS_COMPUTE_64F if ct == FLOAT64 else cublas.CUBLAS_COMPUTE_32F
        self._algo = cublas.CUBLAS_GEMM_DEFAULT
        # cuBLAS reads alpha and beta from host memory (the default pointer mode) during the
        # call; the arrays live as long as this object.
        self._scalars = (np.ones((), ct), np.zeros((), ct))
        self._one, self._zero = (int(s.ctypes.data) for s in self._scalars)
        self.smem_limit = resident_smem_limit(cupy.cuda.Device().id)

    @staticmethod
    def ptr(a) -> int:
        return a.data.ptr

    def contiguous(self, a):
        return self._cupy.ascontiguousarray(a)

    @staticmethod
    def function(spec: KernelSpec):
        return _kernels.get_function(spec)

    @staticmethod
    def allow_shared_memory(fn, nbytes: int) -> None:
        _kernels.set_dynamic_shared_memory(fn, nbytes)

    def gemm(self, plan: GemmPlan, a: int, b: int, c: int, accumulate: bool) -> None:
        """One call of `plan` with cuBLAS' operands A, B, C at addresses a, b, c."""
        self._gemm(self._handle, plan.transa, plan.transb, plan.m, plan.n, plan.k, self._one,
                   a, plan.a_type, plan.lda, plan.stride_a, b, plan.b_type, plan.ldb, plan.stride_b,
                   self._one if accumulate else self._zero,
                   c, plan.c_type, plan.ldc, plan.stride_c, plan.count, self._compute, self._algo)

    @staticmethod
    def launch(kind: str, fn, grid, block, args, shared_mem: int, scores: int) -> None:
        """Launch a fused step (kind and scores, the score elements it covers, are for tools
        that time the steps)."""
        fn(grid, block, args, shared_mem=shared_mem)


# Pointer kernel arguments: CuPy passes a NumPy scalar by value in its own size, so a uint64
# fills the 8 bytes of a `T*` parameter (CuPy arrays are not needed to pass an address).
_PTR = np.uint64


class _ChunkPlan:
    """Everything a chunk of one shape (hh, gg, rr, n) needs but its addresses: the products'
    plans and the fused steps' launch shapes and shape-dependent arguments."""
    __slots__ = ("gemms", "fn", "grid", "block", "smem", "n_pitch", "rows", "tail", "d_grid", "d_block", "d_tail")


class _CupySteps:
    """The chunk steps on the GPU: cuBLAS for the products, our kernels for the fused steps,
    called with integer addresses (see the section comment)."""

    def __init__(self, problem: Problem, device=None):
        self.problem = problem
        self.dev = _CudaDevice(problem) if device is None else device
        self.ct, self.dt = problem.compute_dtype, problem.dtype
        mask_type = None if problem.mask is None else (
            "bool" if problem.mask_kind == "bool" else np.dtype(problem.mask.dtype))
        self.mask_type = mask_type
        self.vpt = forward_vpt(self.ct.itemsize)
        self.f_softmax = {}             # kernel vpt -> forward softmax kernel (compiled when first planned)
        self.f_recompute = self.dev.function(softmax_spec(problem.dtype, mask_type, True))
        self.f_dscores = self.dev.function(dscores_spec(problem.dtype))
        self.scale = self.ct.type(problem.scale)

    # -- setup, once per call --------------------------------------------------------------
    def _tensor(self, array, grouped: bool, operand: bool = False) -> _Tensor:
        """Address arithmetic for `array` (of Hq heads if grouped, else of Hkv). A GEMM operand
        that cuBLAS cannot read in place (no unit stride along its last two axes, negative
        strides) is copied once, as a whole; the copy lives as long as the runner."""
        st = array.strides
        if any(s % array.itemsize for s in st) or (
                operand and not gemm_ready(array.shape, [s // array.itemsize for s in st])):
            array = self.dev.contiguous(array)
        group = self.problem.group_size if grouped else None
        return _Tensor(array, self.dev.ptr(array), len(self.problem.batch_shape), group)

    def _strides_args(self, t: Optional[_Tensor], count: int) -> tuple:
        return tuple(np.int64(s) for s in (t.strides[:count] if t is not None else (0,) * count))

    def _softmax_function(self, vpt: int):
        fn = self.f_softmax.get(vpt)
        if fn is None:
            fn = self.f_softmax[vpt] = self.dev.function(softmax_spec(self.dt, self.mask_type, False, vpt))
        return fn

    def _launch_plan(self, c: _ChunkPlan, cshape, n, recompute: bool, unit_mask: bool = True) -> None:
        """Launch shape, kernel and shape-dependent arguments of the softmax step (and of dscores,
        which has the same row shape in the backward)."""
        hh, gg, rr = cshape
        rows = hh * gg * rr
        if recompute:
            tpr, rpb, _ = launch_shape(n, self.ct.itemsize)
            c.fn, smem, resident = self.f_recompute, 0, False
        else:
            vpt, tpr, rpb, smem, resident = forward_launch(n, self.ct.itemsize, self.vpt, self.dev.smem_limit,
                                                           unit_mask)
            c.fn = self._softmax_function(vpt)
            if smem:
                self.dev.allow_shared_memory(c.fn, smem)
        c.grid, c.block, c.smem = (-(-rows // rpb),), (rpb * tpr,), smem
        c.n_pitch = (np.int64(n), np.int64(row_pitch(n)))
        c.rows = (np.int64(rows), np.int64(gg), np.int64(rr))
        c.tail = (self.scale, np.int32(tpr), np.int32(resident))
        c.d_grid, c.d_block = c.grid, c.block
        c.d_tail = (self.scale, np.int32(tpr))

    def _run_gemm(self, plan: GemmPlan, a: int, b: int, c: int) -> None:
        """Our c (=|+=) a @ b with a, b, c the addresses of the chunk's views."""
        gemm = self.dev.gemm
        for oa, ob, oc, acc in plan.calls:
            gemm(plan, b + ob, a + oa, c + oc, acc)        # cuBLAS' A is our b (see GemmPlan)

    # -- forward ---------------------------------------------------------------------------
    def forward_runner(self, out, lse, s_buf, p_buf):
        problem, dev = self.problem, self.dev
        ct, dt = self.ct, self.dt
        d_type = _CUDA_TYPES[dt][1]
        d, dv = problem.head_dim, problem.head_dim_v
        q = self._tensor(problem.q, True, operand=True)
        k = self._tensor(problem.k, False, operand=True)
        v = self._tensor(problem.v, False, operand=True)
        o = self._tensor(out, True)
        ls = self._tensor(lse, True)
        m = None if problem.mask is None else self._tensor(problem.mask, True)
        s_ptr, p_ptr = dev.ptr(s_buf), dev.ptr(p_buf)
        s_arg, p_arg = _PTR(s_ptr), _PTR(p_ptr)
        lse_st, mask_st = self._strides_args(ls, 3), self._strides_args(m, 4)
        causal_shift = problem.len_k - problem.len_q            # causal_offset = r0 + this
        causal = np.int32(problem.causal)
        unit_mask = m is None or m.strides[3] == 1     # register rows read the mask's keys contiguously
        plans = {}

        def plan(key):
            hh, gg, rr, n = key
            c = _ChunkPlan()
            c.gemms = (
                plan_gemm(q.operand((hh, gg, rr, d), d_type), k.operand((hh, 1, n, d), d_type, transpose=True),
                          _block_operand((hh, gg, rr), n, ct), False),
                plan_gemm(_block_operand((hh, gg, rr), n, dt), v.operand((hh, 1, n, dv), d_type),
                          o.operand((hh, gg, rr, dv), d_type), False))
            self._launch_plan(c, (hh, gg, rr), n, recompute=False, unit_mask=unit_mask)
            plans[key] = c
            return c

        gemm, launch = self._run_gemm, dev.launch

        def run(bi, chunks):
            qb, kb, vb, ob, lb = q.base(bi), k.base(bi), v.base(bi), o.base(bi), ls.base(bi)
            mb = 0 if m is None else m.base(bi)
            for h0, h1, g0, g1, r0, r1, n in chunks:
                key = (h1 - h0, g1 - g0, r1 - r0, n)
                c = plans.get(key) or plan(key)
                qk, pv = c.gemms
                # S = Q_c K^T
                gemm(qk, qb + h0 * q.bh + g0 * q.bg + r0 * q.br, kb + h0 * k.bh, s_ptr)
                # P = softmax step(S), lse
                mask_ptr = 0 if m is None else mb + h0 * m.bh + g0 * m.bg + r0 * m.br
                launch("softmax", c.fn, c.grid, c.block,
                       (s_arg,) + c.n_pitch + (p_arg, _PTR(lb + h0 * ls.bh + g0 * ls.bg + r0 * ls.br))
                       + lse_st + (_PTR(mask_ptr),) + mask_st + c.rows
                       + (np.int64(r0 + causal_shift), causal) + c.tail,
                       c.smem, key[0] * key[1] * key[2] * n)
                # O_c = P V straight into the output (accumulated in the compute dtype, one rounding)
                gemm(pv, p_ptr, vb + h0 * v.bh, ob + h0 * o.bh + g0 * o.bg + r0 * o.br)
        return run

    # -- backward --------------------------------------------------------------------------
    def backward_runner(self, dout, out, lse, dq, dk, dv, s_buf, p_buf, dp_buf):
        problem, dev = self.problem, self.dev
        ct, dt = self.ct, self.dt
        c_type, d_type = _CUDA_TYPES[ct][1], _CUDA_TYPES[dt][1]
        d, dvd = problem.head_dim, problem.head_dim_v
        q = self._tensor(problem.q, True, operand=True)
        k = self._tensor(problem.k, False, operand=True)
        v = self._tensor(problem.v, False, operand=True)
        do = self._tensor(dout, True, operand=True)
        o = self._tensor(out, True)
        ls = self._tensor(lse, True)
        m = None if problem.mask is None else self._tensor(problem.mask, True)
        gq, gk, gv = self._tensor(dq, True), self._tensor(dk, False), self._tensor(dv, False)
        s_ptr, p_ptr, dp_ptr = dev.ptr(s_buf), dev.ptr(p_buf), dev.ptr(dp_buf)
        s_arg, p_arg, dp_arg = _PTR(s_ptr), _PTR(p_ptr), _PTR(dp_ptr)
        lse_st, mask_st = self._strides_args(ls, 3), self._strides_args(m, 4)
        do_st, o_st = self._strides_args(do, 4), self._strides_args(o, 4)
        dv_arg = np.int64(dvd)
        causal_shift = problem.len_k - problem.len_q
        causal = np.int32(problem.causal)
        plans = {}

        def plan(key):
            hh, gg, rr, n = key
            c = _ChunkPlan()
            rows_q, rows_k = (hh, gg, rr), (hh, 1, n)
            c.gemms = (
                # S = Q_c K^T
                plan_gemm(q.operand(rows_q + (d,), d_type), k.operand(rows_k + (d,), d_type, transpose=True),
                          _block_operand(rows_q, n, ct), False),
                # dV += P^T dO (summed over the group)
                plan_gemm(_block_operand(rows_q, n, dt, transpose=True), do.operand(rows_q + (dvd,), d_type),
                          gv.operand(rows_k + (dvd,), c_type), True),
                # dP = dO V^T
                plan_gemm(do.operand(rows_q + (dvd,), d_type), v.operand(rows_k + (dvd,), d_type, transpose=True),
                          _block_operand(rows_q, n, ct), False),
                # dQ_c = dS K
                plan_gemm(_block_operand(rows_q, n, dt), k.operand(rows_k + (d,), d_type),
                          gq.operand(rows_q + (d,), c_type), False),
                # dK += dS^T Q_c (summed over the group)
                plan_gemm(_block_operand(rows_q, n, dt, transpose=True), q.operand(rows_q + (d,), d_type),
                          gk.operand(rows_k + (d,), c_type), True))
            self._launch_plan(c, rows_q, n, recompute=True)
            plans[key] = c
            return c

        gemm, launch = self._run_gemm, dev.launch
        f_recompute, f_dscores = self.f_recompute, self.f_dscores

        def run(bi, chunks):
            qb, kb, vb, dob, ob, lb = q.base(bi), k.base(bi), v.base(bi), do.base(bi), o.base(bi), ls.base(bi)
            gqb, gkb, gvb = gq.base(bi), gk.base(bi), gv.base(bi)
            mb = 0 if m is None else m.base(bi)
            for h0, h1, g0, g1, r0, r1, n in chunks:
                key = (h1 - h0, g1 - g0, r1 - r0, n)
                c = plans.get(key) or plan(key)
                qk, dv_p, dp_p, dq_p, dk_p = c.gemms
                scores = key[0] * key[1] * key[2] * n
                qc = qb + h0 * q.bh + g0 * q.bg + r0 * q.br
                doc = dob + h0 * do.bh + g0 * do.bg + r0 * do.br
                kc, vc = kb + h0 * k.bh, vb + h0 * v.bh
                gemm(qk, qc, kc, s_ptr)
                mask_ptr = 0 if m is None else mb + h0 * m.bh + g0 * m.bg + r0 * m.br
                launch("recompute", f_recompute, c.grid, c.block,
                       (s_arg,) + c.n_pitch + (p_arg, _PTR(lb + h0 * ls.bh + g0 * ls.bg + r0 * ls.br))
                       + lse_st + (_PTR(mask_ptr),) + mask_st + c.rows
                       + (np.int64(r0 + causal_shift), causal) + c.tail,
                       c.smem, scores)
                gemm(dv_p, p_ptr, doc, gvb + h0 * gv.bh)
                gemm(dp_p, doc, vc, dp_ptr)
                launch("dscores", f_dscores, c.d_grid, c.d_block,
                       (p_arg, dp_arg) + c.n_pitch + (_PTR(doc),) + do_st
                       + (_PTR(ob + h0 * o.bh + g0 * o.bg + r0 * o.br),) + o_st
                       + (dv_arg,) + c.rows + c.d_tail,
                       0, scores)
                gemm(dq_p, p_ptr, kc, gqb + h0 * gq.bh + g0 * gq.bg + r0 * gq.br)
                gemm(dk_p, p_ptr, qc, gkb + h0 * gk.bh)
        return run


def _steps(problem: Problem):
    return _NumpySteps(problem) if problem.library == "numpy" else _CupySteps(problem)


# ---------------------------------------------------------------------------------------------
# The driver.

def merged_heads(a, nbatch: int):
    """`a` (batch..., H, ...) as a view (1, B*H, ...) with the batch axes folded into the head axis,
    or None where the strides do not allow a view (a batch axis broadcast with stride 0 over
    heads that are not, say). Head index b*H + h is then batch element b's head h."""
    lead, strides = a.shape[:nbatch + 1], a.strides[:nbatch + 1]
    inner_stride = inner_count = None           # the innermost axis of more than one element
    for size, stride in zip(reversed(lead), reversed(strides)):
        if size == 1:
            continue
        if inner_stride is not None and stride != inner_stride * inner_count:
            return None
        if inner_stride is None:
            inner_stride, inner_count = stride, 1
        inner_count *= size
    return a.reshape((1, math.prod(lead)) + a.shape[nbatch + 1:])


def fold_batch(problem: Problem, *others) -> Optional[tuple]:
    """(problem with batch_shape (1,) and B*H heads, *others merged alike), or None where the batch
    has one element or some array cannot be folded without a copy. Chunks may then span batch
    elements: fewer, larger products and launches (the causal diagonal's first row tiles, short
    sequences with many batch elements), and the same rows and keys per score row, so every
    row's result is what the per-batch chunks give."""
    nb = len(problem.batch_shape)
    if problem.batch_size == 1:
        return None
    arrays = (problem.q, problem.k, problem.v) + ((problem.mask,) if problem.mask is not None else ()) + others
    merged = [merged_heads(a, nb) for a in arrays]
    if any(m is None for m in merged):
        return None
    q, k, v = merged[:3]
    mask = merged[3] if problem.mask is not None else None
    folded = replace(problem, q=q, k=k, v=v, mask=mask, batch_shape=(1,),
                     num_heads_q=q.shape[1], num_heads_kv=k.shape[1])
    return (folded,) + tuple(merged[len(arrays) - len(others):])


def batch_folded(problem: Problem) -> Problem:
    """The problem the forward runs: folded (fold_batch) where it can be."""
    folded = fold_batch(problem)
    return problem if folded is None else folded[0]


def chunked_forward(problem: Problem, budget: Optional[int] = None):
    folded = fold_batch(problem)
    if folded is not None:
        out, lse = chunked_forward(folded[0], budget)
        rows = problem.batch_shape + (problem.num_heads_q, problem.len_q)
        return out.reshape(rows + (problem.head_dim_v,)), lse.reshape(rows)
    xp, ct, dt = problem.xp, problem.compute_dtype, problem.dtype
    steps = _steps(problem)
    rows = chunk_rows(problem, "forward", budget)
    lk, dv = problem.len_k, problem.head_dim_v
    half = dt in HALF_DTYPES
    shape = problem.batch_shape + (problem.num_heads_q, problem.len_q)
    out = xp.zeros(shape + (dv,), dt)               # rows that see no key: out 0, lse -inf
    lse = xp.full(shape, -np.inf, ct)
    s_buf = xp.empty(rows * row_pitch(lk), ct)
    p_buf = xp.empty(rows * row_pitch(lk), dt) if half else s_buf
    run = steps.forward_runner(out, lse, s_buf, p_buf)
    chunks = problem_chunks(problem, rows)
    for bi in np.ndindex(*problem.batch_shape):
        run(bi, chunks)
    return out, lse


def chunked_backward(problem: Problem, dout, out, lse, budget: Optional[int] = None):
    folded = fold_batch(problem, dout, out, lse)
    if folded is not None:
        f_problem, f_dout, f_out, f_lse = folded
        dq, dk, dv = chunked_backward(f_problem, f_dout, f_out, f_lse, budget)
        return dq.reshape(problem.q.shape), dk.reshape(problem.k.shape), dv.reshape(problem.v.shape)
    xp, ct, dt = problem.xp, problem.compute_dtype, problem.dtype
    steps = _steps(problem)
    rows = chunk_rows(problem, "backward", budget)
    lk = row_pitch(problem.len_k)
    half = dt in HALF_DTYPES
    dq = xp.zeros(problem.q.shape, ct)              # rows that see no key: zero gradients
    dk = xp.zeros(problem.k.shape, ct)
    dv = xp.zeros(problem.v.shape, ct)
    s_buf = xp.empty(rows * lk, ct)                            # S, then dP (half inputs)
    p_buf = xp.empty(rows * lk, dt) if half else s_buf         # P, then dS
    dp_buf = s_buf if half else xp.empty(rows * lk, ct)
    run = steps.backward_runner(dout, out, lse, dq, dk, dv, s_buf, p_buf, dp_buf)
    chunks = problem_chunks(problem, rows)
    for bi in np.ndindex(*problem.batch_shape):
        run(bi, chunks)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------

def eager_bytes(problem: Problem) -> int:
    """About what the eager backend keeps alive at once (several score-sized arrays)."""
    return (EAGER_INTERMEDIATES * problem.batch_size * problem.num_heads_q * problem.len_q
            * problem.len_k * problem.compute_dtype.itemsize)


class ChunkedBackend(Backend):
    name = "chunked"

    def auto_reasons(self, problem, direction):
        budget = workspace_budget(problem)
        need = eager_bytes(problem)
        if need <= budget:
            return [f"eager fits in the workspace budget ({need / 2**20:.1f} of {budget / 2**20:.1f} MiB "
                    f"of scores) and is faster at this size"]
        return []

    def notes(self, problem):
        budget = workspace_budget(problem)
        out = []
        folded = batch_folded(problem)
        if problem.batch_size > 1:
            out.append("batch elements folded into the head axis (chunks may span them)" if folded is not problem
                       else "one batch element at a time (its strides do not fold into the head axis)")
        problem = folded
        for direction in ("forward", "backward"):
            rows = chunk_rows(problem, direction, budget)
            out.append(f"{direction}: chunks of {rows} query rows x {problem.len_k} keys, "
                       f"{rows * bytes_per_row(problem, direction) / 2**20:.1f} MiB of a "
                       f"{budget / 2**20:.1f} MiB workspace")
        tile = row_tile(problem)
        if tile < problem.len_q:
            out.append(f"causal: row tiles of {tile} rows along the diagonal; a tile's chunks hold as many "
                       f"rows of its shorter score rows as the same workspace holds")
        return out

    def kernel_specs(self):
        return all_specs()

    def forward(self, problem, want_lse):
        return chunked_forward(problem)

    def backward(self, problem, dout, out, lse, deterministic=False):
        return chunked_backward(problem, dout, out, lse)
