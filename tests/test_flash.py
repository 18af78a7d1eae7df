"""The flash backend's forward against the float64 reference, on the GPU: the sm80 kernel
(kernels_cu/flash_fwd.cu) on its own and the backend as dispatched (Hopper kernel where it applies).

Every GPU test forces backend="flash" (a fallback cannot pass for it) and turns on
`_flash.POISON_OUTPUTS`, so out and lse are NaN before each launch and an element the kernel does
not write fails the comparison. Error bounds follow the shared rule: at most 2x the eager path's
error in the same dtype plus a floor (tests/helpers.py).
"""
import numpy as np
import pytest
from hypothesis import given

import cupyattn
from cupyattn import _flash, _flash_sm90
from helpers import allowed_error
from reference import as_float64, reference_attention, rel_error
from strategies import HALF_DTYPES, BFLOAT16, Case, cases, lse_tolerance, make_inputs

FLOAT16 = np.dtype(np.float16)


# ---------------------------------------------------------------------------------------------
# CPU (no GPU needed)

def test_explain_numpy_gives_flash_reason():
    q = np.zeros((2, 16, 32), np.float16)
    report = cupyattn.explain(q, q, q)
    assert "NumPy" in "; ".join(report.why_not["flash"])
    assert report.backend != "flash"


def test_kernel_specs_listed():
    specs = _flash.FlashBackend().kernel_specs()
    assert specs
    assert len(specs) == len(set(specs))
    hopper = {"flash_fwd_sm90.cu", "flash_bwd_sm90.cu"}
    assert {s.source for s in specs} == {"flash_fwd.cu", "flash_bwd.cu"} | hopper
    assert all(s.hopper_only == (s.source in hopper) for s in specs)


def test_batch_collapse():
    # (2, 3) contiguous batch merges into one level; a sliced outer dim does not merge
    merged = _flash._collapse_batch((2, 3), [(30, 10), (0, 0)])
    assert merged == [(6, [10, 0])]
    assert _flash._collapse_batch((2, 1, 3), [(60, 7, 10)]) == [(2, [60]), (3, [10])]


def test_launch_offsets_and_vector_check():
    """The launchers' loop over outer batch levels visits every index once, last level fastest,
    at each tensor's own strides; 16-byte vectors need width, address and strides aligned."""
    import itertools
    from cupyattn._layout import launch_offsets, vector_ok
    levels = [(2, [100, 0]), (3, [7, 5])]          # tensor 1 broadcast along the first level
    got = [launch_offsets(i, levels, 2) for i in range(6)]
    want = [[a * 100 + b * 7, b * 5] for a, b in itertools.product(range(2), range(3))]
    assert got == want
    assert launch_offsets(0, [], 3) == [0, 0, 0]
    assert vector_ok(64, 256, (64, 8)) and vector_ok(8, 16, ())
    assert not vector_ok(60, 256, ()) and not vector_ok(64, 258, ()) and not vector_ok(64, 256, (4,))


# ---------------------------------------------------------------------------------------------
# GPU

@pytest.fixture(autouse=True, params=["sm80-kernel", "as-dispatched"])
def _poison(monkeypatch, request):
    """Each test runs twice: on the sm80 (mma.sync) kernel alone, and as the backend dispatches
    (the Hopper kernel where it supports the case on an sm_90 GPU)."""
    monkeypatch.setattr(_flash, "POISON_OUTPUTS", True)
    monkeypatch.setattr(_flash_sm90, "POISON_OUTPUTS", True)
    monkeypatch.setattr(_flash, "HOPPER_KERNEL", request.param == "as-dispatched")


def _cp():
    import cupy
    return cupy


def _flash_run(inputs, case, **kw):
    return cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="flash", return_lse=True,
                              **case.kwargs(inputs), **kw)


def _eager_run(inputs, case):
    return cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager", return_lse=True,
                              **case.kwargs(inputs))


def _reference(inputs, case, on_gpu=False):
    """float64 (out, lse): tests/reference.py, or for big shapes eager in float64 on the GPU."""
    if not on_gpu:
        return reference_attention(inputs["q"], inputs["k"], inputs["v"], causal=case.causal,
                                   scale=case.scale, mask=inputs.get("mask"))
    f64 = {n: (a.astype(np.float64) if n != "mask" or a.dtype != np.bool_ else a) for n, a in inputs.items()}
    return cupyattn.attention(f64["q"], f64["k"], f64["v"], backend="eager", return_lse=True,
                              **case.kwargs(f64))


