"""The Hopper (sm_90a) flash forward kernel, called directly (cupyattn._flash_sm90.forward), so that
a fallback to another kernel cannot pass for it. GPU tests skip where the device is not sm_90."""
import functools

import numpy as np
import pytest

import cupyattn
from cupyattn import _flash_sm90
from cupyattn._problem import BFLOAT16, FLOAT16, FLOAT32, normalize
from helpers import allowed_error
from reference import as_float64, reference_attention, rel_error


def _sm90_missing():
    try:
        import cupy
        cc = cupy.cuda.Device(0).compute_capability
    except Exception as exc:  # no CuPy, no driver, no device
        return f"no CUDA device ({type(exc).__name__})"
    return None if cc == "90" else f"needs an sm_90 GPU, device is sm_{cc}"


SM90_MISSING = _sm90_missing()
sm90_only = pytest.mark.skipif(SM90_MISSING is not None, reason=f"sm90 kernel: {SM90_MISSING}")

SHAPES = [(113, 203), (128, 217), (256, 512), (512, 256), (1023, 1024), (1, 239), (2048, 2048)]
HEADS_Q = 4
DTYPES = [pytest.param(BFLOAT16, id="bf16"), pytest.param(FLOAT16, id="fp16")]


def _inputs(shape_q, shape_k, dtype, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_q, dtype=np.float32).astype(dtype)
    k = rng.standard_normal(shape_k, dtype=np.float32).astype(dtype)
    v = rng.standard_normal(shape_k, dtype=np.float32).astype(dtype)
    return q, k, v


@functools.lru_cache(maxsize=16)
def _grid_case(lq, lk, d, gqa, causal, batch):
    """Inputs exactly representable in both bfloat16 and float16 (bfloat16 values, tiny ones
    flushed to 0), so one float64 reference serves both dtypes."""
    q, k, v = _inputs((batch, HEADS_Q, lq, d), (batch, HEADS_Q // gqa, lk, d), BFLOAT16,
                      seed=lq * 7919 + lk * 31 + d + gqa)
    q, k, v = (np.where(np.abs(a.astype(np.float32)) < 2.0**-14, 0, a).astype(BFLOAT16) for a in (q, k, v))
    return (q, k, v), reference_attention(q, k, v, causal=causal)


GRIDS = [pytest.param(g, id=g) for g in _flash_sm90.GRIDS]


def _run(q, k, v, causal, scale=None, grid=None, config=None):
    problem = normalize(q, k, v, causal=causal, scale=scale)
    assert _flash_sm90.supports(problem) == []
    return _flash_sm90.forward(problem, poison=True, grid=grid, config=config)


def _check_twice(qn, kn, vn, causal, ref=None, grid=None, config=None):
    """Run the kernel on host inputs, check out and lse against the float64 reference, run it again
    on the same inputs: identical bits."""
    import cupy
    q, k, v = cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn)
    out, lse = _run(q, k, v, causal, grid=grid, config=config)
    assert out.dtype == qn.dtype and lse.dtype == FLOAT32
    _check(qn, kn, vn, out, lse, causal, ref=ref)
    out2, lse2 = _run(q, k, v, causal, grid=grid, config=config)
    assert np.array_equal(cupy.asnumpy(out).view(np.uint16), cupy.asnumpy(out2).view(np.uint16)), \
        "same inputs, different bits"
    assert np.array_equal(cupy.asnumpy(lse).view(np.uint32), cupy.asnumpy(lse2).view(np.uint32))


# Configurations the shape grid does not cover in both masks, forced on short shapes, causal and
# not: the long-key tiles, the medium-key full tiles (D=128, BN=160), the short-causal D=64 tile
# (two consumers), D=64's default (three consumers, which short causal rows do not take) and the
# instantiations of EXTRA_CONFIGS.
def _forced_configs():
    full = _flash_sm90.full_config
    pairs = [(d, full(c)) for table in (_flash_sm90.LONG_CONFIGS, _flash_sm90.MEDIUM_FULL_CONFIGS,
                                        _flash_sm90.SHORT_CAUSAL_CONFIGS)
             for d, c in table.items()]
    pairs += [(d, full(_flash_sm90.CONFIGS[d])) for d in _flash_sm90.SHORT_CAUSAL_CONFIGS]
    pairs += [(d, full(c)) for d, cs in _flash_sm90.EXTRA_CONFIGS.items() for c in cs]
    return [pytest.param(d, c, id=f"D{d}-" + "x".join(map(str, c))) for d, c in sorted(set(pairs))]


