"""Properties of attention that every backend must have, checked on the eager backend here.

The bodies take `xp` (NumPy always, CuPy on a GPU) and `backend`; the kernel backends' test
modules reuse them through `check_*` functions.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cupyattn
from reference import as_float64, reference_attention, rel_error
from strategies import ALL_DTYPES, Case, cases, lse_tolerance, make_inputs, tolerance


def run(backend, inputs, case, **kw):
    return cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend=backend,
                              return_lse=True, **case.kwargs(inputs), **kw)


def check_matches_reference(xp, backend, case, error_bound=None):
    inputs = make_inputs(xp, case)
    out, lse = run(backend, inputs, case)
    assert out.shape == inputs["q"].shape[:-1] + (case.head_dim_v,)
    assert out.dtype == np.dtype(case.dtype)
    assert lse.dtype == (np.float64 if case.dtype == np.float64 else np.float32)
    ref_out, ref_lse = reference_attention(**inputs, causal=case.causal, scale=case.scale)
    bound = tolerance(case.dtype) if error_bound is None else error_bound(inputs, ref_out)
    assert rel_error(out, ref_out) <= bound
    lse = as_float64(lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.all(np.abs(lse[finite] - ref_lse[finite]) <= lse_tolerance(case.dtype) * (1 + np.abs(ref_lse[finite])))


@given(case=cases())
def test_matches_float64_reference(xp, case):
    check_matches_reference(xp, "eager", case)


@given(case=cases(masks=(None, "bias"), causal=(False,)), data=st.data())
def test_permuting_keys_and_values_together_changes_nothing(xp, case, data):
    inputs = make_inputs(xp, case)
    perm = np.random.default_rng(case.seed).permutation(case.len_k)
    permuted = dict(inputs, k=inputs["k"][..., perm, :], v=inputs["v"][..., perm, :])
    if "mask" in inputs:
        permuted["mask"] = inputs["mask"][..., perm]
    out = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager", **case.kwargs(inputs))
    out_p = cupyattn.attention(permuted["q"], permuted["k"], permuted["v"], backend="eager", **case.kwargs(permuted))
    assert rel_error(out_p, out) <= 2 * tolerance(case.dtype)


@given(case=cases(masks=("bias",)))
def test_adding_a_row_constant_to_the_bias_changes_nothing(xp, case):
    inputs = make_inputs(xp, case)
    shift = np.random.default_rng(case.seed).uniform(-20, 20, (case.len_q, 1))
    shifted = dict(inputs, mask=(as_float64(inputs["mask"]) + shift).astype(np.float32))
    if xp is not np:
        shifted["mask"] = xp.asarray(shifted["mask"])
    base = dict(inputs, mask=inputs["mask"].astype(np.float32))
    out, lse = run("eager", base, case)
    out_s, lse_s = run("eager", shifted, case)
    assert rel_error(out_s, out) <= 2 * tolerance(case.dtype) + 1e-5
    np.testing.assert_allclose(as_float64(lse_s), as_float64(lse) + shift[:, 0], rtol=1e-5, atol=1e-4)


@given(case=cases(masks=(None, "bool", "bias")))
def test_output_rows_lie_within_the_attended_values(xp, case):
    inputs = make_inputs(xp, case)
    out, lse = (as_float64(a) for a in run("eager", inputs, case))
    v = as_float64(inputs["v"])
    v = np.repeat(v, case.heads_q // case.heads_kv, axis=-3)[..., None, :, :]   # (..., Hq, 1, Lk, Dv)
    # Every key is a candidate: the output is a convex combination of (at most) all value rows.
    low, high = v.min(axis=-2), v.max(axis=-2)
    slack = tolerance(case.dtype) * (np.abs(low) + np.abs(high) + 1)
    seen = np.isfinite(lse)[..., None]    # rows that see no key are 0, checked elsewhere
    assert np.all((out >= low - slack) | ~seen) and np.all((out <= high + slack) | ~seen)


@given(case=cases(masks=(None, "bias"), causal=(False,)).filter(lambda c: c.len_k >= 2))
def test_merging_two_key_halves_by_lse_equals_all_keys(xp, case):
    inputs = make_inputs(xp, case)
    half = case.len_k // 2
    out, lse = (as_float64(a) for a in run("eager", inputs, case))
    parts = []
    for keys in (slice(0, half), slice(half, None)):
        part = dict(inputs, k=inputs["k"][..., keys, :], v=inputs["v"][..., keys, :])
        if "mask" in inputs:
            part["mask"] = inputs["mask"][..., keys]
        parts.append([as_float64(a) for a in run("eager", part, case)])
    (o1, l1), (o2, l2) = parts
    merged_lse = np.logaddexp(l1, l2)
    merged = np.exp(l1 - merged_lse)[..., None] * o1 + np.exp(l2 - merged_lse)[..., None] * o2
    assert np.allclose(merged_lse, lse, rtol=1e-5, atol=1e-5)
    assert rel_error(merged, out) <= 3 * tolerance(case.dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(np.dtype(d)) if d != ALL_DTYPES[1] else "bfloat16")
def test_fully_masked_rows_give_zero_and_minus_inf(xp, dtype):
    case = Case(len_q=9, len_k=11, dtype=dtype, mask="bool_empty_rows", seed=3)
    inputs = make_inputs(xp, case)
    out, lse = run("eager", inputs, case)
    out, lse = as_float64(out), as_float64(lse)
    empty = ~as_float64(inputs["mask"]).astype(bool).any(-1)        # (Hq, Lq)
    assert empty.any()
    assert np.all(out[..., empty, :] == 0) and np.all(np.isneginf(lse[..., empty]))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[..., ~empty]))


def test_causal_with_more_queries_than_keys_leaves_top_rows_empty(xp):
    # bottom-right alignment: with Lq=6, Lk=3 the first 3 queries see no key
    case = Case(heads_q=1, heads_kv=1, len_q=6, len_k=3, head_dim=4, head_dim_v=4, causal=True, seed=1)
    inputs = make_inputs(xp, case)
    out, lse = run("eager", inputs, case)
    assert np.all(np.isneginf(as_float64(lse)[..., :3])) and np.all(as_float64(out)[..., :3, :] == 0)
    assert np.all(np.isfinite(as_float64(lse)[..., 3:]))


def test_nan_in_a_key_reaches_only_rows_that_see_it(xp):
    case = Case(heads_q=1, heads_kv=1, len_q=8, len_k=8, head_dim=4, head_dim_v=4, causal=True, seed=2)
    inputs = make_inputs(xp, case)
    k = as_float64(inputs["k"])
    k[..., 5, 0] = np.nan          # key 5 is visible to queries 5, 6, 7 only
    inputs["k"] = xp.asarray(k.astype(np.float32))
    out = as_float64(cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager", causal=True))
    rows_with_nan = np.isnan(out).any(-1)[0, 0]
    assert rows_with_nan.tolist() == [False] * 5 + [True] * 3


def test_nan_in_a_query_reaches_only_its_row(xp):
    case = Case(heads_q=2, heads_kv=1, len_q=5, len_k=7, seed=4)
    inputs = make_inputs(xp, case)
    q = as_float64(inputs["q"])
    q[0, 1, 2, 3] = np.nan
    inputs["q"] = xp.asarray(q.astype(np.float32))
    out = as_float64(cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager"))
    nan_rows = np.argwhere(np.isnan(out).any(-1))
    assert nan_rows.tolist() == [[0, 1, 2]]


def test_non_contiguous_inputs(xp):
    # (B, L, H, D) memory viewed as (B, H, L, D), and a strided head dim
    rng = np.random.default_rng(5)
    blhd = rng.standard_normal((2, 33, 4, 16)).astype(np.float32)
    q = xp.asarray(blhd).transpose(0, 2, 1, 3)
    k = xp.asarray(rng.standard_normal((2, 41, 2, 32)).astype(np.float32)).transpose(0, 2, 1, 3)[..., ::2]
    v = xp.asarray(rng.standard_normal((2, 2, 41, 8)).astype(np.float32))
    out = cupyattn.attention(q, k, v, causal=True)
    ref, _ = reference_attention(q, k, v, causal=True)
    assert rel_error(out, ref) <= tolerance(np.float32)


def test_batch_dims_broadcast(xp):
    rng = np.random.default_rng(6)
    q = xp.asarray(rng.standard_normal((3, 1, 4, 10, 8)).astype(np.float32))
    k = xp.asarray(rng.standard_normal((1, 2, 2, 12, 8)).astype(np.float32))
    v = xp.asarray(rng.standard_normal((2, 2, 12, 5)).astype(np.float32))
    out = cupyattn.attention(q, k, v)
    assert out.shape == (3, 2, 4, 10, 5)
    ref, _ = reference_attention(q, k, v)
    assert rel_error(out, ref) <= tolerance(np.float32)


def test_plain_matrices_without_head_axis(xp):
    rng = np.random.default_rng(7)
    q, k, v = (xp.asarray(rng.standard_normal(s).astype(np.float64)) for s in ((5, 3), (9, 3), (9, 2)))
    out, lse = cupyattn.attention(q, k, v, return_lse=True)
    assert out.shape == (5, 2) and lse.shape == (5,)
    ref, ref_lse = reference_attention(q, k, v)
    assert rel_error(out, ref) <= tolerance(np.float64)
    assert np.allclose(as_float64(lse), ref_lse)


@pytest.mark.parametrize("shape_q,shape_k,out_shape", [
    ((0, 2, 4, 8), (0, 2, 6, 8), (0, 2, 4, 8)),      # batch 0
    ((1, 2, 0, 8), (1, 2, 6, 8), (1, 2, 0, 8)),      # Lq = 0
])
def test_empty_inputs_give_empty_outputs(xp, shape_q, shape_k, out_shape):
    q = xp.ones(shape_q, np.float32)
    k = xp.ones(shape_k, np.float32)
    out, lse = cupyattn.attention(q, k, k, return_lse=True)
    assert out.shape == out_shape and lse.shape == out_shape[:-1]


def test_no_keys_gives_zeros_and_minus_inf(xp):
    q = xp.asarray(np.random.default_rng(8).standard_normal((2, 3, 4)).astype(np.float16))
    k = xp.zeros((2, 0, 4), np.float16)
    out, lse = cupyattn.attention(q, k, k, return_lse=True)
    assert out.shape == (2, 3, 4) and np.all(as_float64(out) == 0) and np.all(np.isneginf(as_float64(lse)))