def check(case, inputs=None, ref_on_gpu=False):
    cp = _cp()
    inputs = inputs if inputs is not None else make_inputs(cp, case)
    out, lse = _flash_run(inputs, case)
    ref_out, ref_lse = _reference(inputs, case, ref_on_gpu)
    eager_out, eager_lse = _eager_run(inputs, case)
    err, eager_err = rel_error(out, ref_out), rel_error(eager_out, ref_out)
    assert err <= allowed_error(eager_err, case.dtype), (case, err, eager_err)
    lse_err, eager_lse_err = rel_error(lse, ref_lse), rel_error(eager_lse, ref_lse)
    assert lse_err <= 2 * eager_lse_err + lse_tolerance(case.dtype), (case, lse_err, eager_lse_err)
    return out, lse


@pytest.mark.gpu
@given(case=cases(dtypes=HALF_DTYPES))
def test_property_vs_reference(case):
    check(case)


SHAPES = [(113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024), (1, 239), (3, 799),
          (127, 513), (2048, 2048)]
HEADS = [(2, 1), (2, 2), (4, 1), (3, 1), (4, 2)]     # (Hq, Hkv): GQA ratios 2, 1, 4, 3, 2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["float16", "bfloat16"])
def test_shape_grid(dtype, head_dim, causal):
    for i, (lq, lk) in enumerate(SHAPES):
        hq, hkv = HEADS[(i + head_dim) % len(HEADS)]
        if lq * lk > 1 << 20:
            hq, hkv = 2, 1
        case = Case(batch=(1,), heads_q=hq, heads_kv=hkv, len_q=lq, len_k=lk, head_dim=head_dim,
                    head_dim_v=head_dim, dtype=dtype, causal=causal, seed=i)
        check(case, ref_on_gpu=lq * lk > 300_000)


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(64, 32), (40, 128), (128, 256), (256, 8), (1, 1), (7, 200)])
def test_head_dim_v_differs(dims):
    d, dv = dims
    for causal in (False, True):
        check(Case(batch=(2,), heads_q=4, heads_kv=2, len_q=77, len_k=150, head_dim=d, head_dim_v=dv,
                   dtype=BFLOAT16, causal=causal, seed=d + dv))


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["bool", "bias", "bool_empty_rows"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["float16", "bfloat16"])
def test_masks(dtype, mask):
    for causal in (False, True):
        for lq, lk in [(100, 130), (5, 700), (64, 64)]:
            check(Case(batch=(2,), heads_q=4, heads_kv=2, len_q=lq, len_k=lk, head_dim=64, head_dim_v=64,
                       dtype=dtype, causal=causal, mask=mask, seed=lq))


@pytest.mark.gpu
@pytest.mark.parametrize("bias_dtype", [np.float16, BFLOAT16, np.float32, np.float64])
def test_bias_dtypes_and_broadcast(bias_dtype):
    cp = _cp()
    case = Case(batch=(2,), heads_q=4, heads_kv=1, len_q=70, len_k=90, head_dim=48, head_dim_v=48,
                dtype=FLOAT16, seed=3)
    inputs = make_inputs(cp, case)
    rng = np.random.default_rng(1)
    # broadcast over batch and query rows (stride 0 on both), real strides on heads and keys
    bias = rng.standard_normal((4, 1, 90)).astype(bias_dtype)
    inputs["mask"] = cp.asarray(bias)
    check(case.with_(mask="bias"), inputs)
    # key axis broadcast (stride 0 on the last axis)
    inputs["mask"] = cp.asarray(rng.standard_normal((70, 1)).astype(bias_dtype))
    check(case.with_(mask="bias"), inputs)


