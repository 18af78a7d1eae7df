"""The chunked (memory-efficient) backend: query chunks over all keys in a bounded workspace.

One Python driver serves NumPy and CuPy. Per batch element, the (Hkv, G, Lq) query rows are cut
into rectangular chunks (several kv heads, several groups of one head, or a range of rows of one
query head), sized so the chunk's intermediates fit the workspace budget. Per chunk:

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
diagonal is mostly skipped.
GQA: K/V are never repeated; the G query heads of one kv head are a broadcast (stride 0) batch
axis of the GEMM, folded into its rows when the layout allows.

Backward recomputes P per chunk from the saved lse (same fused kernel), then
dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)) * scale (fused kernel),
dQ_c = dS K, dK += dS^T Q_c. P is never stored for the whole problem.

On CuPy the GEMMs call cuBLAS (cublasGemmStridedBatchedEx) directly on strided views, so no
operand is copied or transposed in memory, half inputs accumulate and write float32 and dK/dV
accumulate in place (beta = 1); the fused steps are the kernels of kernels_cu/chunked_softmax.cu.
On NumPy the same driver runs the same chunks with NumPy (the fused steps reuse the eager
backend's softmax_rows / probs_from_lse), so CI exercises the chunking without a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
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
    lq = problem.len_q
    if not problem.causal or lq <= MIN_CAUSAL_TILE:
        return max(1, lq)
    per_tile = -(-lq // CAUSAL_TILES)
    tile = max(MIN_CAUSAL_TILE, -(-per_tile // CAUSAL_TILE_ALIGN) * CAUSAL_TILE_ALIGN)
    return min(lq, tile)


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


def _grouped(problem: Problem, a):
    """(Hq, X, Y) -> (Hkv, G, X, Y) (always a view)."""
    return a.reshape((problem.num_heads_kv, problem.group_size) + a.shape[1:])


# ---------------------------------------------------------------------------------------------
# The array-library-specific pieces: a batched GEMM and the two fused steps.

class _NumpySteps:
    """The chunk steps in NumPy (float64 / float32 math like the kernels)."""

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


_CUDA_TYPES = {FLOAT16: ("__half", 2), BFLOAT16: ("__nv_bfloat16", 14),
               FLOAT32: ("float", 0), FLOAT64: ("double", 1)}     # cudaDataType values
_MASK_TYPES = (None, "bool") + tuple(_CUDA_TYPES)


def _mask_cxx(mask_type) -> str:
    if mask_type is None:
        return "chunked::NoMask"
    if mask_type == "bool":
        return "bool"
    return _CUDA_TYPES[np.dtype(mask_type)][0]


def softmax_spec(dtype, mask_type, recompute: bool) -> KernelSpec:
    t = _CUDA_TYPES[np.dtype(dtype)][0]
    return KernelSpec(SOURCE, f"chunk_softmax<{t}, {_mask_cxx(mask_type)}, {'true' if recompute else 'false'}>")


def dscores_spec(dtype) -> KernelSpec:
    return KernelSpec(SOURCE, f"chunk_dscores<{_CUDA_TYPES[np.dtype(dtype)][0]}>")


def all_specs() -> List[KernelSpec]:
    specs = [softmax_spec(d, m, r) for d in _CUDA_TYPES for m in _MASK_TYPES for r in (False, True)]
    return specs + [dscores_spec(d) for d in _CUDA_TYPES]


VECTORS_PER_THREAD = 4            # 16-byte vectors each thread of a row handles (about)
MAX_ROW_THREADS = 512
BLOCK_THREADS = 256               # short rows: several rows per block of this many threads


def launch_shape(n: int, itemsize: int) -> Tuple[int, int, int]:
    """(threads per row, rows per block, 16-byte vectors per row) for rows of n accumulation-type
    elements: a power of two of threads per row (4..512) giving each about 4 vectors."""
    vectors = max(1, -(-n * itemsize // 16))
    tpr = 4
    while tpr < MAX_ROW_THREADS and tpr * VECTORS_PER_THREAD < vectors:
        tpr *= 2
    return tpr, max(1, BLOCK_THREADS // tpr), vectors


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


def _ptr(a) -> int:
    return a.data.ptr


def _elem_strides(a) -> List[int]:
    return [s // a.itemsize for s in a.strides]


class _CupySteps:
    """The chunk steps on the GPU: cuBLAS for the products, our kernels for the fused steps."""

    def __init__(self, problem: Problem):
        import cupy
        from cupy_backends.cuda.libs import cublas
        self.cupy, self.cublas = cupy, cublas
        self.problem = problem
        self.ct = problem.compute_dtype
        self.c_type = _CUDA_TYPES[self.ct][1]
        self.smem_limit = resident_smem_limit(cupy.cuda.Device().id)
        self.compute = cublas.CUBLAS_COMPUTE_64F if self.ct == FLOAT64 else cublas.CUBLAS_COMPUTE_32F
        self.one = np.ones((), self.ct)
        self.zero = np.zeros((), self.ct)
        mask_type = None if problem.mask is None else (
            "bool" if problem.mask_kind == "bool" else np.dtype(problem.mask.dtype))
        self.f_softmax = _kernels.get_function(softmax_spec(problem.dtype, mask_type, False))
        self.f_recompute = _kernels.get_function(softmax_spec(problem.dtype, mask_type, True))
        self.f_dscores = _kernels.get_function(dscores_spec(problem.dtype))
        self.scale = self.ct.type(problem.scale)

    # -- GEMM ------------------------------------------------------------------------------
    @staticmethod
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

    def gemm(self, c, a, b, accumulate=False):
        """c (=|+=) a @ b over broadcast batch axes (axes where c has size 1 are summed).

        c must have unit stride along its last axis (only our buffers and outputs are passed)."""
        cp = self.cupy
        nb = c.ndim - 2
        batch = tuple(max(x, y, z) for x, y, z in zip(a.shape[:nb], b.shape[:nb], c.shape[:nb]))
        a = cp.broadcast_to(a, batch + a.shape[-2:])
        b = cp.broadcast_to(b, batch + b.shape[-2:])
        if self._layout(a.shape[-2:], _elem_strides(a)[-2:]) is None or min(a.strides) < 0:
            a = cp.ascontiguousarray(a)
        if self._layout(b.shape[-2:], _elem_strides(b)[-2:]) is None or min(b.strides) < 0:
            b = cp.ascontiguousarray(b)
        sa, sb, sc = _elem_strides(a), _elem_strides(b), _elem_strides(c)
        sc = [0 if (c.shape[i] == 1 and batch[i] != 1) else sc[i] for i in range(nb)] + sc[nb:]
        M, K = a.shape[-2:]
        N = b.shape[-1]
        ma, mb, mc = sa[-2:], sb[-2:], sc[-2:]
        assert mc[1] == 1 or N == 1, "chunked gemm: C needs unit stride along its last axis"
        if M == 0 or N == 0 or math.prod(batch) == 0:
            return
        # batch axes as (size, stride in a, in b, in c), size-1 axes dropped
        axes = [(batch[i], sa[i], sb[i], sc[i]) for i in range(nb) if batch[i] != 1]
        # Fold the innermost batch axis into M when B is broadcast along it (the G query heads
        # of one kv head become rows), or into K when C is (a sum over the G heads).
        while axes:
            n, xa, xb, xc = axes[-1]
            if xb == 0 and xc != 0 and xa == M * ma[0] and xc == M * mc[0] and M > 0:
                M *= n
            elif xc == 0 and xa == K * ma[1] and xb == K * mb[0] and K > 0:
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
        reduces = any(ax[3] == 0 for ax in merged)
        if reduces and not accumulate:
            c.fill(0)
            accumulate = True
        # cuBLAS' own batch: the innermost axis, unless C is shared along it (then a loop).
        if merged and merged[-1][3] != 0:
            count, str_a, str_b, str_c = merged.pop()
        else:
            count, str_a, str_b, str_c = 1, 0, 0, 0
        la, lb = self._layout((M, K), ma), self._layout((K, N), mb)
        ldc = mc[0] if M > 1 else max(N, 1)
        a_t, b_t = _CUDA_TYPES[np.dtype(a.dtype)][1], _CUDA_TYPES[np.dtype(b.dtype)][1]
        c_t = _CUDA_TYPES[np.dtype(c.dtype)][1]     # the output dtype (half: rounded once by cuBLAS)
        beta = self.one if accumulate else self.zero
        handle = cp.cuda.device.get_cublas_handle()
        for idx in np.ndindex(*[m[0] for m in merged]):
            oa = sum(i * m[1] for i, m in zip(idx, merged))
            ob = sum(i * m[2] for i, m in zip(idx, merged))
            oc = sum(i * m[3] for i, m in zip(idx, merged))
            # row-major C = A B  <=>  col-major C^T = B^T A^T
            self.cublas.gemmStridedBatchedEx(
                handle, lb[0], la[0], N, M, K, self.one.ctypes.data,
                _ptr(b) + ob * b.itemsize, b_t, lb[1], str_b,
                _ptr(a) + oa * a.itemsize, a_t, la[1], str_a,
                beta.ctypes.data,
                _ptr(c) + oc * c.itemsize, c_t, ldc, str_c,
                count, self.compute, self.cublas.CUBLAS_GEMM_DEFAULT)

    # -- fused steps -----------------------------------------------------------------------
    def _rows(self, s):
        nh, ng, nr, n = s.shape
        return nh * ng * nr, ng, nr, n

    def _mask_args(self, mask):
        if mask is None:
            return (np.intp(0),) + (np.int64(0),) * 4
        st = _elem_strides(mask)
        return (mask,) + tuple(np.int64(x) for x in st)

    def _pitch(self, s, p):
        pitch = s.strides[-2] // s.itemsize
        assert p.strides[-2] // p.itemsize == pitch and pitch % ROW_ALIGN == 0
        return pitch

    def _softmax(self, fn, s, p, lse, mask, r0, recompute):
        problem = self.problem
        rows, ng, nr, n = self._rows(s)
        if rows == 0:
            return
        pitch = self._pitch(s, p)
        causal_offset = r0 + problem.len_k - problem.len_q
        ls = _elem_strides(lse)
        tpr, rpb, vectors = launch_shape(n, self.ct.itemsize)
        smem = 0 if recompute else rpb * vectors * 16
        resident = 0 < smem <= self.smem_limit
        if resident:
            _kernels.set_dynamic_shared_memory(fn, smem)
        fn((-(-rows // rpb),), (rpb * tpr,),
           (s, np.int64(n), np.int64(pitch), p, lse, np.int64(ls[0]), np.int64(ls[1]), np.int64(ls[2]))
           + self._mask_args(mask)
           + (np.int64(rows), np.int64(ng), np.int64(nr), np.int64(causal_offset), np.int32(problem.causal),
              self.scale, np.int32(tpr), np.int32(resident)),
           shared_mem=smem if resident else 0)

    def softmax(self, s, p, lse, mask, r0):
        self._softmax(self.f_softmax, s, p, lse, mask, r0, False)

    def recompute(self, s, p, lse, mask, r0):
        self._softmax(self.f_recompute, s, p, lse, mask, r0, True)

    def dscores(self, p, dp, dout, out):
        rows, ng, nr, n = self._rows(p)
        if rows == 0:
            return
        pitch = self._pitch(dp, p)
        sd, so = _elem_strides(dout), _elem_strides(out)
        dv = dout.shape[-1]
        tpr, rpb, _ = launch_shape(n, self.ct.itemsize)
        self.f_dscores((-(-rows // rpb),), (rpb * tpr,),
                       (p, dp, np.int64(n), np.int64(pitch), dout) + tuple(np.int64(x) for x in sd)
                       + (out,) + tuple(np.int64(x) for x in so)
                       + (np.int64(dv), np.int64(rows), np.int64(ng), np.int64(nr), self.scale, np.int32(tpr)))


def _steps(problem: Problem):
    return _NumpySteps(problem) if problem.library == "numpy" else _CupySteps(problem)


# ---------------------------------------------------------------------------------------------
# The driver.

def _swap(a):
    return a.swapaxes(-1, -2)


def _block(buf, cshape, n):
    """A chunk's (heads, groups, rows, n) score block at the start of a workspace buffer, rows
    `row_pitch(n)` elements apart."""
    pitch = row_pitch(n)
    return buf[:math.prod(cshape) * pitch].reshape(cshape + (pitch,))[..., :n]


def chunked_forward(problem: Problem, budget: Optional[int] = None):
    xp, ct, dt = problem.xp, problem.compute_dtype, problem.dtype
    steps = _steps(problem)
    rows = chunk_rows(problem, "forward", budget)
    tile = row_tile(problem)
    lk, dv = problem.len_k, problem.head_dim_v
    half = dt in HALF_DTYPES
    shape = problem.batch_shape + (problem.num_heads_q, problem.len_q)
    out = xp.zeros(shape + (dv,), dt)
    lse = xp.full(shape, -np.inf, ct)
    s_buf = xp.empty(rows * row_pitch(lk), ct)
    p_buf = xp.empty(rows * row_pitch(lk), dt) if half else s_buf
    for bi in np.ndindex(*problem.batch_shape):
        q, k, v = _grouped(problem, problem.q[bi]), problem.k[bi], problem.v[bi]
        mask = None if problem.mask is None else _grouped(problem, problem.mask[bi])
        out_b, lse_b = _grouped(problem, out[bi]), _grouped(problem, lse[bi][..., None])[..., 0]
        for h0, h1, g0, g1, r0, r1 in iter_chunks(problem.num_heads_kv, problem.group_size,
                                                  problem.len_q, rows, tile):
            n = visible_keys(problem, r1)
            if n == 0:
                continue          # no row of the chunk sees a key: out 0, lse -inf already
            cshape = (h1 - h0, g1 - g0, r1 - r0)
            s = _block(s_buf, cshape, n)
            p = _block(p_buf, cshape, n)
            steps.gemm(s, q[h0:h1, g0:g1, r0:r1], _swap(k[h0:h1, None, :n]))
            m = None if mask is None else mask[h0:h1, g0:g1, r0:r1, :n]
            steps.softmax(s, p, lse_b[h0:h1, g0:g1, r0:r1], m, r0)
            # O_c = P V straight into the output (accumulated in the compute dtype, one rounding)
            steps.gemm(out_b[h0:h1, g0:g1, r0:r1], p, v[h0:h1, None, :n])
    return out, lse


def chunked_backward(problem: Problem, dout, out, lse, budget: Optional[int] = None):
    xp, ct, dt = problem.xp, problem.compute_dtype, problem.dtype
    steps = _steps(problem)
    rows = chunk_rows(problem, "backward", budget)
    tile = row_tile(problem)
    lk = row_pitch(problem.len_k)
    half = dt in HALF_DTYPES
    dq = xp.zeros(problem.q.shape, ct)
    dk = xp.zeros(problem.k.shape, ct)
    dv = xp.zeros(problem.v.shape, ct)
    s_buf = xp.empty(rows * lk, ct)                            # S, then dP (half inputs)
    p_buf = xp.empty(rows * lk, dt) if half else s_buf         # P, then dS
    dp_buf = s_buf if half else xp.empty(rows * lk, ct)
    for bi in np.ndindex(*problem.batch_shape):
        q, k, v = _grouped(problem, problem.q[bi]), problem.k[bi], problem.v[bi]
        mask = None if problem.mask is None else _grouped(problem, problem.mask[bi])
        do_b, o_b = _grouped(problem, dout[bi]), _grouped(problem, out[bi])
        lse_b = _grouped(problem, lse[bi][..., None])[..., 0]
        dq_b, dk_b, dv_b = _grouped(problem, dq[bi]), dk[bi], dv[bi]
        for h0, h1, g0, g1, r0, r1 in iter_chunks(problem.num_heads_kv, problem.group_size,
                                                  problem.len_q, rows, tile):
            n = visible_keys(problem, r1)
            if n == 0:
                continue          # rows that see nothing have zero gradients
            cshape = (h1 - h0, g1 - g0, r1 - r0)
            s = _block(s_buf, cshape, n)
            p = _block(p_buf, cshape, n)
            dp = _block(dp_buf, cshape, n)
            qc, doc = q[h0:h1, g0:g1, r0:r1], do_b[h0:h1, g0:g1, r0:r1]
            steps.gemm(s, qc, _swap(k[h0:h1, None, :n]))
            m = None if mask is None else mask[h0:h1, g0:g1, r0:r1, :n]
            steps.recompute(s, p, lse_b[h0:h1, g0:g1, r0:r1], m, r0)
            steps.gemm(dv_b[h0:h1, None, :n], _swap(p), doc, accumulate=True)
            steps.gemm(dp, doc, _swap(v[h0:h1, None, :n]))
            steps.dscores(p, dp, doc, o_b[h0:h1, g0:g1, r0:r1])
            steps.gemm(dq_b[h0:h1, g0:g1, r0:r1], p, k[h0:h1, None, :n])
            steps.gemm(dk_b[h0:h1, None, :n], _swap(p), qc, accumulate=True)
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
        for direction in ("forward", "backward"):
            rows = chunk_rows(problem, direction, budget)
            out.append(f"{direction}: chunks of {rows} query rows x {problem.len_k} keys, "
                       f"{rows * bytes_per_row(problem, direction) / 2**20:.1f} MiB of a "
                       f"{budget / 2**20:.1f} MiB workspace")
        return out

    def kernel_specs(self):
        return all_specs()

    def forward(self, problem, want_lse):
        return chunked_forward(problem)

    def backward(self, problem, dout, out, lse, deterministic=False):
        return chunked_backward(problem, dout, out, lse)