FORCED_CONFIGS = _forced_configs()
LONG_TILES = [pytest.param(d, id=f"D{d}") for d in sorted(_flash_sm90.LONG_CONFIGS)]


def _check(q, k, v, out, lse, causal, scale=None, ref=None):
    """Output within the tolerance rule (relative to eager's error), lse close, hidden rows 0."""
    import cupy
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, scale=scale) if ref is None else ref
    out_h, lse_h = as_float64(out), as_float64(lse)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert np.isfinite(out_h).all(), "NaN/inf in the output (unwritten rows keep the NaN poison)"
    eager = cupyattn.attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), causal=causal,
                               scale=scale, backend="eager")
    dtype = np.dtype(q.dtype)
    err, eager_err = rel_error(out_h, ref_out), rel_error(eager, ref_out)
    assert err <= allowed_error(eager_err, dtype), (err, eager_err)
    hidden = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse_h), hidden), "lse must be -inf exactly on rows that see no key"
    assert not np.isnan(lse_h).any()
    assert (out_h[hidden] == 0).all(), "rows that see no key must be 0"
    seen = ~hidden
    if seen.any():
        lse_err = np.abs(lse_h[seen] - ref_lse[seen]) / np.maximum(1.0, np.abs(ref_lse[seen]))
        assert lse_err.max() <= 2e-3, lse_err.max()


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("lq,lk", SHAPES)
def test_shape_grid(lq, lk, d, causal, gqa, dtype):
    batch = 2 if lq * lk <= 512 * 512 else 1
    base, ref = _grid_case(lq, lk, d, gqa, causal, batch)
    qn, kn, vn = (a.astype(dtype) for a in base)   # exact
    _check_twice(qn, kn, vn, causal, ref=ref)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("lq,lk", [(113, 203), (1, 239), (512, 256), (1023, 1024)])
@pytest.mark.parametrize("grid", GRIDS)
def test_both_grids(grid, lq, lk, d, causal, dtype):
    """Every grid (not only the one grid_kind picks), identical bits on repeat."""
    qn, kn, vn = _inputs((2, HEADS_Q, lq, d), (2, 1, lk, d), dtype, seed=lq + lk + d)
    _check_twice(qn, kn, vn, causal, grid=grid)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,config", FORCED_CONFIGS)
@pytest.mark.parametrize("lq,lk", [(113, 203), (1, 239), (512, 256), (1023, 1024), (300, 1337), (200, 200),
                                   (449, 700), (1300, 1100)])
@pytest.mark.parametrize("grid", GRIDS)
def test_forced_configs(grid, lq, lk, d, config, causal, dtype):
    """The configurations forward() does not pick for these shapes, forced: the wide key tiles of
    long key ranges (LONG_CONFIGS) and the extra instantiations (EXTRA_CONFIGS: three consumer
    warpgroups, 192-row tiles). Partial key tiles, partial query tiles (Lq a multiple of neither
    128 nor 192; 113 and 200 leave a 192-row tile's third warpgroup with no valid row, 449 = 2*192
    + 65 its last warpgroup with one), Lq > Lk (rows that see nothing), several m-blocks, GQA;
    identical bits on repeat."""
    qn, kn, vn = _inputs((2, HEADS_Q, lq, d), (2, 2, lk, d), dtype, seed=lq + 3 * lk + d)
    _check_twice(qn, kn, vn, causal, grid=grid, config=config)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("d", LONG_TILES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_keys_dispatch(d, causal):
    """Lk past LONG_KEYS through the default choice (which picks the wide tiles)."""
    import cupy
    lk = _flash_sm90.LONG_KEYS + 77
    qn, kn, vn = _inputs((1, 2, 200, d), (1, 1, lk, d), BFLOAT16, seed=d + lk)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), causal)
    _check(qn, kn, vn, out, lse, causal)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("d", [pytest.param(d, id=f"D{d}") for d in sorted(_flash_sm90.MEDIUM_FULL_CONFIGS)])
