"""Gradients (attention_backward) against the float64 reference and finite differences."""
import numpy as np
import pytest
from hypothesis import given

import cupyattn
from reference import as_float64, reference_backward, rel_error
from strategies import Case, cases, make_inputs, tolerance


def gradients(backend, inputs, case, dout_seed=0):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out, lse = cupyattn.attention(q, k, v, backend=backend, return_lse=True, **case.kwargs(inputs))
    rng = np.random.default_rng(dout_seed)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    if not isinstance(q, np.ndarray):
        import cupy
        dout = cupy.asarray(dout)
    grads = cupyattn.attention_backward(dout, q, k, v, out, lse, backend=backend, **case.kwargs(inputs))
    return dout, grads


def gradient_errors(xp, backend, case):
    """{"q": error of dq, ...}: each gradient's error against the float64 reference, relative to
    the size of the terms it sums (so gradients that cancel to ~0 are judged fairly)."""
    inputs = make_inputs(xp, case)
    dout, grads = gradients(backend, inputs, case, case.seed)
    refs, mags = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs),
                                    magnitudes=True)
    errors = {}
    for name, grad, ref, mag in zip("qkv", grads, refs, mags):
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        errors[name] = rel_error(grad, ref, magnitude=mag)
    return errors


@given(case=cases(max_len=64, max_dim=64))
def test_gradients_match_float64_reference(xp, case):
    # one rounding to the dtype (eps/2 of the terms' size) dominates; float32 sums add far less
    errors = gradient_errors(xp, "eager", case)
    assert max(errors.values()) <= tolerance(case.dtype), errors


@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "bias"), (True, "bool_empty_rows")])
def test_gradients_match_central_finite_differences(causal, mask):
    case = Case(batch=(1,), heads_q=2, heads_kv=1, len_q=4, len_k=5, head_dim=3, head_dim_v=2,
                dtype=np.dtype(np.float64), causal=causal, mask=mask, seed=11)
    inputs = make_inputs(np, case)
    dout, grads = gradients("eager", inputs, case)

    def loss(**changed):
        args = dict(inputs, **changed)
        out = cupyattn.attention(args["q"], args["k"], args["v"], backend="eager", **case.kwargs(args))
        return float((out * dout).sum())

    step = 1e-6
    for name, grad in zip("qkv", grads):
        x = inputs[name]
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += step
            minus[idx] -= step
            numeric[idx] = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def test_fully_masked_rows_have_zero_gradient(xp):
    case = Case(len_q=6, len_k=7, mask="bool_empty_rows", seed=12)
    inputs = make_inputs(xp, case)
    _, (dq, dk, dv) = gradients("eager", inputs, case)
    empty = ~as_float64(inputs["mask"]).astype(bool).any(-1)
    dq = as_float64(dq)
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(as_float64(dk))) and np.all(np.isfinite(as_float64(dv)))
    assert np.all(dq[..., empty, :] == 0)


def test_gradients_of_broadcast_inputs_are_summed_back(xp):
    rng = np.random.default_rng(13)
    q = xp.asarray(rng.standard_normal((3, 2, 5, 4)))
    k = xp.asarray(rng.standard_normal((1, 1, 6, 4)))
    v = xp.asarray(rng.standard_normal((1, 6, 3)))
    out, lse = cupyattn.attention(q, k, v, return_lse=True)
    dout = xp.asarray(rng.standard_normal(out.shape))
    dq, dk, dv = cupyattn.attention_backward(dout, q, k, v, out, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    refs = reference_backward(dout, q, k, v)
    for grad, ref in zip((dq, dk, dv), refs):
        assert rel_error(grad, ref) <= tolerance(np.float64)


def test_deterministic_flag_gives_identical_bits(xp):
    # the public flag reaches the backend (flash's own bit-equality tests are in test_flash_bwd.py)
    case = Case(len_q=9, len_k=13, causal=True, seed=14)
    inputs = make_inputs(xp, case)
    out, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], return_lse=True, causal=True)
    dout = np.random.default_rng(14).standard_normal(out.shape).astype(out.dtype)
    dout = dout if xp is np else xp.asarray(dout)
    runs = [cupyattn.attention_backward(dout, inputs["q"], inputs["k"], inputs["v"], out, lse, causal=True,
                                        deterministic=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert np.array_equal(as_float64(a), as_float64(b))
