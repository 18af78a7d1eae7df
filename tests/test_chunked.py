"""The chunked backend: same test bodies on NumPy (the chunking logic, on CI) and CuPy (the kernels).

Small workspaces force several chunks on small problems, so every chunk shape (kv-head ranges,
group ranges, row ranges with causal key limits) is exercised.
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cupyattn
from cupyattn import _chunked
from helpers import allowed_error
from reference import as_float64, reference_attention, reference_backward, rel_error
from strategies import ALL_DTYPES, Case, cases, lse_tolerance, make_inputs, tolerance

F64 = np.dtype(np.float64)


def budget_for_rows(case, rows, direction="forward"):
    """A workspace that holds `rows` query rows of `case` (so a small problem is cut in chunks)."""
    q = np.zeros((1, case.head_dim), case.dtype)
    k = np.zeros((case.len_k, case.head_dim), case.dtype)
    v = np.zeros((case.len_k, case.head_dim_v), case.dtype)
    return rows * _chunked.bytes_per_row(cupyattn._api.normalize(q, k, v), direction)


def run(xp, case, inputs, backend="chunked", budget=None, dout=None):
    ctx = _chunked.workspace(budget) if budget else contextlib.nullcontext()
    with ctx:
        out, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend=backend,
                                      return_lse=True, **case.kwargs(inputs))
        if dout is None:
            return out, lse
        grads = cupyattn.attention_backward(dout, inputs["q"], inputs["k"], inputs["v"], out, lse,
                                            backend=backend, **case.kwargs(inputs))
    return out, lse, grads


@given(case=cases(max_len=96, max_dim=80), rows=st.sampled_from((1, 5, 16, 64, 10**6)))
@settings(max_examples=25)
def test_forward_matches_reference(xp, case, rows):
    inputs = make_inputs(xp, case)
    ref_out, ref_lse = reference_attention(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    out, lse = run(xp, case, inputs, budget=budget_for_rows(case, rows))
    eager_out, _ = run(xp, case, inputs, backend="eager")
    assert out.dtype == case.dtype and lse.dtype == (F64 if case.dtype == F64 else np.float32)
    assert rel_error(out, ref_out) <= allowed_error(rel_error(eager_out, ref_out), case.dtype)
    assert rel_error(lse, ref_lse) <= lse_tolerance(case.dtype)


GRAD_CASES = [
    Case(),
    Case(batch=(2, 1), heads_q=6, heads_kv=2, len_q=37, len_k=23, causal=True, mask="bool_empty_rows"),
    Case(heads_q=4, heads_kv=2, len_q=50, len_k=70, head_dim=8, head_dim_v=5, causal=True, mask="bias"),
    Case(batch=(), heads_q=3, heads_kv=1, len_q=70, len_k=30, causal=True, head_dim=20, head_dim_v=12),
    Case(heads_q=4, heads_kv=2, len_q=30, len_k=45, mask="bool", scale=0.7),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("rows", (3, 40, 10**6))
def test_gradients_match_reference(xp, case, dtype, rows):
    case = case.with_(dtype=dtype)
    inputs = make_inputs(xp, case)
    rng = np.random.default_rng(7)
    shape = case.batch + (case.heads_q, case.len_q, case.head_dim_v)
    dout_np = rng.standard_normal(shape).astype(dtype)
    dout = xp.asarray(dout_np) if xp is not np else dout_np
    refs = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    *_, grads = run(xp, case, inputs, budget=budget_for_rows(case, rows, "backward"), dout=dout)
    *_, eager = run(xp, case, inputs, backend="eager", dout=dout)
    for name, g, e, r in zip("qkv", grads, eager, refs):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert rel_error(g, r) <= allowed_error(rel_error(e, r), dtype, factor=3.0), name


@pytest.mark.parametrize("case", [
    Case(batch=(), heads_q=2, heads_kv=1, len_q=5, len_k=4, head_dim=3, head_dim_v=2, dtype=F64, causal=True),
    Case(batch=(2,), heads_q=2, heads_kv=2, len_q=3, len_k=6, head_dim=2, head_dim_v=3, dtype=F64, mask="bias"),
])
def test_gradients_finite_differences(xp, case):
    inputs = make_inputs(xp, case)
    rng = np.random.default_rng(3)
    w_np = rng.standard_normal(case.batch + (case.heads_q, case.len_q, case.head_dim_v))
    w = xp.asarray(w_np) if xp is not np else w_np
    budget = budget_for_rows(case, 2, "backward")

    def loss(**replaced):
        args = dict(inputs, **replaced)
        out, _ = run(xp, case, args, budget=budget)
        return float((as_float64(out) * w_np).sum())

    *_, grads = run(xp, case, inputs, budget=budget, dout=w)
    eps = 1e-6
    for name, grad in zip("qkv", grads):
        base = as_float64(inputs[name])
        numeric = np.zeros_like(base)
        for idx in np.ndindex(*base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            to = (lambda a: xp.asarray(a)) if xp is not np else (lambda a: a)
            numeric[idx] = (loss(**{name: to(plus)}) - loss(**{name: to(minus)})) / (2 * eps)
        assert np.allclose(as_float64(grad), numeric, rtol=1e-6, atol=1e-7), name


def test_results_independent_of_chunk_size(xp):
    case = Case(batch=(2,), heads_q=4, heads_kv=2, len_q=45, len_k=33, causal=True, mask="bias",
                dtype=np.dtype(np.float32))
    inputs = make_inputs(xp, case)
    dout = inputs["q"][..., :case.head_dim_v] * 0.5
    results = {}
    for rows in (1, 7, 45, 90, 10**6):
        budget = budget_for_rows(case, rows, "backward")
        first = run(xp, case, inputs, budget=budget, dout=dout)
        again = run(xp, case, inputs, budget=budget, dout=dout)
        flat = [first[0], first[1], *first[2]]
        for a, b in zip(flat, [again[0], again[1], *again[2]]):
            assert np.array_equal(as_float64(a), as_float64(b), equal_nan=True)   # bitwise, same chunking
        results[rows] = flat
    base = results[10**6]
    for rows, flat in results.items():
        for a, b in zip(flat, base):
            assert rel_error(a, b) <= 1e-5, rows


def test_nan_and_empty_rows_like_eager(xp):
    case = Case(heads_q=2, heads_kv=1, len_q=12, len_k=9, mask="bool_empty_rows", causal=True,
                dtype=np.dtype(np.float32))
    inputs = make_inputs(xp, case)
    q = inputs["q"].copy()
    q[0, 1, 4, 0] = np.nan
    inputs["q"] = q
    budget = budget_for_rows(case, 4)
    out, lse = run(xp, case, inputs, budget=budget)
    eout, else_ = run(xp, case, inputs, backend="eager")
    for a, b in ((out, eout), (lse, else_)):
        a, b = as_float64(a), as_float64(b)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.array_equal(np.isneginf(a), np.isneginf(b))
        fin = np.isfinite(b)
        assert np.allclose(a[fin], b[fin], rtol=1e-5, atol=1e-6)
    # rows that see no key: out 0, lse -inf
    assert np.all(as_float64(out)[0, 0, ::3] == 0) and np.all(np.isneginf(as_float64(lse)[0, 0, ::3]))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("direction", ("forward", "backward"))
def test_chunk_size_obeys_budget(dtype, direction):
    for lq, lk, heads in ((4096, 4096, 16), (100, 100000, 2), (7, 3, 5)):
        q = np.zeros((3, heads, lq, 1), dtype)
        k = np.zeros((3, 1, lk, 1), dtype)
        problem = cupyattn._api.normalize(q, k, k)
        for budget in (1 << 16, 1 << 20, 256 << 20):
            rows = _chunked.chunk_rows(problem, direction, budget)
            per_row = _chunked.bytes_per_row(problem, direction)
            assert rows >= 1
            assert rows * per_row <= budget or rows == 1
            assert rows <= heads * lq


@pytest.mark.parametrize("hkv,group,lq,rows", [(3, 2, 5, 1), (3, 2, 5, 4), (3, 2, 5, 7), (3, 2, 5, 10),
                                               (3, 2, 5, 25), (3, 2, 5, 30), (1, 1, 9, 4)])
def test_chunks_cover_every_row_once(hkv, group, lq, rows):
    seen = np.zeros((hkv, group, lq), int)
    for h0, h1, g0, g1, r0, r1 in _chunked.iter_chunks(hkv, group, lq, rows):
        assert (h1 - h0) * (g1 - g0) * (r1 - r0) <= rows
        seen[h0:h1, g0:g1, r0:r1] += 1
    assert np.all(seen == 1)


@pytest.mark.parametrize("hkv,group,lq,rows,tile", [(3, 2, 5, 4, 2), (3, 2, 5, 7, 2), (3, 2, 5, 30, 2),
                                                    (2, 3, 9, 9, 4), (2, 1, 9, 100, 4), (1, 1, 9, 3, 4)])
def test_tiled_chunks_cover_every_row_once(hkv, group, lq, rows, tile):
    seen = np.zeros((hkv, group, lq), int)
    for h0, h1, g0, g1, r0, r1 in _chunked.iter_chunks(hkv, group, lq, rows, tile):
        assert (h1 - h0) * (g1 - g0) * (r1 - r0) <= rows
        assert r1 - r0 <= tile and r0 // tile == (r1 - 1) // tile     # never across a tile edge
        seen[h0:h1, g0:g1, r0:r1] += 1
    assert np.all(seen == 1)


def test_row_tile_and_pitch():
    q = np.zeros((1, 4, 4096, 8), np.float32)
    causal = cupyattn._api.normalize(q, q, q, causal=True)
    assert _chunked.row_tile(causal) == 512
    assert _chunked.row_tile(cupyattn._api.normalize(q, q, q)) == 4096
    small = np.zeros((1, 1, 100, 8), np.float32)
    assert _chunked.row_tile(cupyattn._api.normalize(small, small, small, causal=True)) == 100
    assert [_chunked.row_pitch(n) for n in (1, 8, 9, 4096)] == [8, 8, 16, 4096]
    for n in (1, 3, 100, 4096, 40000):
        for itemsize in (4, 8):
            tpr, rpb, vectors = _chunked.launch_shape(n, itemsize)
            assert tpr & (tpr - 1) == 0 and 4 <= tpr <= 512 and rpb * tpr <= 512
            assert vectors * 16 >= n * itemsize and vectors * 16 <= _chunked.row_pitch(n) * itemsize


@pytest.mark.parametrize("case", GRAD_CASES[1:4] + [
    Case(batch=(2,), heads_q=4, heads_kv=4, len_q=40, len_k=40, causal=True, head_dim=16, head_dim_v=16),
    Case(heads_q=2, heads_kv=1, len_q=33, len_k=50, causal=True, mask="bool", head_dim=8, head_dim_v=8)])
@pytest.mark.parametrize("dtype", (np.dtype(np.float32), cupyattn.bfloat16), ids=str)
def test_causal_diagonal_tiles(xp, monkeypatch, case, dtype):
    # small tiles so that these small causal problems are cut along the diagonal
    monkeypatch.setattr(_chunked, "MIN_CAUSAL_TILE", 4)
    monkeypatch.setattr(_chunked, "CAUSAL_TILES", 5)
    monkeypatch.setattr(_chunked, "CAUSAL_TILE_ALIGN", 2)
    case = case.with_(dtype=dtype)
    inputs = make_inputs(xp, case)
    problem = cupyattn._api.normalize(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    assert _chunked.row_tile(problem) < case.len_q
    dout_np = np.random.default_rng(5).standard_normal(case.batch + (case.heads_q, case.len_q, case.head_dim_v))
    dout = xp.asarray(dout_np.astype(dtype)) if xp is not np else dout_np.astype(dtype)
    ref_out, ref_lse = reference_attention(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    refs = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    *_, eager = run(xp, case, inputs, backend="eager", dout=dout)
    eager_out, _ = run(xp, case, inputs, backend="eager")
    for rows in (3, 40, 10**6):
        out, lse, grads = run(xp, case, inputs, budget=budget_for_rows(case, rows, "backward"), dout=dout)
        assert rel_error(out, ref_out) <= allowed_error(rel_error(eager_out, ref_out), dtype)
        assert rel_error(lse, ref_lse) <= lse_tolerance(dtype)
        for name, g, e, r in zip("qkv", grads, eager, refs):
            assert rel_error(g, r) <= allowed_error(rel_error(e, r), dtype, factor=3.0), name


def test_workspace_settings():
    assert _chunked.get_workspace_bytes() is None
    with _chunked.workspace(1234):
        assert _chunked.get_workspace_bytes() == 1234
        with _chunked.workspace(99):
            assert _chunked.get_workspace_bytes() == 99
        assert _chunked.get_workspace_bytes() == 1234
    assert _chunked.get_workspace_bytes() is None
    _chunked.set_workspace_bytes(4096)
    try:
        assert _chunked.get_workspace_bytes() == 4096
    finally:
        _chunked.set_workspace_bytes(None)
    with pytest.raises(ValueError):
        _chunked.set_workspace_bytes(0)
    with pytest.raises(TypeError):
        _chunked.workspace(1.5).__enter__()


def test_auto_picks_eager_small_chunked_large(xp):
    # float64: a dtype flash does not take, so auto chooses between chunked and eager
    case = Case(heads_q=2, heads_kv=1, len_q=64, len_k=64, dtype=F64)
    inputs = make_inputs(xp, case)
    for direction in ("forward", "backward"):
        report = cupyattn.explain(inputs["q"], inputs["k"], inputs["v"], direction=direction)
        assert report.backend == "eager", str(report)
        assert "eager fits" in " ".join(report.why_not["chunked"])
        with _chunked.workspace(4096):
            report = cupyattn.explain(inputs["q"], inputs["k"], inputs["v"], direction=direction)
            assert report.backend == "chunked", str(report)
            assert "chunks of" in str(report)
    forced = cupyattn.explain(inputs["q"], inputs["k"], inputs["v"], backend="chunked")
    assert forced.backend == "chunked"


@pytest.mark.gpu
def test_peak_memory_under_budget():
    import cupy

    class Peak(cupy.cuda.MemoryHook):
        name = "peak"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]

    budget = 4 << 20
    for dtype in (np.float16, np.float32):
        case = Case(batch=(1,), heads_q=4, heads_kv=2, len_q=2048, len_k=2048, head_dim=64, head_dim_v=64,
                    dtype=np.dtype(dtype), causal=True)
        inputs = make_inputs(cupy, case)
        scores = 4 * 2048 * 2048 * 4
        assert scores >= 10 * budget
        dout = inputs["q"] * 0.1
        out, lse = run(cupy, case, inputs, budget=budget)
        cupy.cuda.Device().synchronize()
        grads = sum(inputs[n].size for n in "qkv") * (4 + np.dtype(dtype).itemsize)
        outputs = {"forward": out.nbytes + lse.nbytes, "backward": grads}
        for direction in ("forward", "backward"):
            hook = Peak()
            with hook, _chunked.workspace(budget):
                if direction == "forward":
                    cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="chunked", causal=True)
                else:
                    cupyattn.attention_backward(dout, inputs["q"], inputs["k"], inputs["v"], out, lse,
                                                backend="chunked", causal=True)
                cupy.cuda.Device().synchronize()
            # float32 gradients and their casts count as outputs; 256 KiB for small temporaries
            assert hook.peak <= budget + outputs[direction] + (256 << 10), (dtype, direction, hook.peak)


@pytest.mark.parametrize("spec", [_chunked.softmax_spec(np.float16, "bool", False),
                                  _chunked.softmax_spec(np.float64, np.dtype(np.float32), True),
                                  _chunked.dscores_spec(cupyattn.bfloat16)], ids=lambda s: s.name)
def test_kernels_compile_without_spills(spec):
    try:
        from cupy.cuda import nvrtc  # noqa: F401
        from cupyattn._kernels import compile_offline
        report = compile_offline(spec, "sm_80")
    except Exception as exc:  # no NVRTC library here
        pytest.skip(f"NVRTC unavailable: {exc}")
    assert report.ok, report.log
    assert not report.spills, report.line()


# ---------------------------------------------------------------------------------------------
# The CuPy path's cuBLAS call planning (strides, leading dimensions, GQA/sum folding), checked
# without a GPU: the same planning code drives an emulated cublasGemmStridedBatchedEx on NumPy memory.

def _emulated_gemm_steps(monkeypatch):
    import ctypes
    import types
    import ml_dtypes
    types_ = {2: np.float16, 14: ml_dtypes.bfloat16, 0: np.float32, 1: np.float64}

    def at(ptr, dtype, shape, strides):
        dtype = np.dtype(dtype)
        one = np.ndarray((1,), dtype, buffer=(ctypes.c_char * dtype.itemsize).from_address(ptr))
        return np.lib.stride_tricks.as_strided(one, shape, [s * dtype.itemsize for s in strides])

    def gemm(handle, ta, tb, m, n, k, alpha, A, at_, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc,
             count, compute, algo):
        assert lda >= max(1, m if ta == 0 else k) and ldb >= max(1, k if tb == 0 else n) and ldc >= max(1, m)
        a = at(A, types_[at_], (count, m, k), (sa, 1, lda) if ta == 0 else (sa, lda, 1)).astype(np.float64)
        b = at(B, types_[bt], (count, k, n), (sb, 1, ldb) if tb == 0 else (sb, ldb, 1)).astype(np.float64)
        c = at(C, types_[ct], (count, m, n), (sc, 1, ldc))
        keep = at(beta, types_[ct], (1,), (1,))[0]
        for i in range(count):
            c[i] = a[i] @ b[i] + (keep * c[i] if keep else 0)

    fake_cublas = types.SimpleNamespace(gemmStridedBatchedEx=gemm, CUBLAS_COMPUTE_32F=68,
                                        CUBLAS_COMPUTE_64F=70, CUBLAS_GEMM_DEFAULT=-1)
    fake_cupy = types.SimpleNamespace(
        broadcast_to=np.broadcast_to, ascontiguousarray=np.ascontiguousarray,
        cuda=types.SimpleNamespace(device=types.SimpleNamespace(get_cublas_handle=lambda: 0)))

    class Emulated(_chunked._NumpySteps):
        def __init__(self, problem):
            super().__init__(problem)
            gpu = _chunked._CupySteps.__new__(_chunked._CupySteps)
            gpu.cupy, gpu.cublas, gpu.problem, gpu.ct = fake_cupy, fake_cublas, problem, problem.compute_dtype
            gpu.c_type = _chunked._CUDA_TYPES[gpu.ct][1]
            gpu.compute = 0
            gpu.one, gpu.zero = np.ones((), gpu.ct), np.zeros((), gpu.ct)
            self.gemm = gpu.gemm

    monkeypatch.setattr(_chunked, "_ptr", lambda a: a.ctypes.data)
    monkeypatch.setattr(_chunked, "_steps", Emulated)


@pytest.mark.parametrize("case", GRAD_CASES[1:4] + [GRAD_CASES[4].with_(dtype=F64, head_dim=1, head_dim_v=1)])
def test_cublas_planning_emulated(monkeypatch, case):
    _emulated_gemm_steps(monkeypatch)
    inputs = make_inputs(np, case)
    # odd layouts: q stored (…, L, H, D), k stored Fortran-order (no unit stride: copied)
    inputs["q"] = np.ascontiguousarray(inputs["q"].swapaxes(-2, -3)).swapaxes(-2, -3)
    inputs["k"] = np.asfortranarray(inputs["k"])
    ref_out, ref_lse = reference_attention(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    dout = np.random.default_rng(1).standard_normal(ref_out.shape).astype(case.dtype)
    refs = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    for rows in (1, 7, 100, 10**6):
        out, lse, grads = run(np, case, inputs, budget=budget_for_rows(case, rows, "backward"), dout=dout)
        assert rel_error(out, ref_out) <= 10 * tolerance(case.dtype)
        assert rel_error(lse, ref_lse) <= lse_tolerance(case.dtype)
        for g, r in zip(grads, refs):
            assert rel_error(g, r) <= 10 * tolerance(case.dtype)