def test_medium_keys_dispatch(d):
    """A full row that takes MEDIUM_FULL_CONFIGS through the default choice (BN=160 at D=128,
    with the deferred tile end: more tiles than the 132 SMs of an H100 / H200, so blocks carry a
    pending tile end; a partial last key tile and m-block; GQA)."""
    import cupy
    lk = _flash_sm90.MEDIUM_KEYS + 504   # 4600: 160 pads the last key tile by 40 keys, 176 by 152
    assert _flash_sm90.tile_config(d, lk) == _flash_sm90.full_config(_flash_sm90.MEDIUM_FULL_CONFIGS[d])
    qn, kn, vn = _inputs((4, 4, 1100, d), (4, 1, lk, d), BFLOAT16, seed=d + lk)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), False)
    _check(qn, kn, vn, out, lse, False)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("grid", GRIDS)
def test_many_tiles(grid):
    """More tiles than SMs (a persistent block loops; K/V ring and Q phases carry across tiles),
    causal with Lq != Lk, GQA, a partial last m-block."""
    import cupy
    qn, kn, vn = _inputs((4, 16, 2000, 128), (4, 4, 2100, 128), BFLOAT16, seed=11)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), True, grid=grid)
    _check(qn, kn, vn, out, lse, True)
    qn, kn, vn = _inputs((37, 8, 300, 64), (37, 2, 310, 64), FLOAT16, seed=12)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), False, grid=grid)
    _check(qn, kn, vn, out, lse, False)


@pytest.mark.gpu
@sm90_only
def test_dynamic_scheduler_counters_reset():
    """The dynamic grid leaves its tile counters at zero after every launch (the next launch on the
    stream relies on it), on the default stream and on a stream of its own, for launches with fewer
    tiles than SMs, many more, and one after another with no synchronisation between them."""
    import cupy
    cases = [_inputs((1, 2, 100, 64), (1, 2, 120, 64), BFLOAT16, seed=21),          # 2 tiles
             _inputs((3, 16, 1500, 64), (3, 4, 1600, 64), BFLOAT16, seed=22)]       # 576 tiles
    for stream in (cupy.cuda.Stream.null, cupy.cuda.Stream(non_blocking=True)):
        with stream:
            results = []
            for _ in range(3):
                for qn, kn, vn in cases:
                    results.append(_run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), True, grid="dynamic"))
            stream.synchronize()
            counters = _flash_sm90._scheduler_counters(cupy.cuda.Device().id)
            assert cupy.asnumpy(counters).tolist() == [0, 0]
            for i, (out, lse) in enumerate(results):
                _check(*cases[i % 2], out, lse, True)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_strided_and_broadcast_layouts(causal, grid):
    """Inputs read in place: a (B, L, H, D) tensor viewed as (B, H, L, D), K/V broadcast over a
    batch axis (stride 0), three batch axes (the leading ones looped on the host), a scale."""
    import cupy
    dtype, d = BFLOAT16, 128
    # (B, L, H, D) storage viewed as (B, H, L, D)
    qn, kn, vn = _inputs((2, 300, 4, d), (2, 333, 2, d), dtype, seed=1)
    q, k, v = (cupy.asarray(a).transpose(0, 2, 1, 3) for a in (qn, kn, vn))
    out, lse = _run(q, k, v, causal, scale=0.3, grid=grid)
    _check(*(a.transpose(0, 2, 1, 3) for a in (qn, kn, vn)), out, lse, causal, scale=0.3)
    # K/V shared by every batch entry: (1, H, L, D) against q (3, H, L, D)
    qn, kn, vn = _inputs((3, 4, 200, d), (1, 2, 250, d), dtype, seed=2)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), causal, grid=grid)
    _check(qn, kn, vn, out, lse, causal)
    # three batch axes that cannot merge (k, v broadcast along the middle one)
    qn, kn, vn = _inputs((2, 3, 2, 2, 130, 64), (2, 1, 2, 1, 140, 64), dtype, seed=3)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), causal, grid=grid)
    _check(qn, kn, vn, out, lse, causal)
    # negative scale: the running max must be taken of the scaled scores
    qn, kn, vn = _inputs((1, 2, 100, 64), (1, 2, 180, 64), FLOAT16, seed=4)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), causal, scale=-0.2, grid=grid)
    _check(qn, kn, vn, out, lse, causal, scale=-0.2)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("width", [None, 3, 1])
def test_many_heads_and_batches(width, monkeypatch):
    """Many (batch, head) pairs; block order grouped `width` pairs at a time (296 % 3 != 0 leaves a
    partial last group), so every block must still find its own tile."""
    import cupy
    monkeypatch.setattr(_flash_sm90, "SWIZZLE_WIDTH", width)
    qn, kn, vn = _inputs((37, 8, 300, 64), (37, 2, 310, 64), FLOAT16, seed=5)
    out, lse = _run(cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn), True)
    _check(qn, kn, vn, out, lse, True)


