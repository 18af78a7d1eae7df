"""Bad input raises TypeError/ValueError naming the problem; never a wrong answer."""
import numpy as np
import pytest

import cupyattn


def arrays(xp, *shapes, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [xp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]


GOOD = ((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 3))


@pytest.mark.parametrize("shapes,message", [
    (((2, 4, 5, 8), (2, 2, 6, 7), (2, 2, 6, 3)), "same head dim D"),
    (((2, 4, 5, 8), (2, 3, 6, 8), (2, 3, 6, 3)), "multiple of key/value heads"),
    (((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 7, 3)), "same number of heads and keys"),
    (((2, 4, 5, 8), (3, 2, 6, 8), (3, 2, 6, 3)), "do not broadcast"),
    (((8,), (6, 8), (6, 3)), "at least 2 dimensions"),
    (((5, 8), (2, 6, 8), (2, 6, 3)), "all have a head axis"),
    (((2, 4, 5, 0), (2, 2, 6, 0), (2, 2, 6, 3)), "at least 1"),
])
def test_bad_shapes_raise_value_error_with_shapes(xp, shapes, message):
    q, k, v = arrays(xp, *shapes)
    with pytest.raises(ValueError, match=message) as info:
        cupyattn.attention(q, k, v)
    assert str(shapes[0]) in str(info.value)


def test_mixed_dtypes(xp):
    q, k, v = arrays(xp, *GOOD)
    with pytest.raises(TypeError, match="share one dtype.*float16"):
        cupyattn.attention(q, k.astype(np.float16), v)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_non_floating_dtype(xp, dtype):
    q, k, v = arrays(xp, *GOOD)
    with pytest.raises(TypeError, match="q has dtype"):
        cupyattn.attention(q.astype(dtype), k, v)


def test_other_array_types():
    q, k, v = arrays(np, *GOOD)
    with pytest.raises(TypeError, match="q must be a numpy.ndarray or cupy.ndarray, got builtins.list"):
        cupyattn.attention(q.tolist(), k, v)


@pytest.mark.gpu
def test_mixing_numpy_and_cupy():
    import cupy
    q, k, v = arrays(np, *GOOD)
    with pytest.raises(TypeError, match="k is cupy"):
        cupyattn.attention(q, cupy.asarray(k), v)


def test_mask_of_wrong_shape(xp):
    q, k, v = arrays(xp, *GOOD)
    with pytest.raises(ValueError, match=r"mask of shape \(5, 5\) does not broadcast to .*\(2, 4, 5, 6\)"):
        cupyattn.attention(q, k, v, mask=xp.ones((5, 5), bool))
    # a mask must not enlarge the batch shape either
    with pytest.raises(ValueError, match="does not broadcast"):
        cupyattn.attention(q, k, v, mask=xp.ones((3, 2, 4, 5, 6), bool))


def test_mask_of_wrong_dtype(xp):
    q, k, v = arrays(xp, *GOOD)
    with pytest.raises(TypeError, match="mask must be boolean"):
        cupyattn.attention(q, k, v, mask=xp.ones((5, 6), np.int8))


def test_bad_scale_and_causal(xp):
    q, k, v = arrays(xp, *GOOD)
    with pytest.raises(ValueError, match="scale must be finite"):
        cupyattn.attention(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        cupyattn.attention(q, k, v, scale="big")
    with pytest.raises(TypeError, match="causal must be True or False"):
        cupyattn.attention(q, k, v, causal="yes")


def test_unknown_backend(xp):
    q, k, v = arrays(xp, *GOOD)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        cupyattn.attention(q, k, v, backend="fast")


def test_forced_backend_that_cannot_run_says_why():
    q, k, v = arrays(np, *GOOD)
    reasons = cupyattn.explain(q, k, v, backend="flash").why_not["flash"]
    assert reasons
    with pytest.raises(cupyattn.BackendUnavailable, match="backend 'flash' cannot run this forward: ") as info:
        cupyattn.attention(q, k, v, backend="flash")
    assert all(reason in str(info.value) for reason in reasons)


def test_explain_lists_every_backend():
    q, k, v = arrays(np, *GOOD)
    report = cupyattn.explain(q, k, v)
    assert report.backend in cupyattn.backends()
    assert set(report.why_not) == set(cupyattn.backends())
    text = str(report)
    for name in cupyattn.backends():
        assert name in text
    assert report.why_not["flash"]       # flash never runs on NumPy


def test_backward_checks_saved_tensors(xp):
    q, k, v = arrays(xp, *GOOD)
    out, lse = cupyattn.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 5\)"):
        cupyattn.attention_backward(out, q, k, v, out, lse[..., :3])
    with pytest.raises(TypeError, match="lse must have dtype float32"):
        cupyattn.attention_backward(out, q, k, v, out, lse.astype(np.float64))
    with pytest.raises(ValueError, match=r"dout must have shape"):
        cupyattn.attention_backward(out[..., :2], q, k, v, out, lse)


def test_auto_runs_the_backend_explain_names(xp):
    q, k, v = arrays(xp, *GOOD)
    for causal in (False, True):
        chosen = cupyattn.explain(q, k, v, causal=causal).backend
        from cupyattn import _registry
        from cupyattn._problem import normalize
        assert _registry.select(normalize(q, k, v, causal=causal), "auto", "forward").name == chosen
