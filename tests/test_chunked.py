"""The chunked backend: same test bodies on NumPy (the chunking logic, on CI) and CuPy (the kernels).

Small workspaces force several chunks on small problems, so every chunk shape (kv-head ranges,
group ranges, row ranges with causal key limits) is exercised.
"""
import contextlib
import ctypes
import types

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
BF16 = np.dtype(cupyattn.bfloat16)


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


@pytest.mark.parametrize("itemsize", (4, 8))
def test_forward_launch_regimes(itemsize):
    """The forward softmax's kernel choice: register rows (whole warps, the row within their
    registers, no shared memory) up to 512 threads' registers and with unit mask key stride, else
    the shared-memory kernel (rows within the limit) or its two-pass mode."""
    vpt = _chunked.forward_vpt(itemsize)
    limit = 200 << 10
    longest = 512 * vpt * 16 // itemsize                       # keys of the longest register row
    assert longest == (16384 if itemsize == 4 else 4096)
    for n in (1, 3, 8, 100, 257, 1000, 4096, 4097, longest - 1, longest, longest + 1, 3 * longest, 10**6):
        vectors = -(-n * itemsize // 16)
        for unit_mask in (True, False):
            kvpt, tpr, rpb, smem, resident = _chunked.forward_launch(n, itemsize, vpt, limit, unit_mask)
            assert tpr & (tpr - 1) == 0 and rpb * tpr <= 512 and rpb >= 1
            if unit_mask and n <= longest:
                assert kvpt == vpt and resident and smem == 0
                assert 32 <= tpr <= 512 and tpr * vpt >= vectors
                assert tpr == 32 or tpr * vpt < 2 * vectors          # the fewest threads that hold the row
                assert rpb == max(1, _chunked.BLOCK_THREADS // tpr)
            else:
                assert kvpt == 0 and (tpr, rpb, vectors) == _chunked.launch_shape(n, itemsize)
                assert resident == (rpb * vectors * 16 <= limit)
                assert smem == (rpb * vectors * 16 if resident else 0)
        assert _chunked.forward_launch(n, itemsize, 0, limit)[0] == 0          # register rows off
    # the measured shapes: bf16 rows of 4k and 16k keys
    assert _chunked.forward_launch(4096, 4, 8, limit) == (8, 128, 2, 0, True)
    assert _chunked.forward_launch(16384, 4, 8, limit) == (8, 512, 1, 0, True)


def test_kernel_specs_cover_every_launch():
    specs = {s.name for s in _chunked.all_specs()}
    assert len(specs) == len(_chunked.all_specs()) == 3 * 4 * 6 + 4
    for dtype in _chunked._CUDA_TYPES:
        vpt = _chunked.forward_vpt(8 if dtype == np.float64 else 4)
        for mask in _chunked._MASK_TYPES:
            for kvpt in (vpt, 0):
                assert _chunked.softmax_spec(dtype, mask, False, kvpt).name in specs
            assert _chunked.softmax_spec(dtype, mask, False).name == _chunked.softmax_spec(dtype, mask, False, vpt).name
            assert _chunked.softmax_spec(dtype, mask, True).name in specs


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
                                  _chunked.softmax_spec(cupyattn.bfloat16, np.dtype(np.float32), False),
                                  _chunked.softmax_spec(np.float32, "bool", False, 0),
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
# The softmax kernel on its own (GPU): every launch regime of the forward (register rows of each
# width, shared-memory rows, two passes, masks with other key strides) and the recompute, against a
# float64 softmax of the same scores, with causal limits (rows that see nothing, rows cut by the
# diagonal), bool masks with fully masked rows, biases, a NaN score, padding rows in the last block
# and odd lse strides.

_SOFTMAX_REGIMES = {
    # name: ({accumulation itemsize: keys}, shared-memory limit, expected (kernel vpt > 0, resident))
    "regs-tiny": ({4: 5, 8: 3}, 200 << 10, (True, True)),              # 32 threads, a few vectors used
    "regs-warp": ({4: 700, 8: 250}, 200 << 10, (True, True)),          # one warp per row, 8 rows per block
    "regs-2rows": ({4: 3001, 8: 1500}, 200 << 10, (True, True)),       # several warps, 2 / 1 rows per block
    "regs-4k": ({4: 4096, 8: 1024}, 200 << 10, (True, True)),
    "regs-512": ({4: 16384, 8: 4096}, 200 << 10, (True, True)),        # 512 threads, every register used
    "smem": ({4: 16390, 8: 4100}, 200 << 10, (False, True)),           # just too long for registers
    "two-pass": ({4: 16390, 8: 4100}, 1024, (False, False)),
    "strided-mask": ({4: 300, 8: 300}, 200 << 10, None),               # mask keys not contiguous: smem kernel
}


def _softmax_case(xp, dtype, mask_kind, regime, causal, vpt=None, seed=0):
    """Launch the forward softmax (and the recompute from its lse) on random scores; return the
    results and a float64 reference (NumPy arrays). On CuPy the kernels run; on NumPy the same
    launches (planning, arguments, strides) go to `EmulatedDevice`, which checks them and emulates
    the kernels, so that CI checks this harness and the planning."""
    dtype = np.dtype(dtype)
    acc = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    keys, limit, expect = _SOFTMAX_REGIMES[regime]
    n = keys[acc.itemsize]
    nh, ng, nr = 2, 2, 7                  # 28 rows: the last block of short rows is partly padding
    rows, pitch, scale = nh * ng * nr, _chunked.row_pitch(n), 0.7
    rng = np.random.default_rng(seed)
    s_host = (3 * rng.standard_normal((rows + 2, pitch))).astype(acc)     # 2 rows past the chunk
    s_host[3, 1] = np.nan                 # row 3 (ir 3) sees key 1 unless masked or causal offset < -2
    offset = {None: 0, "early": -2, "late": max(2, n - nr - 40)}[causal]  # early: rows 0, 1 see nothing
    mask = mask_host = None
    if mask_kind is not None:
        if mask_kind == "bool":
            base = rng.random((nh, 1, nr, n)) < 0.7
            base[:, :, 2] = False                                           # fully masked rows
        else:
            base = rng.standard_normal((nh, 1, nr, n)).astype(mask_kind)
        mask_host = np.broadcast_to(base, (nh, ng, nr, n))                  # group stride 0
    if xp is np:
        dev = EmulatedDevice(types.SimpleNamespace(compute_dtype=acc), smem_limit=limit)
        address, to_dev, to_host = dev.ptr, np.array, np.asarray

        def launch(spec, grid, block, args, smem):
            if smem:
                dev.allow_shared_memory(spec.name, smem)
            dev.launch("softmax", spec.name, grid, block, args, smem, rows * n)
    else:
        from cupyattn import _kernels
        address, to_dev, to_host = (lambda a: a.data.ptr), xp.asarray, xp.asnumpy

        def launch(spec, grid, block, args, smem):
            fn = _kernels.get_function(spec)
            if smem:
                _kernels.set_dynamic_shared_memory(fn, smem)
            fn(grid, block, args, shared_mem=smem)
    if mask_host is not None:
        base_dev = to_dev(mask_host[:, :1])
        if regime == "strided-mask":
            base_dev = xp.asfortranarray(base_dev)
        mask = xp.broadcast_to(base_dev, (nh, ng, nr, n))
    m_st = (0,) * 4 if mask is None else tuple(st // mask.itemsize for st in mask.strides)
    unit_mask = mask is None or m_st[3] == 1
    vpt = _chunked.forward_vpt(acc.itemsize) if vpt is None else vpt
    kvpt, tpr, rpb, smem, resident = _chunked.forward_launch(n, acc.itemsize, vpt, limit, unit_mask)
    if expect is not None:
        assert (kvpt > 0, resident) == expect
    elif mask is not None:
        assert kvpt == 0 and m_st[3] != 1
    mask_type = None if mask is None else ("bool" if mask_kind == "bool" else np.dtype(mask_kind))
    aliased = dtype == acc                # P written over S, as the package does for float / double
    p_host = np.full((rows + 2, pitch), 5, dtype)
    S = to_dev(s_host)
    P = S if aliased else to_dev(p_host)
    lse = to_dev(np.full((nh, nr, ng), 9.0, acc)).transpose(0, 2, 1)       # odd strides
    ptr, i64, i32 = np.uint64, np.int64, np.int32

    def args(tpr_, resident_):
        return ((ptr(address(S)), i64(n), i64(pitch), ptr(address(P)), ptr(address(lse)))
                + tuple(i64(st // lse.itemsize) for st in lse.strides)
                + (ptr(0 if mask is None else address(mask)),) + tuple(i64(st) for st in m_st)
                + (i64(rows), i64(ng), i64(nr), i64(offset), i32(causal is not None), acc.type(scale),
                   i32(tpr_), i32(resident_)))

    launch(_chunked.softmax_spec(dtype, mask_type, False, kvpt), (-(-rows // rpb),), (rpb * tpr,),
           args(tpr, int(resident)), smem)
    p_fwd, lse_fwd = to_host(P).copy(), to_host(lse).copy()
    # the recompute (backward) from the forward's lse, on the same scores
    S = to_dev(s_host)
    P = S if aliased else to_dev(p_host)
    r_tpr, r_rpb, _ = _chunked.launch_shape(n, acc.itemsize)
    launch(_chunked.softmax_spec(dtype, mask_type, True), (-(-rows // r_rpb),), (r_rpb * r_tpr,),
           args(r_tpr, 0), 0)
    p_rec = to_host(P).copy()

    # float64 reference from the same rounded inputs (the kernel scales and adds in the accumulation type)
    ih, ig, ir = np.unravel_index(np.arange(rows), (nh, ng, nr))
    s = s_host[:rows, :n] * acc.type(scale)
    if mask_host is not None:
        m = mask_host[ih, ig, ir]
        s = np.where(m, s, -np.inf) if mask_kind == "bool" else s + m.astype(acc)
    s = s.astype(np.float64)
    if causal is not None:
        s = np.where(np.arange(n)[None, :] > (ir + offset)[:, None], -np.inf, s)
    with np.errstate(all="ignore"):
        mx = np.fmax.reduce(s, axis=1)
        shift = np.where(np.isneginf(mx), 0, mx)
        e = np.exp(s - shift[:, None])
        total = e.sum(axis=1)
        p_ref = e / np.where(total == 0, 1, total)[:, None]
        lse_ref = shift + np.log(total)
    return dict(p=p_fwd, p_rec=p_rec, lse=lse_fwd[ih, ig, ir], p_ref=p_ref, lse_ref=lse_ref, rows=rows, n=n,
                s_host=s_host, aliased=aliased, kvpt=kvpt)


def _check_softmax_case(r, dtype):
    dtype = np.dtype(dtype)
    rtol, atol = {np.dtype(np.float16): (2e-3, 2e-7), BF16: (1e-2, 1e-30),
                  np.dtype(np.float32): (3e-5, 1e-30), F64: (1e-11, 1e-300)}[dtype]
    rows, n = r["rows"], r["n"]
    for name in ("p", "p_rec"):
        got = r[name][:rows, :n].astype(np.float64)
        assert np.array_equal(np.isnan(got), np.isnan(r["p_ref"])), name
        assert np.allclose(got, r["p_ref"], rtol=rtol, atol=atol, equal_nan=True), (
            name, float(np.nanmax(np.abs(got - r["p_ref"]) / (np.abs(r["p_ref"]) + atol))))
        # nothing written past the chunk's rows (P there: the sentinel, or S when P is S)
        past = r[name][rows:].astype(np.float64)
        expect = r["s_host"][rows:].astype(np.float64) if r["aliased"] else np.full(past.shape, 5.0)
        assert np.array_equal(past, expect), name
    lse, ref = r["lse"].astype(np.float64), r["lse_ref"]
    assert np.array_equal(np.isnan(lse), np.isnan(ref)) and np.array_equal(np.isneginf(lse), np.isneginf(ref))
    fin = np.isfinite(ref)
    assert np.allclose(lse[fin], ref[fin], rtol=0, atol=1e-11 if dtype == F64 else 2e-5)


# every regime with every mask kind, except "strided-mask" without a mask (there is nothing to stride)
_REGIME_MASKS = [pytest.param(regime, mask_kind, id=f"{regime}-{mask_kind}")
                 for regime in _SOFTMAX_REGIMES for mask_kind in (None, "bool", np.dtype(np.float16), "same")
                 if not (regime == "strided-mask" and mask_kind is None)]


@pytest.mark.parametrize("regime,mask_kind", _REGIME_MASKS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_softmax_kernel_regimes(xp, dtype, mask_kind, regime):
    mask_kind = dtype if mask_kind == "same" else mask_kind
    causals = (None, "early", "late")
    if xp is np:        # the emulation checks the harness and the planning: one causal setting per regime
        causals = causals[list(_SOFTMAX_REGIMES).index(regime) % 3:][:1]
    for causal in causals:
        r = _softmax_case(xp, dtype, mask_kind, regime, causal)
        _check_softmax_case(r, dtype)
        if mask_kind is None and causal in (None, "late"):
            assert np.isnan(r["p_ref"][3]).all() and np.isnan(r["lse_ref"][3])          # the NaN row is checked
        if causal == "early":
            assert np.isneginf(r["lse_ref"][:2]).all()                                  # rows that see nothing


@pytest.mark.gpu
@pytest.mark.parametrize("vpt", (4, 16))
@pytest.mark.parametrize("regime", ("regs-tiny", "regs-warp", "regs-2rows", "regs-4k"))
def test_softmax_kernel_other_widths(vpt, regime):
    """Register-row widths the package does not use by default (tools/tune_chunked.py tries them):
    compiled at run time, same results."""
    import cupy
    for dtype, mask_kind in ((BF16, None), (np.dtype(np.float32), "bool")):
        for causal in (None, "early", "late"):
            r = _softmax_case(cupy, dtype, mask_kind, regime, causal, vpt=vpt)
            assert r["kvpt"] == vpt
            _check_softmax_case(r, dtype)


# ---------------------------------------------------------------------------------------------
# The CuPy path without a GPU. `_CupySteps` does all its planning and address arithmetic itself and
# talks to CUDA only through a small device object; `EmulatedDevice` stands in for it on NumPy
# memory: cublasGemmStridedBatchedEx and the three fused kernels are emulated from exactly the
# integer arguments the path passes (addresses, strides, leading dimensions, launch shapes), and
# every address range they touch must lie inside an array the path took the address of.

_KERNEL_TYPES = {"__half": np.dtype(np.float16), "__nv_bfloat16": cupyattn.bfloat16,
                 "float": np.dtype(np.float32), "double": np.dtype(np.float64), "bool": np.dtype(bool)}


def _byte_bounds(a):
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:   # NumPy < 2
        byte_bounds = np.byte_bounds
    return byte_bounds(a)


class EmulatedDevice:
    def __init__(self, problem, smem_limit=48 * 1024):
        self.ct = problem.compute_dtype
        self._scalars = (np.ones((), self.ct), np.zeros((), self.ct))     # alpha/beta in the compute type
        self._one, self._zero = (s.ctypes.data for s in self._scalars)
        self.types = {code: dt for dt, (_, code) in _chunked._CUDA_TYPES.items()}
        self.smem_limit = smem_limit
        self.regions = []           # (first byte, end, array): what the path may touch
        self.gemms = []             # (plan, A, B, C, accumulate) per cuBLAS call
        self.launches = []          # (kind, kernel name, grid, block, shared_mem) per launch
        self.allowed_smem = {}

    # -- the device interface -------------------------------------------------------------
    def ptr(self, a):
        lo, hi = _byte_bounds(a)
        self.regions.append((lo, hi, a))
        return a.ctypes.data

    def contiguous(self, a):
        return np.ascontiguousarray(a)

    def function(self, spec):
        return spec.name

    def allow_shared_memory(self, fn, nbytes):
        assert nbytes <= self.smem_limit
        self.allowed_smem[fn] = max(nbytes, self.allowed_smem.get(fn, 0))

    def gemm(self, plan, A, B, C, accumulate):
        self.gemms.append((plan, A, B, C, accumulate))
        _chunked._CudaDevice.gemm(self, plan, A, B, C, accumulate)   # the real argument list

    # what _CudaDevice.gemm passes cublasGemmStridedBatchedEx: alpha and beta by host pointer
    _handle, _compute, _algo = 12345, 68, -1

    def _gemm(self, handle, transa, transb, m, n, k, alpha, A, a_type, lda, stride_a, B, b_type, ldb, stride_b,
              beta, C, c_type, ldc, stride_c, count, compute, algo):
        """cublasGemmStridedBatchedEx (column-major) on NumPy memory."""
        assert (handle, compute, algo) == (self._handle, self._compute, self._algo)
        assert count >= 1 and (count == 1 or stride_c != 0), "batch entries must not share C"
        assert lda >= max(1, m if transa == 0 else k)
        assert ldb >= max(1, k if transb == 0 else n)
        assert ldc >= max(1, m)
        a = self.at(A, self.types[a_type], (count, m, k), (stride_a, 1, lda) if transa == 0 else (stride_a, lda, 1))
        b = self.at(B, self.types[b_type], (count, k, n), (stride_b, 1, ldb) if transb == 0 else (stride_b, ldb, 1))
        c = self.at(C, self.types[c_type], (count, m, n), (stride_c, 1, ldc))
        alpha, beta = (float(self.at_host(x, self.ct)) for x in (alpha, beta))
        r = alpha * np.matmul(a.astype(np.float64), b.astype(np.float64))
        if beta:
            r += beta * c.astype(np.float64)
        c[...] = r

    def launch(self, kind, fn, grid, block, args, shared_mem, scores):
        self.launches.append((kind, fn, grid, block, shared_mem))
        name, params = fn.split("<")
        params = [p.strip() for p in params.rstrip(">").split(",")]
        t = _KERNEL_TYPES[params[0]]
        acc = np.dtype(np.float64) if t == np.float64 else np.dtype(np.float32)
        ptr, i64, i32 = np.uint64, np.int64, np.int32
        if name == "chunk_softmax":
            sig = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64,
                   i32, acc.type, i32, i32]
        else:
            sig = [ptr, ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64,
                   acc.type, i32]
        assert [type(x) for x in args] == sig, (fn, [type(x) for x in args])
        args = [x.item() for x in args]
        rows = args[13] if name == "chunk_softmax" else args[15]
        tpr = args[19]
        rpb = block[0] // tpr
        assert tpr & (tpr - 1) == 0 and rpb * tpr == block[0] <= 512 and len(grid) == 1
        assert grid[0] * rpb >= rows > (grid[0] - 1) * rpb
        n = args[1] if name == "chunk_softmax" else args[2]
        assert scores % n == 0 and scores // n == rows
        if name == "chunk_softmax":
            self._softmax(fn, t, acc, params[1], params[2] == "true", int(params[3]), *args,
                          shared_mem=shared_mem, rpb=rpb)
        else:
            assert shared_mem == 0
            self._dscores(t, acc, *args)

    # -- emulation -------------------------------------------------------------------------
    @staticmethod
    def at_host(addr, dtype):
        dtype = np.dtype(dtype)
        return np.ndarray((), dtype, buffer=(ctypes.c_char * dtype.itemsize).from_address(addr))

    def at(self, addr, dtype, shape, strides):
        """A NumPy view of `shape` and element `strides` at address `addr`, after checking that
        every element lies inside one registered array."""
        dtype = np.dtype(dtype)
        if 0 in shape:
            return np.zeros(shape, dtype)
        lo = addr + dtype.itemsize * sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
        hi = addr + dtype.itemsize * (sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + 1)
        assert any(r0 <= lo and hi <= r1 for r0, r1, _ in self.regions), f"out of bounds: {addr:#x} {shape} {strides}"
        one = np.ndarray((1,), dtype, buffer=(ctypes.c_char * dtype.itemsize).from_address(addr))
        return np.lib.stride_tricks.as_strided(one, shape, [s * dtype.itemsize for s in strides])

    @staticmethod
    def _row_index(rows, ng, nr):
        assert rows % (ng * nr) == 0
        return np.unravel_index(np.arange(rows), (rows // (ng * nr), ng, nr))

    def _softmax(self, fn, t, acc, mask_t, recompute, vpt, S, n, pitch, P, lse, lsh, lsg, lsr, mask, msh, msg, msr,
                 msk, rows, ng, nr, causal_offset, causal, scale, tpr, resident, shared_mem, rpb):
        assert pitch % 8 == 0 and pitch >= n
        assert vpt >= 0 and not (recompute and vpt)
        if vpt:     # register rows: whole warps per row, the row within their registers, unit mask key stride
            assert resident == 1 and shared_mem == 0
            assert tpr >= 32 and tpr * vpt * 16 >= n * acc.itemsize
            assert mask_t == "chunked::NoMask" or msk == 1
        elif recompute or not resident:
            assert shared_mem == 0 and not (recompute and resident)
        else:       # rows kept in shared memory: the launch asks for them, within the device's limit
            assert shared_mem == rpb * -(-n * acc.itemsize // 16) * 16 <= self.smem_limit
            assert shared_mem <= 48 * 1024 or self.allowed_smem.get(fn, 0) >= shared_mem
        ih, ig, ir = self._row_index(rows, ng, nr)
        s = self.at(S, acc, (rows, n), (pitch, 1)).astype(acc) * acc.type(scale)
        if mask_t != "chunked::NoMask":
            m = self.at(mask, _KERNEL_TYPES[mask_t], (rows // (ng * nr), ng, nr, n), (msh, msg, msr, msk))[ih, ig, ir]
            s = np.where(m, s, -np.inf).astype(acc) if mask_t == "bool" else s + m.astype(acc)
        if causal:
            s = np.where(np.arange(n)[None, :] > (ir + causal_offset)[:, None], -np.inf, s).astype(acc)
        lse_v = self.at(lse, acc, (rows // (ng * nr), ng, nr), (lsh, lsg, lsr))
        with np.errstate(all="ignore"):
            if recompute:
                saved = lse_v[ih, ig, ir]
                p = np.exp(s - np.where(np.isneginf(saved), 0, saved)[:, None])
            else:
                mx = np.fmax.reduce(s, axis=1)
                shift = np.where(np.isneginf(mx), 0, mx)
                e = np.exp(s - shift[:, None])
                total = e.sum(axis=1)
                p = e / np.where(total == 0, 1, total)[:, None]
                lse_v[ih, ig, ir] = shift + np.log(total)
        self.at(P, t, (rows, n), (pitch, 1))[...] = p

    def _dscores(self, t, acc, P, dP, n, pitch, dO, dsh, dsg, dsr, dsd, O, osh, osg, osr, osd, dv, rows, ng, nr,
                 scale, tpr):
        ih, ig, ir = self._row_index(rows, ng, nr)
        nh = rows // (ng * nr)
        do = self.at(dO, t, (nh, ng, nr, dv), (dsh, dsg, dsr, dsd))[ih, ig, ir].astype(acc)
        o = self.at(O, t, (nh, ng, nr, dv), (osh, osg, osr, osd))[ih, ig, ir].astype(acc)
        delta = (do * o).sum(axis=1, keepdims=True)
        p = self.at(P, t, (rows, n), (pitch, 1))
        dp = self.at(dP, acc, (rows, n), (pitch, 1))
        p[...] = p.astype(acc) * (dp - delta) * acc.type(scale)


def _emulate_cupy_path(monkeypatch, smem_limit=48 * 1024):
    """Route the chunked backend's NumPy calls through the CuPy path on an EmulatedDevice;
    returns the list the devices (one per call) are appended to. `smem_limit` may be a list
    holding the limit (changed between calls)."""
    devices = []

    def steps(problem):
        dev = EmulatedDevice(problem, smem_limit[0] if isinstance(smem_limit, list) else smem_limit)
        devices.append(dev)
        return _chunked._CupySteps(problem, device=dev)
    monkeypatch.setattr(_chunked, "_steps", steps)
    return devices


def _relayout(a, how):
    """The same values as `a` (NumPy or CuPy) in another memory layout: "blhd" the last two but one
    axes swapped in memory (unit stride kept; no copy needed), "fortran" Fortran order (no unit
    stride in the last two axes unless they are short: copied once), "reversed" negative strides
    along the last two axes (copied once where a GEMM reads it, read in place by the kernels)."""
    xp = np if isinstance(a, np.ndarray) else __import__("cupy")
    if how == "blhd" and a.ndim >= 3:
        return xp.ascontiguousarray(a.swapaxes(-2, -3)).swapaxes(-2, -3)
    if how == "fortran":
        return xp.asfortranarray(a)
    if how == "reversed":
        flip = (Ellipsis, slice(None, None, -1), slice(None, None, -1)) if a.ndim >= 2 else (slice(None, None, -1),)
        return xp.ascontiguousarray(a[flip])[flip]
    return a


def _odd_layouts(inputs, how):
    """q, k, v and mask relaid out (`_relayout`); "broadcast": k and v of batch element 0 read
    through a batch stride 0."""
    if how == "broadcast":
        xp = np if isinstance(inputs["k"], np.ndarray) else __import__("cupy")
        return dict(inputs, k=xp.broadcast_to(inputs["k"][:1], inputs["k"].shape),
                    v=xp.broadcast_to(inputs["v"][:1], inputs["v"].shape))
    return {name: _relayout(a, how) for name, a in inputs.items()}


EMULATED_CASES = [
    Case(),
    Case(batch=(2, 1), heads_q=6, heads_kv=2, len_q=37, len_k=23, causal=True, mask="bool_empty_rows"),
    Case(heads_q=4, heads_kv=2, len_q=50, len_k=70, head_dim=8, head_dim_v=5, causal=True, mask="bias"),
    Case(batch=(), heads_q=3, heads_kv=1, len_q=70, len_k=30, causal=True, head_dim=20, head_dim_v=12),
    Case(batch=(2,), heads_q=4, heads_kv=2, len_q=30, len_k=45, mask="bool", scale=0.7, dtype=F64),
    Case(batch=(2,), heads_q=4, heads_kv=4, len_q=9, len_k=200, head_dim=1, head_dim_v=1, dtype=F64),
]


# the float64 cases keep their dtype; the others run in float32 and in bfloat16
_EMULATED = [pytest.param(c if c.dtype == F64 else c.with_(dtype=dt), id=f"{i}-{np.dtype(c.dtype if c.dtype == F64 else dt)}")
             for i, c in enumerate(EMULATED_CASES)
             for dt in ((F64,) if c.dtype == F64 else (np.dtype(np.float32), np.dtype(cupyattn.bfloat16)))]


@pytest.mark.parametrize("layout", ("plain", "blhd", "fortran", "reversed", "broadcast"))
@pytest.mark.parametrize("case", _EMULATED)
def test_cupy_path_emulated(monkeypatch, case, layout):
    if case.causal:    # small tiles, so these small causal problems are cut along the diagonal
        monkeypatch.setattr(_chunked, "MIN_CAUSAL_TILE", 4)
        monkeypatch.setattr(_chunked, "CAUSAL_TILES", 5)
        monkeypatch.setattr(_chunked, "CAUSAL_TILE_ALIGN", 2)
    inputs = _odd_layouts(make_inputs(np, case), layout)
    kw = case.kwargs(inputs)
    ref_out, ref_lse = reference_attention(inputs["q"], inputs["k"], inputs["v"], **kw)
    dout = np.random.default_rng(1).standard_normal(ref_out.shape).astype(case.dtype)
    refs = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **kw)
    *_, eager = run(np, case, inputs, backend="eager", dout=dout)
    eager_out, _ = run(np, case, inputs, backend="eager")
    smem = [0]
    devices = _emulate_cupy_path(monkeypatch, smem)
    vpts = dict(_chunked.FORWARD_VPT)
    # register rows, or (off) the shared-memory kernel: with small shared memory long rows use the
    # two-pass softmax, short ones stay resident
    for rows, smem[0], registers in ((1, 2048, True), (7, 64 << 10, False), (100, 2048, False),
                                     (10**6, 64 << 10, True)):
        monkeypatch.setattr(_chunked, "FORWARD_VPT", vpts if registers else {k: 0 for k in vpts})
        devices.clear()
        with _chunked.workspace(budget_for_rows(case, rows, "backward")):
            out, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="chunked",
                                          return_lse=True, **kw)
            # dO, O and lse as the caller may hold them: any layout (read in place or copied once)
            grads = cupyattn.attention_backward(
                _relayout(dout, layout), inputs["q"], inputs["k"], inputs["v"], _relayout(out, layout),
                _relayout(lse, layout), backend="chunked", **kw)
        assert len(devices) == 2 and devices[0].gemms and devices[1].launches      # the CuPy path ran
        forward_vpts = {int(fn.rstrip(">").rsplit(",", 1)[1]) for kind, fn, *_ in devices[0].launches}
        if not registers:
            assert forward_vpts == {0}
        elif layout in ("plain", "broadcast") and case.len_k <= 4096:       # unit mask key stride, short rows
            assert forward_vpts == {vpts[8 if case.dtype == F64 else 4]}
        assert rel_error(out, ref_out) <= allowed_error(rel_error(eager_out, ref_out), case.dtype)
        assert rel_error(lse, ref_lse) <= lse_tolerance(case.dtype)
        for name, g, e, r in zip("qkv", grads, eager, refs):
            assert rel_error(g, r) <= allowed_error(rel_error(e, r), case.dtype, factor=3.0), name


@pytest.mark.parametrize("layout", ("blhd", "fortran", "reversed", "broadcast"))
def test_odd_layouts(xp, monkeypatch, layout):
    """Inputs and backward arguments in other memory layouts, on the real path of each library
    (on CuPy: read in place by cuBLAS and the kernels, or copied once per call)."""
    monkeypatch.setattr(_chunked, "MIN_CAUSAL_TILE", 4)
    monkeypatch.setattr(_chunked, "CAUSAL_TILE_ALIGN", 2)
    case = Case(batch=(2,), heads_q=6, heads_kv=2, len_q=37, len_k=41, head_dim=24, head_dim_v=16,
                causal=True, mask="bias", dtype=np.dtype(np.float32))
    inputs = _odd_layouts(make_inputs(xp, case), layout)
    kw = case.kwargs(inputs)
    ref_out, ref_lse = reference_attention(inputs["q"], inputs["k"], inputs["v"], **kw)
    dout_np = np.random.default_rng(2).standard_normal(ref_out.shape).astype(case.dtype)
    dout = dout_np if xp is np else xp.asarray(dout_np)
    refs = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **kw)
    for rows in (5, 10**6):
        with _chunked.workspace(budget_for_rows(case, rows, "backward")):
            out, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="chunked",
                                          return_lse=True, **kw)
            grads = cupyattn.attention_backward(_relayout(dout, layout), inputs["q"], inputs["k"], inputs["v"],
                                                _relayout(out, layout), _relayout(lse, layout),
                                                backend="chunked", **kw)
        assert rel_error(out, ref_out) <= 10 * tolerance(case.dtype)
        assert rel_error(lse, ref_lse) <= lse_tolerance(case.dtype)
        for name, g, r in zip("qkv", grads, refs):
            assert rel_error(g, r) <= 30 * tolerance(case.dtype), name


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("heads_q,heads_kv", ((4, 4), (8, 2), (8, 4)))
def test_cupy_path_calls_per_chunk(monkeypatch, causal, heads_q, heads_kv):
    """The forward makes one cuBLAS call per product and one launch per chunk, the backward five
    and two (MHA and GQA with whole rows). GQA with causal tiles, where a group's rows are not
    one matrix: min(kv heads, group) calls per product over the rows, a loop over the group for
    the sums over it (dV, dK)."""
    if causal:
        monkeypatch.setattr(_chunked, "MIN_CAUSAL_TILE", 8)
        monkeypatch.setattr(_chunked, "CAUSAL_TILE_ALIGN", 8)
    case = Case(batch=(2,), heads_q=heads_q, heads_kv=heads_kv, len_q=64, len_k=64, head_dim=16, head_dim_v=16,
                causal=causal)
    inputs = make_inputs(np, case)
    problem = cupyattn._api.normalize(inputs["q"], inputs["k"], inputs["v"], causal=causal)
    devices = _emulate_cupy_path(monkeypatch)
    dout = inputs["q"][..., :16] * 0.5
    tiles = causal and _chunked.row_tile(problem) < case.len_q
    for rows in (3, 64, 200, 10**6):
        budget = budget_for_rows(case, rows, "backward")
        devices.clear()
        run(np, case, inputs, budget=budget, dout=dout)
        # the two batch elements fold into the head axis (fold_batch): one pass over 2*H heads
        folded = _chunked.batch_folded(problem)
        assert folded.batch_shape == (1,) and folded.num_heads_q == 2 * heads_q
        for dev, direction, kinds in ((devices[0], "forward", ["softmax"]),
                                      (devices[1], "backward", ["recompute", "dscores"])):
            chunks = _chunked.problem_chunks(folded, _chunked.chunk_rows(folded, direction, budget))
            assert [k for k, *_ in dev.launches] == kinds * len(chunks)
            calls = 0
            for h0, h1, g0, g1, *_ in chunks:
                # products over the chunk's rows; dV and dK sum over the group (a loop over it)
                rows_products, sum_products = (2, 0) if direction == "forward" else (3, 2)
                if tiles:
                    calls += rows_products * min(h1 - h0, g1 - g0) + sum_products * (g1 - g0)
                else:
                    calls += rows_products + sum_products
            assert len(dev.gemms) == calls, (direction, rows)


def test_merged_heads_is_a_view_or_none():
    """Batch axes fold into the head axis only as a view: contiguous and row-sliced arrays fold,
    size-1 axes of any stride are ignored, a batch axis broadcast over distinct heads does not fold,
    a mask broadcast over batch and heads alike folds (stride 0 throughout)."""
    base = np.arange(2 * 3 * 5 * 7 * 4, dtype=np.float32).reshape(2, 3, 5, 7, 4)
    for a, nb in ((base, 2), (base[:, :, :, 1:6], 2), (base[:1], 2), (base[0], 1),
                  (np.broadcast_to(base[:1, :1, :1], (2, 3, 1, 7, 4)).reshape(2, 3, 1, 7, 4), 2),
                  (np.broadcast_to(base[0, 0, :1], (2, 3, 5, 7, 4)), 2)):
        m = _chunked.merged_heads(a, nb)
        assert m is not None and np.shares_memory(m, a), (a.shape, a.strides)
        assert m.shape == (1, int(np.prod(a.shape[:nb + 1]))) + a.shape[nb + 1:]
        np.testing.assert_array_equal(m[0], a.reshape((-1,) + a.shape[nb + 1:]))
    for a, nb in ((base[:, :, ::2], 2), (base[:, :, 1:4], 2), (base[:, :1], 2), (base.swapaxes(0, 1), 2),
                  (np.broadcast_to(base[:1], (2, 3, 5, 7, 4)), 2)):
        assert _chunked.merged_heads(a, nb) is None, (a.shape, a.strides)


@pytest.mark.parametrize("causal", (False, True))
def test_batch_fold_matches_per_batch(monkeypatch, causal):
    """A GQA problem with a bias broadcast over the batch folds (fold_batch) and gives, within
    rounding, what one batch element at a time gives; K broadcast over the batch does not fold."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 4, 37, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 2, 29, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 2, 29, 8)).astype(np.float32)
    bias = np.broadcast_to(rng.standard_normal((37, 29)).astype(np.float32), (2, 3, 4, 37, 29))
    problem = cupyattn._api.normalize(q, k, v, mask=bias, causal=causal)
    assert _chunked.fold_batch(problem) is not None
    assert _chunked.fold_batch(cupyattn._api.normalize(q, k[:1], v[:1], causal=causal)) is None
    budget = 40 * _chunked.bytes_per_row(problem, "backward")        # chunks of 40 rows: several per head
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse = _chunked.chunked_forward(problem, budget)
    grads = _chunked.chunked_backward(problem, dout, out, lse, budget)
    monkeypatch.setattr(_chunked, "fold_batch", lambda *a: None)
    out1, lse1 = _chunked.chunked_forward(problem, budget)
    grads1 = _chunked.chunked_backward(problem, dout, out1, lse1, budget)
    # the same float32 arithmetic, batched differently, so summed in another order: a few float32
    # ulps per accumulated term, relative to each array's scale (-inf lse rows must match exactly)
    eps = np.finfo(np.float32).eps
    for a, b in zip((out, lse) + tuple(grads), (out1, lse1) + tuple(grads1)):
        assert a.shape == b.shape
        scale = np.abs(b[np.isfinite(b)]).max()
        np.testing.assert_allclose(a, b, rtol=64 * eps, atol=64 * eps * scale)


def test_tensor_addresses_match_views():
    """_Tensor's address arithmetic gives the address NumPy gives the chunk views of the arrays
    (grouped query heads, shared kv heads, odd strides, broadcast batch axes, lse without columns)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 2, 6, 11, 5)).astype(np.float32)
    arrays = {
        "q": base[:, :, :, 1:10, :4],                                           # (B1, B2, Hq=6, L=9, D=4), gaps
        "q_blhd": np.ascontiguousarray(base.swapaxes(-2, -3)).swapaxes(-2, -3),
        "bcast": np.broadcast_to(base[:1, :, :, :, 0], (3, 2, 6, 11)),         # lse-like, batch stride 0
        "rev": base[:, :, ::-1, ::-1, :],
    }
    problem = types.SimpleNamespace(num_heads_kv=3, group_size=2)
    for name, a in arrays.items():
        for grouped in (True, False):
            t = _chunked._Tensor(a, a.ctypes.data, 2, problem.group_size if grouped else None)
            for bi in np.ndindex(*a.shape[:2]):
                view = _chunked._grouped(problem, a[bi]) if grouped else a[bi][:, None]
                for h, g, r in ((0, 0, 0), (2, 1, 3), (1, 0, a.shape[3] - 1)):
                    if not grouped:
                        h, g = 2 * h % a.shape[2], 0
                    expect = view[h, g, r].ctypes.data if view.ndim > 3 else view[h, g, r:].ctypes.data
                    assert t.base(bi) + h * t.bh + g * t.bg + r * t.br == expect, (name, grouped, bi, h, g, r)
                assert t.strides[:view.ndim] == tuple(s // a.itemsize for s in view.strides), (name, grouped)


@pytest.mark.parametrize("seed", range(40))
def test_plan_gemm_matches_matmul(seed):
    """plan_gemm against NumPy on random batched products: broadcast (stride 0 / size 1) batch
    axes, sums over axes where C has size 1, transposed and gapped operands, accumulation."""
    rng = np.random.default_rng(seed)
    m, k, n = (int(x) for x in rng.integers(1, 6, 3))
    batch = tuple(int(x) for x in rng.integers(1, 4, 2))
    dev = EmulatedDevice(types.SimpleNamespace(compute_dtype=np.dtype(np.float64)))
    code = _chunked._CUDA_TYPES[np.dtype(np.float64)][1]

    def operand(shape, kind):
        shape = tuple(1 if (kind == "bcast" and i < 2 and rng.random() < 0.5) else x for i, x in enumerate(shape))
        if rng.random() < 0.4:          # stored transposed
            full = rng.standard_normal(shape[:-2] + (shape[-1], shape[-2])).swapaxes(-1, -2)
        else:
            full = rng.standard_normal(shape[:-2] + (shape[-2], shape[-1] + int(rng.integers(0, 3))))[..., :shape[-1]]
        return full

    a, b = operand(batch + (m, k), "bcast"), operand(batch + (k, n), "bcast")
    a = np.broadcast_to(a, batch + a.shape[-2:]) if rng.random() < 0.3 else a     # stride-0 batch axes
    c_shape = tuple(1 if rng.random() < 0.3 else x for x in batch) + (m, n)
    c_full = rng.standard_normal(c_shape[:-1] + (n + 2,))
    c = c_full[..., :n]
    accumulate = bool(rng.random() < 0.5)
    expect = np.matmul(a, b)
    expect = expect.sum(axis=tuple(i for i in range(2) if c_shape[i] == 1 and expect.shape[i] != 1), keepdims=True)
    expect = expect + (c if accumulate else 0)

    def op(x):
        return _chunked.GemmOperand(x.shape, tuple(s // 8 for s in x.strides), code, 8)
    plan = _chunked.plan_gemm(op(a), op(b), op(c), accumulate)
    for x in (a, b, c_full):
        dev.ptr(x)
    for oa, ob, oc, acc in plan.calls:
        dev.gemm(plan, b.ctypes.data + ob, a.ctypes.data + oa, c.ctypes.data + oc, acc)
    np.testing.assert_allclose(c, np.broadcast_to(expect, c.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("hkv,group,lq,lk", [(3, 2, 40, 40), (2, 1, 37, 90), (1, 3, 50, 20), (4, 1, 64, 64)])
def test_problem_chunks_fit_the_workspace(monkeypatch, causal, hkv, group, lq, lk):
    monkeypatch.setattr(_chunked, "MIN_CAUSAL_TILE", 4)
    monkeypatch.setattr(_chunked, "CAUSAL_TILE_ALIGN", 4)
    q = np.zeros((1, hkv * group, lq, 2), np.float32)
    k = np.zeros((1, hkv, lk, 2), np.float32)
    problem = cupyattn._api.normalize(q, k, k, causal=causal)
    tile = _chunked.row_tile(problem)
    for rows in (1, 5, 16, 64, 500, 10**6):
        rows = min(rows, hkv * group * lq)
        capacity = rows * _chunked.row_pitch(lk)
        seen = np.zeros((hkv, group, lq), int)
        for h0, h1, g0, g1, r0, r1, n in _chunked.problem_chunks(problem, rows):
            assert n == _chunked.visible_keys(problem, r1) > 0
            assert (h1 - h0) * (g1 - g0) * (r1 - r0) * _chunked.row_pitch(n) <= capacity
            assert r0 // tile == (r1 - 1) // tile                    # never across a tile edge
            seen[h0:h1, g0:g1, r0:r1] += 1
        visible = np.array([_chunked.visible_keys(problem, r + 1) > 0 for r in range(lq)])
        # rows that see no key may ride along in a chunk with rows that do (zero results)
        assert np.all(seen[..., visible] == 1) and np.all(seen[..., ~visible] <= 1)
        if not causal or tile >= lq:   # without tiles: iter_chunks' chunks (those that see a key)
            assert [c[:6] for c in _chunked.problem_chunks(problem, rows)] == [
                c for c in _chunked.iter_chunks(hkv, group, lq, rows) if _chunked.visible_keys(problem, c[5]) > 0]