# ---------------------------------------------------------------------------------------------
# CPU: no compilation, only the reasons the kernel gives for NumPy inputs and the spec list

def test_supports_reasons_cpu():
    q = np.zeros((2, 4, 100, 128), np.float16)
    k = np.zeros((2, 2, 50, 128), np.float16)
    only_numpy = _flash_sm90.supports(normalize(q, k, k))
    assert len(only_numpy) == 1 and "NumPy" in only_numpy[0]

    def why(*args, **kw):
        return " | ".join(_flash_sm90.supports(normalize(*args, **kw)))

    assert "dtype float32" in why(q.astype(np.float32), k.astype(np.float32), k.astype(np.float32))
    assert "head dim 96" in why(q[..., :96], k[..., :96], k[..., :96])
    assert "D=128 != Dv=64" in why(q, k, k[..., :64])
    assert "mask" in why(q, k, k, mask=np.ones((100, 50), bool))
    assert "last axis is not contiguous" in why(q[..., ::2], k[..., ::2], k[..., ::2])
    # rows of 68 elements (136 bytes): the L stride is not a multiple of 16 bytes
    wide = np.zeros((2, 4, 100, 68), np.float16)[..., :64]
    assert "q's L stride (136 bytes) is not a multiple of 16" in why(wide, k[..., :64], k[..., :64])
    # base address 2 bytes past an aligned one
    flat = np.zeros(2 * 4 * 100 * 128 + 1, np.float16)
    shifted = flat[1:].reshape(2, 4, 100, 128)
    assert "q's base address is not 16-byte aligned" in why(shifted, k, k)
    # broadcast along the sequence axis cannot be a tensor map
    kb = np.broadcast_to(np.zeros((2, 2, 1, 128), np.float16), (2, 2, 50, 128))
    assert "k is broadcast along its sequence axis" in why(q, kb, k)
    # a broadcast batch axis is fine (extent-1 map dim), only NumPy is reported
    qb = np.broadcast_to(q[:1], q.shape)
    assert why(qb, k, k) == only_numpy[0]


