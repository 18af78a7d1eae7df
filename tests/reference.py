"""The one float64 reference every test compares against: plain NumPy, written for reading.

It repeats K/V heads for grouped-query attention and materialises the full mask, the opposite
choices from the backends, so a shared mistake is unlikely.
"""
import numpy as np


def as_float64(a):
    """NumPy float64 copy of a NumPy or CuPy array (bfloat16 included)."""
    if hasattr(a, "get"):
        a = a.get()
    return np.asarray(a).astype(np.float64)


def _expand(q, k, v, mask, causal, scale):
    q, k, v = as_float64(q), as_float64(k), as_float64(v)
    group = q.shape[-3] // k.shape[-3] if q.ndim >= 3 else 1
    if q.ndim >= 3:
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = np.einsum("...id,...jd->...ij", q, k) * scale
    visible = np.ones(scores.shape, dtype=bool)
    if causal:
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        visible &= j <= i + (lk - lq)
    if mask is not None:
        if hasattr(mask, "get"):
            mask = mask.get()
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            visible &= np.broadcast_to(mask, scores.shape)
        else:
            scores = scores + np.broadcast_to(mask.astype(np.float64), scores.shape)
    return q, k, v, scores, visible, scale, group


def _softmax(scores, visible):
    scores = np.where(visible, scores, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_max = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
        finite_max = np.where(np.isneginf(row_max), 0.0, row_max)
        weights = np.exp(scores - finite_max)
        denom = weights.sum(axis=-1, keepdims=True)
        probs = weights / np.where(denom > 0, denom, 1.0)
        lse = (finite_max + np.log(denom))[..., 0]
    return probs, lse


def reference_attention(q, k, v, *, causal=False, scale=None, mask=None):
    """(out, lse) in float64. Rows that see no key: out 0, lse -inf."""
    q, k, v, scores, visible, scale, group = _expand(q, k, v, mask, causal, scale)
    probs, lse = _softmax(scores, visible)
    return np.einsum("...ij,...jd->...id", probs, v), lse


def reference_backward(dout, q, k, v, *, causal=False, scale=None, mask=None, magnitudes=False):
    """(dq, dk, dv) in float64, each summed back to its input's shape.

    With magnitudes=True, also the same sums taken over absolute values of every term: the size
    of what a finite-precision backward adds up. Gradients that cancel to (near) zero are judged
    relative to it, since rounding errors scale with the terms, not with their sum.
    """
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    q, k, v, scores, visible, scale, group = _expand(q, k, v, mask, causal, scale)
    probs, _ = _softmax(scores, visible)
    dout = as_float64(dout)
    dv = np.einsum("...ij,...id->...jd", probs, dout)
    dprobs = np.einsum("...id,...jd->...ij", dout, v)
    # rowsum(P * dP) equals rowsum(dO * O), the "delta" of the kernels' backward
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
    dq = np.einsum("...ij,...jd->...id", dscores, k) * scale
    dk = np.einsum("...ij,...id->...jd", dscores, q) * scale
    grads = _reduce(group, (dq, dk, dv), (q_shape, k_shape, v_shape))
    if not magnitudes:
        return grads
    abs_dprobs = np.einsum("...id,...jd->...ij", np.abs(dout), np.abs(v))
    abs_dscores = probs * (abs_dprobs + (abs_dprobs * probs).sum(-1, keepdims=True))
    mags = (np.einsum("...ij,...jd->...id", abs_dscores, np.abs(k)) * scale,
            np.einsum("...ij,...id->...jd", abs_dscores, np.abs(q)) * scale,
            np.einsum("...ij,...id->...jd", probs, np.abs(dout)))
    return grads, _reduce(group, mags, (q_shape, k_shape, v_shape))


def _reduce(group, grads, shapes):
    """Sum the repeated heads of a group, then broadcast batch axes, back to the input shapes."""
    dq, dk, dv = grads
    if group > 1:
        dk = dk.reshape(dk.shape[:-3] + (-1, group) + dk.shape[-2:]).sum(-3)
        dv = dv.reshape(dv.shape[:-3] + (-1, group) + dv.shape[-2:]).sum(-3)
    return tuple(_sum_to(g, s) for g, s in zip((dq, dk, dv), shapes))


def _sum_to(grad, shape):
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def rel_error(actual, expected, magnitude=None):
    """||actual - expected|| / ||expected|| over finite reference entries (or / ||magnitude||, the
    size of the summed terms, when given); an exact match is needed where the denominator is 0.
    NaN in actual where the reference is finite gives inf."""
    a, e = as_float64(actual), as_float64(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    finite = np.isfinite(e)
    if not np.array_equal(np.isfinite(a), finite) or not np.array_equal(a[~finite], e[~finite]):
        return np.inf
    diff = np.linalg.norm(a[finite] - e[finite])
    norm = np.linalg.norm((e if magnitude is None else as_float64(magnitude))[finite])
    if norm == 0:
        return 0.0 if diff == 0 else np.inf
    return diff / norm