@pytest.mark.gpu
def test_fully_masked_rows_give_zero_and_neg_inf():
    cp = _cp()
    case = Case(batch=(2,), heads_q=2, heads_kv=1, len_q=50, len_k=70, head_dim=64, head_dim_v=64,
                dtype=BFLOAT16, mask="bool_empty_rows")
    inputs = make_inputs(cp, case)
    out, lse = check(case, inputs)
    out, lse = cp.asnumpy(out).astype(np.float64), cp.asnumpy(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert (out[:, :, ::3, :] == 0).all()
    assert np.isneginf(lse[:, :, ::3]).all()
    # causal with Lq > Lk: the first Lq - Lk rows see nothing
    case = Case(batch=(1,), heads_q=2, heads_kv=2, len_q=200, len_k=60, head_dim=32, head_dim_v=32,
                dtype=FLOAT16, causal=True)
    out, lse = check(case)
    out, lse = cp.asnumpy(out).astype(np.float64), cp.asnumpy(lse)
    assert (out[:, :, :140] == 0).all() and np.isneginf(lse[:, :, :140]).all()
    assert np.isfinite(lse[:, :, 140:]).all()


@pytest.mark.gpu
def test_identical_bits_on_repeat():
    cp = _cp()
    for case in [Case(batch=(2,), heads_q=4, heads_kv=2, len_q=300, len_k=517, head_dim=128, head_dim_v=128,
                      dtype=BFLOAT16, causal=True),
                 Case(batch=(2,), heads_q=8, heads_kv=2, len_q=1, len_k=4096, head_dim=64, head_dim_v=64,
                      dtype=FLOAT16)]:
        inputs = make_inputs(cp, case)
        a = _flash_run(inputs, case)
        b = _flash_run(inputs, case)
        for x, y in zip(a, b):
            assert cp.asnumpy(x).tobytes() == cp.asnumpy(y).tobytes()


@pytest.mark.gpu
def test_strided_blhd_view_read_in_place():
    cp = _cp()
    rng = np.random.default_rng(0)
    b, lq, lk, h, d = 2, 97, 130, 4, 64
    q = cp.asarray(rng.standard_normal((b, lq, h, d)).astype(FLOAT16)).transpose(0, 2, 1, 3)
    k = cp.asarray(rng.standard_normal((b, lk, h, d)).astype(FLOAT16)).transpose(0, 2, 1, 3)
    v = cp.asarray(rng.standard_normal((b, lk, h, d)).astype(FLOAT16)).transpose(0, 2, 1, 3)
    report = cupyattn.explain(q, k, v, backend="flash")
    assert report.backend == "flash"
    assert not any("cop" in n for n in report.notes["flash"]), report.notes
    case = Case(batch=(b,), heads_q=h, heads_kv=h, len_q=lq, len_k=lk, head_dim=d, head_dim_v=d, dtype=FLOAT16)
    check(case, {"q": q, "k": k, "v": v})


@pytest.mark.gpu
def test_non_contiguous_last_axis_is_copied():
    cp = _cp()
    case = Case(batch=(2,), heads_q=2, heads_kv=2, len_q=40, len_k=50, head_dim=32, head_dim_v=32, dtype=FLOAT16)
    inputs = make_inputs(cp, case.with_(head_dim=64, head_dim_v=64))
    inputs["q"] = inputs["q"][..., ::2]
    inputs["k"] = inputs["k"][..., ::2]
    inputs["v"] = inputs["v"][..., 1::2]
    report = cupyattn.explain(inputs["q"], inputs["k"], inputs["v"], backend="flash")
    assert any("copies q" in n for n in report.notes["flash"])
    check(case, inputs)


@pytest.mark.gpu
def test_misaligned_and_many_batch_levels():
    cp = _cp()
    rng = np.random.default_rng(5)
    # q starts 2 bytes past an allocation (no 16-byte alignment): the element-wise load path
    base = cp.asarray(rng.standard_normal(1 + 2 * 3 * 33 * 64).astype(FLOAT16))
    q = base[1:].reshape(2, 3, 33, 64)
    k = cp.asarray(rng.standard_normal((2, 3, 45, 64)).astype(FLOAT16))
    v = cp.asarray(rng.standard_normal((2, 3, 45, 64)).astype(FLOAT16))
    case = Case(batch=(2,), heads_q=3, heads_kv=3, len_q=33, len_k=45, head_dim=64, head_dim_v=64, dtype=FLOAT16)
    check(case, {"q": q, "k": k, "v": v})
    # three batch levels that cannot be merged (sliced middle axis): looped launches
    q = cp.asarray(rng.standard_normal((2, 5, 3, 2, 20, 32)).astype(BFLOAT16))[:, ::2]
    k = cp.asarray(rng.standard_normal((2, 1, 3, 1, 30, 32)).astype(BFLOAT16))
    v = cp.asarray(rng.standard_normal((2, 1, 3, 1, 30, 32)).astype(BFLOAT16))
    report = cupyattn.explain(q, k, v, backend="flash")
    assert any("launches" in n for n in report.notes["flash"]), report.notes
    case = Case(batch=(2, 3, 3), heads_q=2, heads_kv=1, len_q=20, len_k=30, head_dim=32, head_dim_v=32,
                dtype=BFLOAT16, causal=True)
    check(case, {"q": q, "k": k, "v": v})


@pytest.mark.gpu
def test_batch_heads_past_65535():
    case = Case(batch=(600,), heads_q=120, heads_kv=120, len_q=5, len_k=9, head_dim=16, head_dim_v=16,
                dtype=FLOAT16, causal=True)
    check(case, ref_on_gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [None, "bool", "bias"])
def test_decode_split_kv(mask):
    cp = _cp()
    for lq, causal in [(1, False), (3, True), (16, True)]:
        case = Case(batch=(2,), heads_q=8, heads_kv=2, len_q=lq, len_k=4096, head_dim=128, head_dim_v=128,
                    dtype=BFLOAT16, causal=causal, mask=mask, seed=lq)
        inputs = make_inputs(cp, case)
        report = cupyattn.explain(inputs["q"], inputs["k"], inputs["v"], backend="flash", causal=causal,
                                  mask=inputs.get("mask"))
        assert any("split-KV" in n for n in report.notes["flash"]), report.notes
        check(case, inputs)


@pytest.mark.gpu
def test_nan_propagates_like_eager():
    cp = _cp()
    case = Case(batch=(1,), heads_q=2, heads_kv=1, len_q=40, len_k=80, head_dim=32, head_dim_v=32, dtype=FLOAT16)
    inputs = make_inputs(cp, case)
    inputs["q"][0, 1, 7, 3] = np.nan
    inputs["v"][0, 0, 11, 5] = np.nan
    out, lse = _flash_run(inputs, case)
    eager_out, eager_lse = _eager_run(inputs, case)
    assert np.array_equal(np.isnan(as_float64(out)), np.isnan(as_float64(eager_out)))
    assert np.array_equal(np.isnan(as_float64(lse)), np.isnan(as_float64(eager_lse)))


@pytest.mark.gpu
def test_offsets_past_2_31_elements():
    cp = _cp()
    n = 2**31 + 2**16
    try:
        buf = cp.zeros(n, dtype=FLOAT16)
    except cp.cuda.memory.OutOfMemoryError:
        pytest.skip("not enough device memory for a 4 GiB buffer")
    rng = np.random.default_rng(2)
    lk, d = 300, 64
    # k and v: batch stride 2^30 elements, so batch 2 starts past 2^31
    kk = rng.standard_normal((3, lk, d)).astype(FLOAT16)
    vv = rng.standard_normal((3, lk, d)).astype(FLOAT16)
    stride = 2**30
    for b in range(3):
        buf[b * stride:b * stride + lk * d] = cp.asarray(kk[b].ravel())
        buf[b * stride + lk * d:b * stride + 2 * lk * d] = cp.asarray(vv[b].ravel())
    from cupy.lib.stride_tricks import as_strided
    k = as_strided(buf, shape=(3, 1, lk, d), strides=(stride * 2, 0, d * 2, 2))
    v = as_strided(buf[lk * d:], shape=(3, 1, lk, d), strides=(stride * 2, 0, d * 2, 2))
    q = cp.asarray(rng.standard_normal((3, 2, 50, d)).astype(FLOAT16))
    case = Case(batch=(3,), heads_q=2, heads_kv=1, len_q=50, len_k=lk, head_dim=d, head_dim_v=d, dtype=FLOAT16)
    out, lse = _flash_run({"q": q, "k": k, "v": v}, case)
    ref_out, ref_lse = reference_attention(cp.asnumpy(q), kk[:, None], vv[:, None])
    assert rel_error(out, ref_out) <= 4 * float(np.finfo(np.float16).eps)
    assert rel_error(lse, ref_lse) <= lse_tolerance(FLOAT16)


def test_input_reasons_without_a_device():
    # the checks every flash kernel shares, reached on a CPU by dressing a NumPy problem as CuPy's:
    # dtype and head dim are reported, then the device that cannot be asked
    import dataclasses
    from cupyattn._layout import flash_input_reasons
    from cupyattn._problem import normalize
    q = np.ones((1, 2, 4, 300), np.float32)
    problem = dataclasses.replace(normalize(q, q, q), xp=object())
    assert problem.library == "cupy"
    why, props = flash_input_reasons(problem, 256, 2**31 - 1)
    assert props is None
    assert [w.split(" ")[0] for w in why] == ["dtype", "head", "value", "cannot"], why