def test_kernel_specs_cpu():
    specs = _flash_sm90.kernel_specs()
    assert len(specs) == len(set(specs))
    assert all(s.hopper_only and s.source == "flash_fwd_sm90.cu" for s in specs)
    full = _flash_sm90.full_config
    all_configs = {d: _flash_sm90.instantiated_configs(d) for d in _flash_sm90.HEAD_DIMS}
    for d, cs in all_configs.items():
        assert len(cs) == len(set(cs)) and all(len(c) == 3 for c in cs)
        wanted = [_flash_sm90.CONFIGS[d]] + [t[d] for t in (_flash_sm90.LONG_CONFIGS, _flash_sm90.MEDIUM_FULL_CONFIGS,
                                                            _flash_sm90.SHORT_CAUSAL_CONFIGS) if d in t]
        assert set(cs) == set(map(full, wanted + list(_flash_sm90.EXTRA_CONFIGS.get(d, ()))))
        assert set(_flash_sm90.configs(d)) == set(map(full, wanted))
    assert len(specs) == 2 * sum(len(cs) for cs in all_configs.values())   # two dtypes
    assert all(_flash_sm90.smem_bytes(d, c) <= 227 * 1024 for d, cs in all_configs.items() for c in cs)
    assert set(_flash_sm90.HEAD_DIMS) >= {64, 128, 256}
    # two consumers is the template's default and stays out of the name (old sources still fit)
    assert _flash_sm90.kernel_name(BFLOAT16, 128) == "flash_fwd_sm90_kernel<__nv_bfloat16, 128, 128, 2>"
    assert _flash_sm90.kernel_name(BFLOAT16, 64, (192, 3, 2)) == "flash_fwd_sm90_kernel<__nv_bfloat16, 64, 192, 3>"
    assert _flash_sm90.kernel_name(FLOAT16, 64, (128, 4, 3)) == "flash_fwd_sm90_kernel<__half, 64, 128, 4, 3>"
    # long key ranges take the wider tiles (D=128), full rows from MEDIUM_KEYS on BN=160 or 176
    # (D=128), short causal rows at D=64 two consumers, the rest the default; every choice is
    # instantiated
    assert _flash_sm90.tile_config(128, 4096) == (160, 2, 2) and _flash_sm90.tile_config(128, 4095) == (128, 2, 2)
    assert _flash_sm90.tile_config(128, 4096, True) == (128, 2, 2) and _flash_sm90.tile_config(128, 8192) == (176, 2, 2)
    # full rows from MEDIUM_KEYS: 160 where it pads the last key tile by >= 1% of Lk fewer keys than 176
    assert [_flash_sm90.tile_config(128, n)[0] for n in (4173, 4600, 5120, 6144, 7168, 20480)] == [176, 160, 160, 176, 176, 176]
    for d in _flash_sm90.HEAD_DIMS:
        for causal in (False, True):
            medium = None if causal else _flash_sm90.MEDIUM_FULL_CONFIGS.get(d)
            assert _flash_sm90.tile_config(d, 4096, causal) == full(medium or _flash_sm90.CONFIGS[d])
            assert _flash_sm90.spec_for(BFLOAT16, d, _flash_sm90.tile_config(d, 4096, causal)) in specs
            long_cfg = _flash_sm90.tile_config(d, _flash_sm90.LONG_KEYS, causal)
            assert long_cfg == full(_flash_sm90.LONG_CONFIGS.get(d, _flash_sm90.CONFIGS[d]))
            assert _flash_sm90.spec_for(BFLOAT16, d, long_cfg) in specs
        short_causal = _flash_sm90.tile_config(d, 1024, True)
        assert short_causal == full(_flash_sm90.SHORT_CAUSAL_CONFIGS.get(d, _flash_sm90.CONFIGS[d]))
        assert _flash_sm90.tile_config(d, 1024, False) == full(_flash_sm90.CONFIGS[d])
    assert _flash_sm90.tile_config(64, 4096) == (128, 4, 3) and _flash_sm90.tile_config(64, 1024, True)[2] == 2
    assert all(_flash_sm90.tile_config(d, n, c)[2] == 2 for d in (128, 256) for n in (1024, 16384) for c in (0, 1))
    # the other D=64 instantiations the A/B runs force are in the gate's list
    for cfg in ((128, 2, 3), (192, 3, 2)):
        assert cfg in all_configs[64]
        assert _flash_sm90.spec_for(BFLOAT16, 64, cfg) in specs and _flash_sm90.spec_for(FLOAT16, 64, cfg) in specs
    assert all(c[2] == 2 for d, cs in all_configs.items() if d != 64 for c in cs)


def test_config_geometry_cpu():
    """Block rows, threads and shared memory follow the consumer count (sm90::Roles / Plan)."""
    f = _flash_sm90
    assert f.full_config((128, 4)) == (128, 4, 2) and f.full_config([128, 4, 3]) == (128, 4, 3)
    for bad in ((128,), (128, 4, 1), (128, 4, 4), (1, 2, 3, 4)):
        with pytest.raises(ValueError):
            f.full_config(bad)
    assert (f.block_m((128, 4)), f.threads((128, 4))) == (128, 384) == (f.BLOCK_M, f.THREADS)
    assert (f.block_m((128, 4, 3)), f.threads((128, 4, 3))) == (192, 512)
    # Q: 64 rows a consumer; barriers: Q full/empty a consumer + K/V full/empty a stage; queue; slack;
    # with two consumers, where it fits, an O staging buffer the size of Q (the deferred tile end)
    assert f.defers_tile_end(64, (128, 4, 2)) and not f.defers_tile_end(64, (128, 4, 3))
    assert f.defers_tile_end(128, (128, 2)) and not f.defers_tile_end(128, (176, 2))
    assert not f.defers_tile_end(256, (64, 2)) and not f.defers_tile_end(256, f.CONFIGS[256])
    assert f.smem_bytes(64, (128, 4, 2)) == 2 * 128 * 64 * 2 + 2 * 4 * 128 * 64 * 2 + 8 * (4 + 16) + 80 + 1024
    assert f.smem_bytes(64, (128, 4, 3)) == 192 * 64 * 2 + 2 * 4 * 128 * 64 * 2 + 8 * (6 + 16) + 80 + 1024
    assert f.smem_bytes(128, (176, 2)) == 128 * 128 * 2 + 2 * 2 * 176 * 128 * 2 + 8 * (4 + 8) + 80 + 1024
    assert f.smem_bytes(256, (80, 2)) == 128 * 256 * 2 + 2 * 2 * 80 * 256 * 2 + 8 * (4 + 8) + 80 + 1024
    assert f.smem_bytes(64, (128, 4)) == f.smem_bytes(64, (128, 4, 2))
    assert f.smem_bytes(64) == f.smem_bytes(64, f.CONFIGS[64])    # the default config


def test_compiles_clean_cpu():
    """No spills or stack frame, no setmaxnreg-ignored or wgmma-serialisation warnings (three
    instantiations here, one with three consumer warpgroups; the CI gate compiles all)."""
    try:
        from cupy.cuda import nvrtc  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"NVRTC unavailable: {exc}")
    from cupyattn._kernels import compile_offline
    for d, config in ((256, None), (64, (192, 3)), (64, (128, 4, 3))):
        rep = compile_offline(_flash_sm90.spec_for(BFLOAT16, d, config), "sm_90a")
        assert rep.ok and not rep.spills, rep.line() + rep.log[-2000:]
        assert "C7508" not in rep.log and "ignored" not in rep.log, rep.log
        assert "serializ" not in rep.log, rep.log


def test_swizzle_width_cpu(monkeypatch):
    """Full problems schedule one (batch, head) pair at a time; causal ones with fewer than
    CAUSAL_GROUP_KEYS keys group as many pairs as keep K and V in half of L2, rounded up to a
    divisor of the pair count (within a factor 2), longer ones all pairs; SWIZZLE_WIDTH overrides."""
    monkeypatch.setattr(_flash_sm90, "_l2_bytes", lambda device_id: 50 * 2**20)
    width = _flash_sm90._swizzle_width
    assert width(0, 4096, 128, 1, 64) == width(0, 64, 64, 1, 8) == width(0, 4096, 128, 4, 7) == 1
    assert 25 * 2**20 // (2 * 2048 * 256 * 2) == 12
    assert width(0, 2048, 256, 1, 64, causal=True) == 16       # 12 rounded up to a divisor of 64
    assert width(0, 2048, 256, 1, 48, causal=True) == 12       # 12 divides 48
    assert width(0, 2048, 256, 1, 53, causal=True) == 12       # 53 is prime: a short last group
    assert width(0, 2048, 256, 4, 64, causal=True) == 64       # GQA: a kv head serves 4 query heads
    assert width(0, 64, 64, 1, 8, causal=True) == 8
    assert width(0, _flash_sm90.CAUSAL_GROUP_KEYS, 64, 1, 8000, causal=True) == 8000   # long causal rows: one group
    monkeypatch.setattr(_flash_sm90, "SWIZZLE_WIDTH", 5)
    assert width(0, 4096, 128, 1, 64, causal=True) == width(0, 4096, 128, 1, 64) == 5


def test_grid_choice_cpu():
    """The grid each problem gets (grid_kind): dynamic, but per-tile for long causal rows at D=256;
    the module's GRID overrides it."""
    def kind(d, lk, causal):
        q = np.zeros((1, 2, 64, d), np.float16)
        k = np.zeros((1, 2, lk, d), np.float16)
        return _flash_sm90.grid_kind(normalize(q, k, k, causal=causal))
    assert kind(128, 16384, True) == "dynamic" and kind(256, 4096, True) == "dynamic"
    assert kind(256, _flash_sm90.LONG_KEYS, True) == "per-tile" and kind(256, 16384, False) == "dynamic"
    old = _flash_sm90.GRID
    try:
        _flash_sm90.GRID = "static"
        assert kind(256, 16384, True) == "static"
    finally:
        _flash_sm90.GRID = old


@pytest.mark.gpu
@sm90_only
def test_fresh_host_thread_gpu():
    """A host thread whose first CUDA work is the forward (inputs made by the main thread, the
    output's memory from CuPy's pool) gets the main thread's bits: the launch, which goes to the
    driver directly, makes the device's primary context current where none is."""
    import threading

    import cupy
    qn, kn, vn = _inputs((2, 4, 300, 128), (2, 4, 200, 128), BFLOAT16, seed=17)
    q, k, v = cupy.asarray(qn), cupy.asarray(kn), cupy.asarray(vn)
    expected = cupy.asnumpy(_run(q, k, v, causal=True)[0])
    result = {}

    def work():
        try:   # no poison: its fill would be CuPy's launch, which makes the context current itself
            out = _flash_sm90.forward(normalize(q, k, v, causal=True), poison=False)[0]
            result["out"] = cupy.asnumpy(out)
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in result, repr(result.get("error"))
    assert np.array_equal(result["out"].view(np.uint16), expected.view(np.uint16))
